"""The package logger, per-call verbosity and progress bars."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

logger = logging.getLogger("neurorecon")


def set_log_level(verbose: bool | str | int | None) -> int:
    """Set the package log level; return the previous one.

    ``verbose`` may be None (leave as is), a bool (INFO / WARNING) or a level name or number.
    """
    old = logger.level
    if verbose is None:
        return old
    if isinstance(verbose, bool):
        level = logging.INFO if verbose else logging.WARNING
    elif isinstance(verbose, str):
        level = logging.getLevelName(verbose.upper())
    else:
        level = int(verbose)
    logger.setLevel(level)
    return old


@contextlib.contextmanager
def log_level(verbose: bool | str | int | None) -> Iterator[None]:
    """Apply ``verbose`` (see :func:`set_log_level`) for the duration of a ``with`` block."""
    old = set_log_level(verbose)
    try:
        yield
    finally:
        logger.setLevel(old)


#: Lightning's routine status lines, dropped from the console: product tips ("💡 Tip: ...
#: install litlogger"), the device inventory ("GPU available: False, used: False"; the
#: project's ``train:`` line names the device) and why ``fit`` stopped (the ``train:`` line
#: gives the epochs). Its warnings ("GPU available but not used", ...) go through
#: :mod:`warnings` and stay.
_LIGHTNING_CHATTER = ("Tip:", "GPU available:", "TPU available:", "HPU available:",
                      "LOCAL_RANK:", "`Trainer.fit` stopped:")
#: the loggers that emit them
_LIGHTNING_EMITTERS = ("lightning.pytorch.utilities.rank_zero",
                       "lightning.fabric.utilities.rank_zero",
                       "lightning.pytorch.accelerators.cuda")


def _no_chatter(record: logging.LogRecord) -> bool:
    """Whether ``record`` is not one of Lightning's routine status lines."""
    message = str(record.msg)
    return not any(part in message for part in _LIGHTNING_CHATTER)


def configure_cli_logging(level: str = "INFO") -> None:
    """Console and log-file output of a CLI run (entry points only; library code never calls
    this): each line once, the project's lines and real warnings only.

    The package logger gets one stderr handler (``[neurorecon] message``) and writes to the
    run's log file (the file handler Hydra put on the root logger) too; Lightning's own console
    handler stays its only output (no second copy through the root logger), without its
    routine status lines (tips, device inventory, why ``fit`` stopped).

    This is the one place where third-party output is silenced; everything else is fixed
    where it is caused (explicit ``weights_only``, no diffusers bars or ``accelerate`` notice
    in :func:`neurorecon.models.generators.base.load_quietly`, a logging interval that fits
    the epoch, figures laid out without warnings).
    """
    if not any(getattr(h, "_neurorecon", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[neurorecon] %(message)s"))
        handler._neurorecon = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler) and h not in logger.handlers:
            logger.addHandler(h)
    logger.setLevel(level)
    logger.propagate = False
    logging.getLogger("lightning").propagate = False
    # one known third-party deprecation notice per process start, not ours to fix
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    for name in _LIGHTNING_EMITTERS:
        emitter = logging.getLogger(name)
        if _no_chatter not in emitter.filters:
            emitter.addFilter(_no_chatter)


def interactive() -> bool:
    """Whether stderr is a terminal (progress bars only there; files get summary lines)."""
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None) -> Iterator[T]:
    """Progress bar over ``iterable`` on a terminal (silent when the logger is above INFO or
    stderr is a file: no carriage-return bars in logs)."""
    disable = logger.getEffectiveLevel() > logging.INFO or not interactive()
    return iter(tqdm(iterable, desc=desc, total=total, disable=disable, leave=False))
