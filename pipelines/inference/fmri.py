"""The fMRI decoder (:mod:`neurorecon.pipelines.inference`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurorecon.models.bundle import BundleConfig
from neurorecon.models.common.checks import DataError, check_columns, read_tsv

from .base import Decoder
from .files import NORMALISATION, BundleError, _load_mask


class FmriDecoder(Decoder):
    """An fMRI decoder: BOLD runs (through the training GLM) or single-trial betas ->
    embeddings; each subject's voxel mask (:meth:`mask`) travels with the bundle."""

    MODALITY = "fmri"
    METHODS = ("mask", "check_fmri_run", "prepare_fmri", "check_betas", "prepare_betas")

    def mask(self, subject: str):
        """The voxel mask (NIfTI image) of ``subject``."""
        return self.masks[self._label(subject)]

    def _fmri_params(self, subject: str | None = None) -> dict[str, Any]:
        """The training recipe's ``preprocess.fmri`` options; with ``subject``, the HRF delay
        its training betas were estimated with (``hrf_onset: auto`` chooses one per subject).
        A bundle trained on precomputed betas, or older than the option, has none: the
        undelayed HRF."""
        prep = dict(self.config.preprocessing)
        for key in ("input", "space", "subjects", "modality"):
            prep.pop(key, None)
        if subject is not None:
            chosen = self.config.subjects[self._label(subject)].hrf_onset
            prep["hrf_onset"] = 0.0 if chosen is None else chosen
        return prep

    def check_fmri_run(self, bold_img, events, *, subject: str, tr: float | None = None):
        """Check one BOLD run and its events against ``subject``'s mask before any GLM; return
        ``(image, events table, tr)``.

        Raises :class:`DataError` naming the file for an unreadable or truncated image, one
        that is not 4D or holds NaN/inf, another voxel grid than the mask (both grids named),
        a missing or non-positive repetition time, a table without ``onset``/``duration``, or
        events that end after the run. The batch service validates uploads with it before
        queueing them; :meth:`prepare_fmri` runs it first.
        """
        from ..preprocess.fmri import check_same_grid, load_4d, read_tr

        mask = self.mask(subject)
        path = None
        if isinstance(bold_img, (str, Path)):
            path = Path(bold_img)
            tr = read_tr(path) if tr is None else tr
            img, _ = load_4d(path, what="BOLD image")
        else:
            img = bold_img
            if img.ndim != 4:
                raise DataError(f"BOLD image must be 4D, got shape {img.shape}")
            if tr is None:
                tr = float(img.header.get_zooms()[3])
        if tr is None or not np.isfinite(tr) or not tr > 0:
            raise DataError(f"no usable repetition time ({tr!r}): pass tr= (s)", path=path)
        check_same_grid(img, mask, path=path, what="BOLD image")
        table = _events_table(events)
        n_scans = img.shape[3]
        late = table["onset"].to_numpy() + table["duration"].to_numpy() > n_scans * tr
        if late.any():
            raise DataError(f"{int(late.sum())} events end after the run "
                            f"({n_scans} scans x {tr:g} s = {n_scans * tr:g} s)",
                            path=events if isinstance(events, (str, Path)) else path)
        return img, table, float(tr)

    def prepare_fmri(self, bold_img, events, *, subject: str, tr: float | None = None
                     ) -> np.ndarray:
        """One BOLD run -> single-trial betas ``(n_trials, n_voxels)`` through the training
        GLM (nilearn) inside the subject's mask, normalised as in training.

        Parameters
        ----------
        bold_img : path | nibabel image
            4D run on the mask's grid (refused with both grids named otherwise).
        events : DataFrame | path
            One row per trial with ``onset`` and ``duration`` (s).
        subject : str
            Subject label.
        tr : float | None
            Repetition time (s); default: the JSON sidecar of a path, else the header.
        """
        from ..preprocess.fmri import single_trial_betas

        img, table, tr = self.check_fmri_run(bold_img, events, subject=subject, tr=tr)
        betas = single_trial_betas(img, table, tr=tr, mask_img=self.mask(subject),
                                   params=self._fmri_params(subject))
        return self._normalise(np.nan_to_num(betas), subject=subject,
                               runs=np.zeros(len(betas)))

    def check_betas(self, betas_img, trials=None, *, subject: str):
        """Check a 4D single-trial betas image (and its trial table, one row per volume)
        against ``subject``'s mask; return ``(image, data, table or None)``."""
        from ..preprocess.fmri import check_same_grid, load_4d

        mask = self.mask(subject)
        path = None
        if isinstance(betas_img, (str, Path)):
            path = Path(betas_img)
            img, data = load_4d(path, what="betas image")
        else:
            img, data = betas_img, np.asarray(betas_img.dataobj, np.float32)
        check_same_grid(img, mask, path=path, what="betas image")
        table = None
        if trials is not None:
            table = (trials if isinstance(trials, pd.DataFrame)
                     else read_tsv(trials, what="trial table"))
            if len(table) != data.shape[3]:
                raise DataError(f"{len(table)} trial rows but the betas image has "
                                f"{data.shape[3]} volumes",
                                path=trials if isinstance(trials, (str, Path)) else path,
                                hint="one row per volume of the betas image, in order")
        return img, data, table

    def prepare_betas(self, betas_img, trials=None, *, subject: str) -> np.ndarray:
        """Precomputed single-trial betas (4D, one volume per trial) -> ``(n_trials,
        n_voxels)`` inside the subject's mask, normalised as in training (per ``run`` or, with
        ``zscore: session``, per ``session`` column of ``trials`` when present, else over the
        whole image)."""
        _, data, table = self.check_betas(betas_img, trials, subject=subject)
        inside = np.asarray(self.mask(subject).dataobj) > 0
        X = data[inside].T.astype(np.float32)
        column = "session" if self._fmri_params().get("zscore") == "session" else "run"
        runs = (table[column].astype(str).to_numpy() if table is not None and column in table
                else np.zeros(len(X)))
        return self._normalise(X, subject=subject, runs=runs)

    def _normalise(self, X: np.ndarray, *, subject: str, runs: np.ndarray) -> np.ndarray:
        """The training recipe's per-voxel z-scoring (``preprocessing.zscore``): within each
        group of ``runs`` (runs, or sessions), with the stored train statistics, or none."""
        from ..preprocess.fmri import apply_voxel_stats, zscore_within

        mode = self._fmri_params().get("zscore", "run")
        if mode in ("run", "session"):
            X = zscore_within(X, runs)
        elif mode == "train":
            label = self._label(subject)
            if label not in self.voxel_stats:
                raise BundleError(f"train normalisation statistics of sub-{label} missing",
                                  path=None if self.root is None else self.root / NORMALISATION)
            X = apply_voxel_stats(X, self.voxel_stats[label])
        return np.asarray(X, np.float32)

    # ------------------------------------------------------------------ the modality's parts
    def _trial_shape(self, info) -> tuple[int, ...]:
        return (info.n_voxels,)

    def _net_subject(self, subject: str) -> int | str:
        return subject  # the fMRI encoder's adapters are named by label

    def prepare_recording(self, rec, events: pd.DataFrame, spec
                          ) -> tuple[np.ndarray, pd.DataFrame]:
        from ..preprocess.fmri import as_stim_file

        events = as_stim_file(events, spec)
        return self.prepare_fmri(rec.fpath, events, subject=rec.subject), events

    @staticmethod
    def _load_masks(root: Path, config: BundleConfig) -> dict[str, Any]:
        return {label: _load_mask(root, label, info) for label, info in config.subjects.items()}


def _events_table(events) -> pd.DataFrame:
    if isinstance(events, (str, Path)):
        table, path = read_tsv(events, what="events file"), events
    else:
        table, path = pd.DataFrame(events), None
    check_columns(table, ["onset", "duration"], path=path)
    table = table.assign(onset=pd.to_numeric(table["onset"], errors="coerce"),
                         duration=pd.to_numeric(table["duration"], errors="coerce"))
    if table[["onset", "duration"]].isna().any().any() or (table["onset"] < 0).any():
        raise DataError("onset and duration must be non-negative seconds", path=path)
    if not len(table):
        raise DataError("the events table has no rows", path=path)
    return table.reset_index(drop=True)
