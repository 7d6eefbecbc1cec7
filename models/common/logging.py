"""The package logger, per-call verbosity and progress bars."""

from __future__ import annotations

import contextlib
import logging
import sys
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


def configure_cli_logging(level: str = "INFO") -> None:
    """Attach one stream handler (entry points only; library code never calls this)."""
    if not any(getattr(h, "_neurorecon", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[neurorecon] %(message)s"))
        handler._neurorecon = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None) -> Iterator[T]:
    """Progress bar over ``iterable`` (silent when the logger is above INFO)."""
    disable = logger.getEffectiveLevel() > logging.INFO
    return iter(tqdm(iterable, desc=desc, total=total, disable=disable, leave=False))
