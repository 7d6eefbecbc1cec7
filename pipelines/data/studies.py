"""Find the recordings of a BIDS dataset (mne-bids does the path work)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mne_bids

from neurorecon.models.common.checks import DataError, check_option

#: Raw MEG formats mne-bids reads (FIF, CTF, KIT, BTi/4D, ITAB via FIF).
MODALITIES = ("meg", "fmri")
MEG_EXTENSIONS = (".fif", ".ds", ".con", ".sqd", ".pdf")


@dataclass(frozen=True)
class Recording:
    """One raw recording and its events file."""

    bids_path: mne_bids.BIDSPath
    events_path: Path

    @property
    def subject(self) -> str:
        return self.bids_path.subject

    @property
    def session(self) -> str | None:
        return self.bids_path.session

    @property
    def run(self) -> str | None:
        return self.bids_path.run

    @property
    def fpath(self) -> Path:
        return Path(self.bids_path.fpath)

    def describe(self) -> str:
        return self.fpath.name


def find_recordings(
    root: str | Path,
    *,
    modality: str,
    subjects: list[str] | None = None,
    sessions: list[str] | None = None,
    tasks: list[str] | None = None,
) -> list[Recording]:
    """List the MEG (``modality="meg"``) or BOLD (``"fmri"``) recordings under a BIDS root.

    Each recording must have a sibling ``*_events.tsv``. Raises :class:`DataError` if the
    root does not exist, nothing matches, or an events file is missing.
    """
    check_option("modality", modality, MODALITIES)
    root = Path(root)
    if not root.is_dir():
        raise DataError("BIDS root does not exist or is not a directory", path=root)
    if modality == "meg":
        kwargs = dict(datatypes="meg", suffixes="meg", extensions=list(MEG_EXTENSIONS))
    else:
        kwargs = dict(datatypes="func", suffixes="bold", extensions=".nii.gz")
    paths = mne_bids.find_matching_paths(
        root, subjects=subjects, sessions=sessions, tasks=tasks, **kwargs
    )
    paths = [p for p in paths if "derivatives" not in Path(p.fpath).relative_to(root).parts]
    # split FIF files (meg-1.fif) are read through their first part
    paths = [p for p in paths if p.split is None or p.split == "01"]
    if not paths:
        raise DataError(
            f"no {modality} recordings found (looked for {kwargs['datatypes']}/"
            f"*_{kwargs['suffixes']} with extensions {kwargs['extensions']}, "
            f"subjects={subjects}, sessions={sessions}, tasks={tasks})",
            path=root,
        )
    recordings = []
    for p in sorted(paths, key=lambda p: str(p.fpath)):
        events = p.copy().update(suffix="events", extension=".tsv", split=None).fpath
        if not Path(events).is_file():
            raise DataError("events file missing for this recording", path=events)
        recordings.append(Recording(p.copy().update(split=None), Path(events)))
    return recordings
