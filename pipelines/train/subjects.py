"""One subject of a data module, one class per modality: what the model needs to know about
it, its model inputs besides the trials, its description in checkpoints (checked against new
data) and its entry in a bundle (:class:`~neurorecon.models.bundle.MegSubject` /
:class:`~neurorecon.models.bundle.FmriSubject`).

The training side's counterpart of :class:`~neurorecon.pipelines.inference.MegDecoder` /
:class:`~neurorecon.pipelines.inference.FmriDecoder`: the data module, checkpoints and the
export ask the subject, not the modality.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ...models.meg.brain_module import sensor_features


@dataclass
class SubjectInfo:
    """What a model needs to know about one subject (data-derived sizes)."""

    MODALITY: ClassVar[str] = ""

    label: str
    index: int

    @classmethod
    def from_data(cls, label: str, index: int, sub) -> SubjectInfo:
        """From the subject's preprocessed data (:class:`~..preprocess.store.SubjectData`)."""
        raise NotImplementedError

    def inputs(self) -> dict[str, torch.Tensor]:
        """Model inputs besides the trials, fixed per subject (none by default)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The subject in a checkpoint's data description (JSON)."""
        return {"label": self.label, "index": self.index}

    def problems(self, trained: dict[str, Any]) -> list[str]:
        """Why this subject's data does not fit the model trained on ``trained`` (its
        :meth:`describe` in a checkpoint); none by default."""
        return []

    def bundle_entry(self, *, index: int, recipe: dict[str, Any], dm) -> dict[str, Any]:
        """The subject's entry in a bundle's ``subjects`` (``index``: in the model;
        ``recipe``: its part of the preprocessing recipe; ``dm``: its data module)."""
        raise NotImplementedError


@dataclass
class MegSubjectInfo(SubjectInfo):
    """A MEG subject: its channels, their 2D positions (in [0, 1]), good mask, sensor kinds
    (mag | axial | planar) and planar gradient directions; the epoch length."""

    MODALITY: ClassVar[str] = "meg"

    n_chans: int = 0
    n_times: int = 0
    ch_names: list[str] = field(default_factory=list)
    positions: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    good: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    kinds: list[str] = field(default_factory=list)
    orientation: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))

    @classmethod
    def from_data(cls, label: str, index: int, sub) -> MegSubjectInfo:
        ch = sub.channels
        return cls(label=label, index=index, n_chans=int(sub.X.shape[1]),
                   n_times=int(sub.X.shape[2]), ch_names=ch["name"].tolist(),
                   positions=ch[["x", "y"]].to_numpy(np.float32),
                   good=ch["good"].to_numpy(bool), kinds=ch["kind"].tolist(),
                   orientation=ch[["ori_x", "ori_y"]].to_numpy(np.float32))

    def inputs(self) -> dict[str, torch.Tensor]:
        """``positions (n_chans, 2)``, ``mask (n_chans,)`` and ``sensors`` (built once)."""
        return self._inputs

    @functools.cached_property
    def _inputs(self) -> dict[str, torch.Tensor]:
        return {"positions": torch.tensor(self.positions), "mask": torch.tensor(self.good),
                "sensors": sensor_features(self.kinds, self.orientation)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_chans": self.n_chans, "n_times": self.n_times,
                "ch_names": self.ch_names,
                "positions": np.asarray(self.positions).round(6).tolist(),
                "good": np.asarray(self.good).tolist(), "kinds": list(self.kinds),
                "orientation": np.asarray(self.orientation).round(6).tolist()}

    def bundle_entry(self, *, index: int, recipe: dict[str, Any], dm) -> dict[str, Any]:
        return {"index": index, "n_trials": dm.trained_trials(self.label),
                "n_chans": self.n_chans, "n_times": self.n_times,
                "ch_names": list(self.ch_names),
                "positions": np.asarray(self.positions, np.float64).tolist(),
                "good": np.asarray(self.good, bool).tolist(), "kinds": list(self.kinds),
                "orientation": np.asarray(self.orientation, np.float64).tolist(),
                "bads": list(recipe["bads"]), "sfreq_in": float(recipe["sfreq_in"]),
                "scaler_center": list(recipe["scaler_center"]),
                "scaler_scale": list(recipe["scaler_scale"]),
                "ssp": [list(v) for v in recipe.get("ssp", [])]}


#: the bundle's description of each fMRI normalisation (``preprocess.fmri.zscore``)
NORMALISATIONS = {"run": "z-score per voxel within each run",
                  "train": "z-score per voxel with the train trials' mean/sd "
                           "(normalisation.safetensors)",
                  "none": "none"}


@dataclass
class FmriSubjectInfo(SubjectInfo):
    """An fMRI subject: its voxel count inside its mask."""

    MODALITY: ClassVar[str] = "fmri"

    n_voxels: int = 0

    @classmethod
    def from_data(cls, label: str, index: int, sub) -> FmriSubjectInfo:
        return cls(label=label, index=index, n_voxels=int(sub.X.shape[1]))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_voxels": self.n_voxels}

    def problems(self, trained: dict[str, Any]) -> list[str]:
        if self.n_voxels == trained.get("n_voxels"):
            return []
        return [f"sub-{self.label} has {self.n_voxels} voxels, the checkpoint's adapter takes "
                f"{trained.get('n_voxels')} -> use the same mask"]

    def bundle_entry(self, *, index: int, recipe: dict[str, Any], dm) -> dict[str, Any]:
        from ..inference import MASKS

        mask = dm.data.subjects[self.label].mask_img
        return {"index": index, "n_trials": dm.trained_trials(self.label),
                "n_voxels": self.n_voxels,
                "mask": f"{MASKS}/sub-{self.label}_mask.nii.gz",
                "grid": {"shape": list(mask.shape[:3]),
                         "affine": np.asarray(mask.affine).round(6).tolist(),
                         "voxel_size": [float(z) for z in mask.header.get_zooms()[:3]]},
                "normalisation": NORMALISATIONS[dm.recipe.get("zscore", "run")],
                **{key: recipe[key] for key in ("tr", "n_runs", "voxel_size", "hrf_onset")
                   if key in recipe}}


#: the subject class of each modality
SUBJECT_INFO: dict[str, type[SubjectInfo]] = {"meg": MegSubjectInfo, "fmri": FmriSubjectInfo}
