"""Events tables: the contract between BIDS data and everything downstream.

A BIDS ``*_events.tsv`` must have ``onset`` and ``duration`` (seconds) and a stimulus column
(default ``stim_file``, a path relative to ``<bids_root>/stimuli/``). Rows without a stimulus
(``n/a``: responses, fixation, ...) are ignored. The split comes from an events column (default
``trial_type``): the test value (default ``test``) marks the test set, anything else is train.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from neurorecon.models.common.checks import DataError, read_tsv


@dataclass(frozen=True)
class EventSpec:
    """Which events columns carry the stimulus and the split.

    Parameters
    ----------
    stim_dir : str
        Folder, relative to the BIDS root, that ``stim_column`` paths are relative to.
    stim_column : str
        Column holding the stimulus image path.
    split_column : str
        Column deciding the split.
    test_value : str
        Value of ``split_column`` that marks a test trial.
    """

    stim_dir: str = "stimuli"
    stim_column: str = "stim_file"
    split_column: str = "trial_type"
    test_value: str = "test"

    @classmethod
    def from_config(cls, data_cfg) -> EventSpec:
        """The events contract of a ``data`` config group (``configs/data/bids.yaml``)."""
        return cls(stim_dir=str(data_cfg.stim_dir), stim_column=str(data_cfg.stim_column),
                   split_column=str(data_cfg.split_column), test_value=str(data_cfg.test_value))


def read_events(
    path: str | Path, *, bids_root: str | Path, spec: EventSpec = EventSpec()
) -> pd.DataFrame:
    """Read and validate a BIDS events file; keep only the image events.

    Returns a table with the original columns plus ``split`` (``"train"``/``"test"``),
    sorted by onset. Raises :class:`DataError` naming the file for a missing column, a
    missing image, or invalid onsets.
    """
    path = Path(path)
    table = read_tsv(path, what="events file",
                     columns=["onset", spec.stim_column, spec.split_column])
    table = table[table[spec.stim_column].notna()].copy()
    if table.empty:
        raise DataError(f"no rows with a value in column {spec.stim_column!r}", path=path)
    onset = pd.to_numeric(table["onset"], errors="coerce").to_numpy(float)
    if not np.all(np.isfinite(onset)) or (onset < 0).any():
        raise DataError("column 'onset' must hold finite, non-negative seconds", path=path)
    table["onset"] = onset
    if "duration" in table:
        table["duration"] = pd.to_numeric(table["duration"], errors="coerce").fillna(0.0)
    else:
        table["duration"] = 0.0
    table[spec.stim_column] = table[spec.stim_column].astype(str)
    stim_root = Path(bids_root) / spec.stim_dir
    missing = sorted(
        {s for s in table[spec.stim_column].unique() if not (stim_root / s).is_file()}
    )
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(
            f"{len(missing)} stimulus image(s) named in column {spec.stim_column!r} do not exist "
            f"under {stim_root}: {shown}",
            path=path,
        )
    is_test = table[spec.split_column].astype(str) == str(spec.test_value)
    table["split"] = np.where(is_test, "test", "train")
    return table.sort_values("onset", kind="stable").reset_index(drop=True)


def check_events_within(
    events: pd.DataFrame, *, duration: float, tmin: float, tmax: float, path: str | Path
) -> None:
    """Raise :class:`DataError` if a window ``[onset + tmin, onset + tmax]`` leaves the recording.

    ``duration`` is the recording length in seconds; ``tmin``/``tmax`` the window around onset.
    """
    onset = events["onset"].to_numpy(float)
    outside = (onset + tmin < 0) | (onset + tmax > duration)
    if outside.any():
        first = float(onset[outside][0])
        raise DataError(
            f"{int(outside.sum())} event(s) with window [{tmin}, {tmax}] s fall outside the "
            f"recording of {duration:.2f} s (first at onset {first:.3f} s)",
            path=path,
            hint="check that the events file belongs to this recording and that onsets are "
            "seconds from its start",
        )


def check_split(events: pd.DataFrame, *, what: str, spec: EventSpec = EventSpec()) -> None:
    """Raise :class:`DataError` if the train or test split is empty."""
    for split in ("train", "test"):
        if not (events["split"] == split).any():
            raise DataError(
                f"{what}: the {split} split is empty (column {spec.split_column!r}, test value "
                f"{spec.test_value!r})",
                hint="set data.split_column / data.test_value to the column and value marking "
                "test trials",
            )
