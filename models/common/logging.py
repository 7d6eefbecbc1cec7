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


def _no_tips(record: logging.LogRecord) -> bool:
    """Drop Lightning's product tips ("💡 Tip: ... install litlogger")."""
    return "Tip:" not in str(record.msg)


def configure_cli_logging(level: str = "INFO") -> None:
    """Console and log-file output of a CLI run (entry points only; library code never calls
    this): each line once, no Lightning tips.

    The package logger gets one stderr handler (``[neurorecon] message``) and writes to the
    run's log file (the file handler Hydra put on the root logger) too; Lightning's own console
    handler stays its only output (no second copy through the root logger), without tips.
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
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        emitter = logging.getLogger(name)
        if _no_tips not in emitter.filters:
            emitter.addFilter(_no_tips)


def interactive() -> bool:
    """Whether stderr is a terminal (progress bars only there; files get summary lines)."""
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None) -> Iterator[T]:
    """Progress bar over ``iterable`` on a terminal (silent when the logger is above INFO or
    stderr is a file: no carriage-return bars in logs)."""
    disable = logger.getEffectiveLevel() > logging.INFO or not interactive()
    return iter(tqdm(iterable, desc=desc, total=total, disable=disable, leave=False))
