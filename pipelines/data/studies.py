"""Find the recordings of a BIDS dataset (mne-bids does the path work)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mne_bids

from neurorecon.models.common.checks import DataError, check_option
from neurorecon.models.common.logging import logger

#: Raw MEG formats mne-bids reads (FIF, CTF, KIT, BTi/4D, ITAB via FIF).
MODALITIES = ("meg", "fmri")
MEG_EXTENSIONS = (".fif", ".ds", ".con", ".sqd", ".pdf")
#: a run whose events file exists but whose recording does not: an error, or a warning and
#: the run left out (``data.missing_runs``)
MISSING_RUNS = ("error", "warn")


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


def _recording_kind(modality: str) -> dict[str, Any]:
    """``find_matching_paths`` arguments of a modality's recordings."""
    if modality == "meg":
        return dict(datatypes="meg", suffixes="meg", extensions=list(MEG_EXTENSIONS))
    return dict(datatypes="func", suffixes="bold", extensions=".nii.gz")


def _events_of(path: mne_bids.BIDSPath) -> Path:
    """The events file beside a recording (split FIF parts share one)."""
    return Path(path.copy().update(suffix="events", extension=".tsv", split=None).fpath)


def _scan(root: Path, modality: str, selection: dict[str, Any]
          ) -> tuple[list[mne_bids.BIDSPath], list[Path]]:
    """The recordings under ``root`` (outside ``derivatives``; a split FIF by its first part)
    and the recordings that events files promise but that do not exist (their expected path;
    ``*_meg.*`` for MEG, whose format the events do not tell)."""
    kind = _recording_kind(modality)

    def matching(**kwargs) -> list[mne_bids.BIDSPath]:
        paths = mne_bids.find_matching_paths(root, **selection, **kwargs)
        return [p for p in paths if "derivatives" not in Path(p.fpath).relative_to(root).parts]

    paths = [p for p in matching(**kind) if p.split is None or p.split == "01"]
    promised = {_events_of(p) for p in paths}
    suffix = "_meg.*" if modality == "meg" else "_bold.nii.gz"
    missing = sorted(
        events.with_name(events.name.removesuffix("_events.tsv") + suffix)
        for events in (Path(p.fpath) for p in matching(datatypes=kind["datatypes"],
                                                      suffixes="events", extensions=".tsv"))
        if events not in promised)
    return paths, missing


def missing_recordings(root: str | Path, *, modality: str, subjects: list[str] | None = None,
                       sessions: list[str] | None = None, tasks: list[str] | None = None
                       ) -> list[Path]:
    """The recordings of ``root`` that an events file promises but that do not exist.

    Returns their expected paths (``*_meg.*`` for MEG, whose format the events do not
    tell), sorted; the selection is that of :func:`find_recordings`.
    """
    check_option("modality", modality, MODALITIES)
    return _scan(Path(root), modality, dict(subjects=subjects, sessions=sessions,
                                            tasks=tasks))[1]


def find_recordings(
    root: str | Path,
    *,
    modality: str,
    subjects: list[str] | None = None,
    sessions: list[str] | None = None,
    tasks: list[str] | None = None,
    missing_runs: str = "error",
) -> list[Recording]:
    """List the MEG (``modality="meg"``) or BOLD (``"fmri"``) recordings under a BIDS root.

    Each recording must have a sibling ``*_events.tsv``. Raises :class:`DataError` if the
    root does not exist, nothing matches, or an events file is missing.

    A run whose events file exists but whose recording does not
    (:func:`missing_recordings`) is a :class:`DataError` naming the missing files; with
    ``missing_runs="warn"`` it is left out with a warning listing them.
    """
    check_option("modality", modality, MODALITIES)
    check_option("data.missing_runs", missing_runs, MISSING_RUNS)
    root = Path(root)
    if not root.is_dir():
        raise DataError("BIDS root does not exist or is not a directory", path=root)
    kind = _recording_kind(modality)
    paths, missing = _scan(root, modality,
                           dict(subjects=subjects, sessions=sessions, tasks=tasks))
    if missing:
        names = ", ".join(p.relative_to(root).as_posix() for p in missing)
        plain = [p for p in missing if p.name.endswith(".nii.gz") and p.with_suffix("").exists()]
        if plain:
            raise DataError(f"{len(plain)} BOLD run(s) are uncompressed .nii, which is not "
                            f"read, e.g. {plain[0].with_suffix('').relative_to(root)}",
                            path=root, hint="gzip them (*_bold.nii.gz)")
        if missing_runs == "error":
            raise DataError(
                f"{len(missing)} run(s) have an events file but no recording: {names}",
                path=root, hint="restore the recording(s), or set data.missing_runs=warn to "
                "leave these runs out")
        logger.warning("data.missing_runs=warn: %d run(s) left out, their events file has no "
                       "recording: %s", len(missing), names)
    if not paths:
        raise DataError(
            f"no {modality} recordings found (looked for {kind['datatypes']}/"
            f"*_{kind['suffixes']} with extensions {kind['extensions']}, "
            f"subjects={subjects}, sessions={sessions}, tasks={tasks})",
            path=root,
        )
    recordings = []
    for p in sorted(paths, key=lambda p: str(p.fpath)):
        events = _events_of(p)
        if not events.is_file():
            raise DataError("events file missing for this recording", path=events)
        recordings.append(Recording(p.copy().update(split=None), events))
    return recordings
