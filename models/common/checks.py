"""Small validators with clear errors (after ``mne.utils.check``).

Every error raised for bad *input data* is a :class:`DataError`: it names the file and
the problem, and the CLI prints it without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    """Bad input data: the message names the file (when there is one) and the problem."""

    def __init__(self, problem: str, *, path: str | Path | None = None, hint: str | None = None):
        self.path = None if path is None else Path(path)
        self.problem = problem
        self.hint = hint
        msg = problem if path is None else f"{path}: {problem}"
        if hint:
            msg = f"{msg}\n  -> {hint}"
        super().__init__(msg)


def check_option(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise a :class:`DataError` (a
    ValueError, printed by the CLI as one line) listing them."""
    allowed = list(allowed)
    if value not in allowed:
        raise DataError(f"Invalid value for {name!r}: {value!r}. Allowed values: {allowed}.")
    return value


def check_number(name: str, value: Any, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False,
                 integer: bool = False, none: bool = False, also: Iterable[Any] = (),
                 why: str | None = None) -> Any:
    """Return ``value`` if it is a number within the bounds, else raise a :class:`DataError`
    (one line) naming ``name``, the value and what is allowed.

    Parameters
    ----------
    name : str
        The config key (or argument) the value comes from.
    value : object
        The value to check (booleans are not numbers here).
    low, high : float | None
        Bounds (None: unbounded), inclusive unless ``low_open`` / ``high_open``.
    integer : bool
        Whether only whole numbers are allowed.
    none : bool
        Whether None (``null``) is allowed too.
    also : iterable
        Further allowed values outside the bounds (e.g. ``-1`` for "every core").
    why : str | None
        Where the bounds come from, appended to the message.
    """
    also = list(also)
    if (value is None and none) or (value in also and not isinstance(value, bool)):
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and integer and not float(value).is_integer():
        number = False
    if number and value == value and (  # NaN fails every bound
            (low is None or (value > low if low_open else value >= low))
            and (high is None or (value < high if high_open else value <= high))):
        return value
    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        bounds = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f" {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        bounds = f" {'<' if high_open else '<='} {high:g}"
    else:
        bounds = ""
    allowed = " or ".join([*(["null"] if none else []), *map(repr, also), kind + bounds])
    raise DataError(f"Invalid value for {name!r}: {value!r}. Allowed values: {allowed}"
                    + (f" ({why})." if why else "."))


def check_file(path: str | Path, *, what: str = "file") -> Path:
    """Return ``path`` as a Path if it exists as a file, else raise :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found", path=path)
    return path


def check_finite(array: np.ndarray, *, path: str | Path | None, what: str) -> np.ndarray:
    """Raise :class:`DataError` if ``array`` holds NaN or infinite values."""
    bad = ~np.isfinite(array)
    if bad.any():
        raise DataError(
            f"{what} contains {int(bad.sum())} non-finite values (NaN/inf) out of {array.size}",
            path=path,
            hint="remove or interpolate them before running neurorecon",
        )
    return array


def read_tsv(path: str | Path, *, what: str = "TSV table", columns: Iterable[str] = (),
             text: bool = False, dtype: dict[str, Any] | None = None):
    """A tab-separated table (BIDS: ``n/a`` is missing) as a pandas DataFrame, or
    :class:`DataError` naming ``path`` when it is missing, unreadable or lacks ``columns``.

    ``text``: every cell as a string, nothing read as missing (tables of file names).
    """
    import pandas as pd

    path = check_file(path, what=what)
    kwargs = ({"dtype": str, "keep_default_na": False} if text else
              {"na_values": ["n/a"], "keep_default_na": False, "dtype": dtype})
    try:
        table = pd.read_csv(path, sep="\t", **kwargs)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError,
            UnicodeDecodeError) as exc:
        raise DataError(f"not a readable tab-separated {what} ({exc})", path=path) from exc
    check_columns(table, columns, path=path)
    return table


def check_columns(table, columns: Iterable[str], *, path: str | Path) -> None:
    """Raise :class:`DataError` if a pandas table lacks one of ``columns``."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(
            f"missing column(s) {missing}; found {list(table.columns)}",
            path=path,
        )
