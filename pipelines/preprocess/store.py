"""On-disk layout of preprocessed trials (the contract between preprocessing and training).

A preprocessing cache entry holds, per subject, ``sub-<label>/X.npy`` (float32, trials first)
and ``sub-<label>/trials.tsv`` (one row per row of ``X``: subject, session, run, stim_file,
split, n_repeats, ...), plus modality-specific files, and a top-level ``recipe.json`` with the
parameters that produced it (the streaming decoder and serving read the same recipe).

MEG: ``X`` is ``(n_trials, n_chans, n_times)``; ``channels.tsv`` lists name, x, y (2D sensor
layout in [0, 1]), ``good`` (False for bad channels, whose rows in ``X`` are zero), ``kind``
(``mag`` | ``axial`` | ``planar``) and ``ori_x``, ``ori_y`` (planar gradiometers' gradient
direction in the layout; 0 otherwise).
fMRI: ``X`` is ``(n_trials, n_voxels)``; ``mask.nii.gz`` (``SubjectTrials.mask_img``) maps
voxel columns back to the brain; with ``zscore: train``, ``voxel_stats.npy`` holds the train
trials' per-voxel mean and sd ``(2, n_voxels)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurorecon.models.common.checks import DataError


@dataclass
class SubjectTrials:
    """Preprocessed trials of one subject."""

    subject: str
    X: np.ndarray
    trials: pd.DataFrame
    channels: pd.DataFrame | None = None  # MEG: name, x, y, good
    mask_img: Any = None  # fMRI: nibabel mask image (voxel columns of X, in order)
    voxel_stats: np.ndarray | None = None  # fMRI zscore=train: (2, n_voxels) mean, sd

    def __post_init__(self) -> None:
        if len(self.X) != len(self.trials):
            raise ValueError(
                f"sub-{self.subject}: {len(self.X)} arrays but {len(self.trials)} trial rows"
            )


@dataclass
class Preprocessed:
    """All subjects of one preprocessing run plus its recipe."""

    modality: str
    subjects: dict[str, SubjectTrials]
    recipe: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def save_preprocessed(data: Preprocessed, out: Path) -> None:
    """Write ``data`` into the (temporary) cache directory ``out``."""
    (out / "recipe.json").write_text(
        json.dumps({"modality": data.modality, **data.recipe}, indent=2, default=str)
    )
    for label, sub in data.subjects.items():
        d = out / f"sub-{label}"
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "X.npy", np.ascontiguousarray(sub.X, dtype=np.float32))
        sub.trials.to_csv(d / "trials.tsv", sep="\t", index=False, na_rep="n/a")
        if sub.channels is not None:
            sub.channels.to_csv(d / "channels.tsv", sep="\t", index=False)
        if sub.mask_img is not None:
            import nibabel as nib

            nib.save(sub.mask_img, d / "mask.nii.gz")
        if sub.voxel_stats is not None:
            np.save(d / "voxel_stats.npy", np.asarray(sub.voxel_stats, np.float32))


def load_preprocessed(path: str | Path, *, mmap: bool = True) -> Preprocessed:
    """Load a preprocessing cache entry written by :func:`save_preprocessed`."""
    path = Path(path)
    recipe_file = path / "recipe.json"
    if not recipe_file.is_file():
        raise DataError("not a neurorecon preprocessing cache (no recipe.json)", path=path)
    recipe = json.loads(recipe_file.read_text())
    modality = recipe.pop("modality")
    subjects = {}
    for d in sorted(path.glob("sub-*")):
        label = d.name[4:]
        ch_file = d / "channels.tsv"
        channels = pd.read_csv(ch_file, sep="\t") if ch_file.is_file() else None
        mask = d / "mask.nii.gz"
        subjects[label] = SubjectTrials(
            subject=label,
            X=np.load(d / "X.npy", mmap_mode="r" if mmap else None),
            trials=pd.read_csv(d / "trials.tsv", sep="\t", na_values=["n/a"], keep_default_na=False,
                               dtype={"subject": str, "session": str, "run": str}),
            channels=channels,
            mask_img=_load_nifti(mask) if mask.is_file() else None,
            voxel_stats=(np.load(d / "voxel_stats.npy") if (d / "voxel_stats.npy").is_file()
                         else None),
        )
    return Preprocessed(modality=modality, subjects=subjects, recipe=recipe, path=path)


def _load_nifti(path: Path):
    import nibabel as nib

    return nib.load(path)


def average_repeats(X: np.ndarray, trials: pd.DataFrame, *, stim_column: str = "stim_file",
                    split: str = "test") -> tuple[np.ndarray, pd.DataFrame]:
    """Average the trials of ``split`` that show the same stimulus; keep the others as they are.

    The averaged rows get ``n_repeats`` (number of trials averaged); other rows get 1.
    Raises :class:`DataError` if no stimulus of ``split`` is repeated.
    """
    trials = trials.reset_index(drop=True)
    keep = trials.index[trials["split"] != split].to_numpy()
    out_X = [X[keep]]
    rows = trials.loc[keep].assign(n_repeats=1)
    groups = trials[trials["split"] == split].groupby(stim_column, sort=True)
    if len(groups) and groups.size().max() == 1:
        raise DataError(
            f"the {split} set has no repeats: every {split} stimulus was shown once, so there "
            "is nothing to average",
            hint="set preprocess.<modality>.average_test_repeats=false, or mark the repeated "
            "images as test with data.split_column / data.test_value")
    avg_rows = []
    for _, g in groups:
        out_X.append(X[g.index.to_numpy()].mean(axis=0, keepdims=True))
        avg_rows.append(g.iloc[[0]].assign(n_repeats=len(g)))
    if avg_rows:
        rows = pd.concat([rows, *avg_rows], ignore_index=True)
    return np.concatenate(out_X, axis=0), rows.reset_index(drop=True)
