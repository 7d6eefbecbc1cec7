"""fMRI preprocessing: BIDS BOLD runs (or precomputed betas) -> single-trial voxel patterns.

BOLD input: per run, nibabel loads the 4D image and nilearn's
:class:`~nilearn.glm.first_level.FirstLevelModel` estimates one beta per trial, either with one
regressor per trial (``glm: lsa``, least squares all) or, per trial, that trial against all the
others (``glm: lss``, least squares separate), with a canonical HRF delayed per subject by the
delay at which the mean evoked response explains its runs best (``hrf_onset: auto``) or a
fixed one.
Betas are effect sizes in percent signal change (nilearn's mean scaling), taken inside a mask
(default: the MNI152 brain mask resampled to the data grid; or an ROI NIfTI), z-scored per voxel
within each run or with the train trials' statistics (``zscore: run | train | none``). Subjects
stay separate (each has its own voxel count); repeats of a test stimulus may be averaged.

Betas input: ``*_betas.nii.gz`` (4D, one volume per trial) with a trial table of the same stem,
``*_trials.tsv`` (stimulus column + split column), see :func:`find_betas`.

Output: :class:`~neurorecon.pipelines.preprocess.store.Preprocessed` with ``X`` of shape
``(n_trials, n_voxels)`` per subject and the mask NIfTI mapping columns back to the brain.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurorecon.models.common.checks import (
    DataError,
    check_file,
    check_finite,
    check_number,
    check_option,
    read_tsv,
)
from neurorecon.models.common.logging import log_level, logger, progress

from ..data.events import EventSpec, check_events_within, check_split, read_events
from .store import (
    Preprocessed,
    RowFile,
    SubjectTrials,
    TrialAssembler,
    load_rows,
    output_folder,
    repeat_plan,
    subject_dir,
)

GLMS = ("lsa", "lss")
#: per-voxel z-scoring: within each run | within each session (NSD) | with the train trials'
#: statistics | off
ZSCORE_MODES = ("run", "session", "train", "none")
NOISE_MODELS = ("ar1", "ols")
DRIFT_MODELS = ("cosine", "polynomial", None)
#: fMRI inputs: BOLD runs (single-trial GLM here) or precomputed single-trial betas
FMRI_INPUTS = ("bold", "betas")
#: fraction of mask voxels that must carry signal; below it the mask and data do not match
MIN_COVERAGE = 0.5
#: canonical HRF shapes (nilearn's) that ``hrf_onset`` can delay
HRF_SHAPES = ("glover", "spm")
#: HRF delays (s) tried for each subject with ``hrf_onset: auto``
HRF_ONSET_GRID = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
#: the share of a run's voxels (the most responsive in the other runs) that score the delays
HRF_VOXEL_SHARE = 0.1
DEFAULTS: dict[str, Any] = {
    "glm": "lsa", "hrf_model": "glover", "hrf_onset": "auto", "drift_model": "cosine",
    "high_pass": 0.01,
    "noise_model": "ar1", "mask": None, "smoothing_fwhm": None, "zscore": "run",
    "average_test_repeats": True,
}


def fmri_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Plain dict of the ``preprocess.fmri`` options (DictConfig or mapping) over
    :data:`DEFAULTS`, checked: an unknown key or a value out of range is a
    :class:`DataError` naming the key (the config is checked with this before any work)."""
    if params is not None and not isinstance(params, dict):
        from omegaconf import DictConfig, OmegaConf

        if isinstance(params, DictConfig):
            params = OmegaConf.to_container(params, resolve=True)
    out = {**DEFAULTS, **dict(params or {})}
    unknown = sorted(set(out) - set(DEFAULTS))
    if unknown:
        raise DataError(f"unknown preprocess.fmri option(s) {unknown}; known: {list(DEFAULTS)}")
    check_option("preprocess.fmri.glm", out["glm"], GLMS)
    check_option("preprocess.fmri.zscore", out["zscore"], ZSCORE_MODES)
    check_option("preprocess.fmri.noise_model", out["noise_model"], NOISE_MODELS)
    check_option("preprocess.fmri.drift_model", out["drift_model"], DRIFT_MODELS)
    check_number("preprocess.fmri.high_pass", out["high_pass"], low=0, low_open=True)
    check_number("preprocess.fmri.hrf_onset", out["hrf_onset"], low=-3, high=6, also=("auto",))
    if out["hrf_onset"] != 0 and out["hrf_model"] not in HRF_SHAPES:
        raise DataError(f"Invalid value for 'preprocess.fmri.hrf_onset': {out['hrf_onset']!r}. "
                        f"Allowed values: 0 with hrf_model={out['hrf_model']!r} (a delay, or "
                        f"auto, shifts one canonical HRF: hrf_model one of {list(HRF_SHAPES)}).")
    check_number("preprocess.fmri.smoothing_fwhm", out["smoothing_fwhm"], low=0,
                 low_open=True, none=True)
    return out


# ----------------------------------------------------------------------------- inputs


def open_4d(path: str | Path, *, what: str, keep_file_open: bool = False):
    """A 4D NIfTI's image with nibabel, its voxels not read yet (lazy ``dataobj``); a missing,
    unreadable or non-4D file is a :class:`DataError` naming it."""
    import nibabel as nib

    path = check_file(path, what=what)
    try:
        img = nib.load(path, keep_file_open=keep_file_open)
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise DataError(f"cannot read the {what} with nibabel ({exc})", path=path) from exc
    if img.ndim != 4:
        raise DataError(
            f"{what} must be 4D (x, y, z, {'trial' if 'betas' in what else 'time'}), "
            f"got {img.ndim}D with shape {img.shape}", path=path)
    return img


def load_4d(path: Path, *, what: str):
    """Load a 4D NIfTI with nibabel; return ``(image, float32 data)``, checked."""
    import nibabel as nib

    img = open_4d(path, what=what)
    try:  # nibabel reads lazily: a truncated or corrupt (gzip) file fails here
        data = img.get_fdata(dtype=np.float32)
    except Exception as exc:
        raise DataError(f"cannot read the {what}'s voxel data: truncated or corrupt file "
                        f"({type(exc).__name__}: {exc})", path=path) from exc
    check_finite(data, path=path, what=what)
    return nib.Nifti1Image(data, img.affine, img.header), data


def read_tr(bold_path: str | Path) -> float:
    """Repetition time (s) from the BIDS JSON sidecar of ``bold_path``.

    Raises :class:`DataError` naming the sidecar if it is missing, unreadable or lacks a
    positive ``RepetitionTime``.
    """
    bold_path = Path(bold_path)
    sidecar = bold_path.with_name(bold_path.name.removesuffix(".gz").removesuffix(".nii") + ".json")
    check_file(sidecar, what="BOLD JSON sidecar")
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"not a readable JSON sidecar ({exc})", path=sidecar) from exc
    tr = meta.get("RepetitionTime")
    if not isinstance(tr, (int, float)) or isinstance(tr, bool) or not tr > 0:
        raise DataError(f"'RepetitionTime' must be a positive number of seconds, got {tr!r}",
                        path=sidecar, hint="add the repetition time (s) of the BOLD run")
    return float(tr)


def _grid(img):
    """A 3D stand-in carrying ``img``'s voxel grid (affine, shape, voxel size), not its data."""
    import nibabel as nib

    return nib.Nifti1Image(np.zeros(img.shape[:3], np.uint8), img.affine, img.header)


def _describe_grid(img) -> str:
    zooms = ", ".join(f"{z:g}" for z in img.header.get_zooms()[:3])
    origin = ", ".join(f"{v:g}" for v in np.asarray(img.affine)[:3, 3])
    return f"shape {tuple(img.shape[:3])}, voxels {zooms} mm, origin ({origin})"


def same_grid(img, ref) -> bool:
    """Whether ``img`` (3D/4D) lies on the voxel grid (shape and affine) of ``ref``."""
    return img.shape[:3] == ref.shape[:3] and np.allclose(img.affine, ref.affine, atol=1e-3)


def check_same_grid(img, mask_img, *, path: str | Path | None = None,
                    what: str = "image") -> None:
    """Raise :class:`DataError` naming both grids unless ``img`` (3D/4D) lies on the voxel
    grid (shape and affine) of ``mask_img``."""
    if not same_grid(img, mask_img):
        raise DataError(
            f"{what} is on another voxel grid than the model's mask: data {_describe_grid(img)};"
            f" mask {_describe_grid(mask_img)} (resample the data onto the mask grid with "
            "nilearn.image.resample_to_img, or train a model on this grid)", path=path)


def _brain_mask(ref, params: dict, *, data_path: Path):
    """The analysis mask on the grid of ``ref``: MNI152 brain mask, or ``params['mask']``."""
    import nibabel as nib
    from nilearn.image import resample_to_img

    grid = nib.Nifti1Image(np.zeros(ref.shape[:3], np.uint8), ref.affine)
    if params["mask"] is None:
        from nilearn.datasets import load_mni152_brain_mask

        source, source_path = load_mni152_brain_mask(resolution=2), "MNI152 brain mask"
    else:
        source_path = check_file(params["mask"], what="mask image")
        source = nib.load(source_path)
        if source.ndim != 3:
            raise DataError(f"mask must be a 3D image, got shape {source.shape}", path=source_path)
    from nilearn.image.resampling import BoundingBoxError

    try:
        mask = resample_to_img(source, grid, interpolation="nearest")
    except BoundingBoxError:
        mask = None
    inside = np.zeros(ref.shape[:3], bool) if mask is None else np.asarray(mask.get_fdata()) > 0
    if not inside.any():
        raise DataError(
            f"mask/data grid mismatch: the {source_path} has no voxel inside the field of view "
            "of this image", path=data_path,
            hint="mask and data must be in the same space (MNI)")
    return inside


def _coverage(vox: np.ndarray, *, path: Path, mask_name: str, positive: bool) -> np.ndarray:
    """Mask voxels with signal in ``vox`` ``(n_inside, n_volumes)``: non-zero variance over
    volumes, and a positive mean when ``positive`` (BOLD intensities, not betas)."""
    ok = vox.std(axis=1) > 0
    if positive:
        ok &= vox.mean(axis=1) > 0
    if ok.mean() < MIN_COVERAGE:
        raise DataError(
            f"mask/data grid mismatch: only {ok.mean():.0%} of the {len(ok)} voxels of the "
            f"{mask_name} carry signal in this image", path=path,
            hint="the data must be in MNI space on a grid overlapping the mask "
            "(or set preprocess.fmri.mask to an ROI in the data's space)")
    return ok


# ----------------------------------------------------------------------------- single trials


class DelayedHrf:
    """nilearn's ``glover`` or ``spm`` HRF delayed by ``onset`` s (its peak at 5.1 s or 5.0 s
    + ``onset``), as a ``hrf_model`` of nilearn's design matrices; picklable, for workers."""

    def __init__(self, shape: str, onset: float):
        self.shape, self.onset = check_option("hrf_model", shape, HRF_SHAPES), float(onset)
        self.__name__ = "hrf"  # nilearn names a callable's regressors "<trial_type>_<name>"

    def __call__(self, t_r: float, oversampling: int = 50) -> np.ndarray:
        from nilearn.glm.first_level import glover_hrf, spm_hrf

        kernel = glover_hrf if self.shape == "glover" else spm_hrf
        return kernel(t_r, oversampling, onset=self.onset)


def _design(frame_times: np.ndarray, events: pd.DataFrame, trial_type: np.ndarray, params: dict):
    """nilearn's design matrix of one run: a regressor per ``trial_type`` (columns named by
    it), convolved with ``params``' HRF delayed by its ``hrf_onset`` (a number here: ``auto``
    is resolved per subject by :func:`preprocess_fmri`), and the drift."""
    from nilearn.glm.first_level import make_first_level_design_matrix

    onset = params["hrf_onset"]
    if onset == "auto":
        raise DataError("hrf_onset=auto is chosen per subject by preprocess_fmri: pass the "
                        "subject's delay (s)")
    hrf = params["hrf_model"] if float(onset) == 0 else DelayedHrf(params["hrf_model"], onset)
    ev = pd.DataFrame({"onset": events["onset"].to_numpy(float),
                       "duration": events["duration"].to_numpy(float), "trial_type": trial_type})
    design = make_first_level_design_matrix(
        frame_times, ev, hrf_model=hrf, drift_model=params["drift_model"],
        high_pass=params["high_pass"])
    if not isinstance(hrf, str):
        design.columns = [c.removesuffix("_hrf") for c in design.columns]
    return design


def _effects(model, design: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    """Effect sizes of regressors ``names`` from a fitted one-run model: ``(len(names), n_vox)``."""
    from nilearn.glm import compute_contrast

    out = []
    for name in names:
        con = (design.columns == name).astype(float)
        out.append(compute_contrast(model.labels_[0], model.results_[0], con,
                                    stat_type="t").effect_size())
    return np.asarray(out, dtype=np.float32).reshape(len(names), -1)


def single_trial_betas(img, events: pd.DataFrame, *, tr: float, mask_img,
                       params: Mapping[str, Any], desc: str = "trials") -> np.ndarray:
    """Single-trial betas of one run with nilearn's GLM: ``(n_trials, n_voxels)`` float32.

    Parameters
    ----------
    img : Nifti1Image
        4D BOLD run.
    events : DataFrame
        One row per trial with ``onset`` and ``duration`` (s).
    tr : float
        Repetition time (s).
    mask_img : Nifti1Image
        3D mask; columns of the result follow its voxels in nilearn's masking order.
    params : mapping
        The ``preprocess.fmri`` options (``glm``, ``hrf_model``, ``hrf_onset`` (s, a number),
        ``drift_model``, ``high_pass``, ``noise_model``, ``smoothing_fwhm``).
    desc : str
        Label of the progress bar.
    """
    from nilearn.glm.first_level import FirstLevelModel
    from nilearn.maskers import NiftiMasker
    from threadpoolctl import threadpool_limits

    params = fmri_params(params)
    n_scans = img.shape[3]
    frame_times = np.arange(n_scans) * tr
    n = len(events)
    names = np.array([f"trial{i:04d}" for i in range(n)])
    masker = NiftiMasker(mask_img=mask_img, smoothing_fwhm=params["smoothing_fwhm"]).fit()
    model = FirstLevelModel(mask_img=masker, noise_model=params["noise_model"],
                            signal_scaling=0, minimize_memory=True)
    # the GLM solves many small (n_scans x n_regressors) systems: multithreaded BLAS only
    # adds overhead there (10-50x slower on 2 busy cores), so it runs single-threaded
    with threadpool_limits(limits=1, user_api="blas"):
        if params["glm"] == "lsa":
            design = _design(frame_times, events, names, params)
            model.fit(img, design_matrices=[design])
            return _effects(model, design, list(progress(names, desc=desc)))
        betas = []
        for i in progress(range(n), desc=desc, total=n):
            trial_type = np.where(np.arange(n) == i, "target", "other")
            design = _design(frame_times, events, trial_type, params)
            model.fit(img, design_matrices=[design])
            betas.append(_effects(model, design, ["target"])[0])
        return np.stack(betas)


class Moments:
    """Per-voxel running count, mean and sum of squared deviations (Chan et al.'s pairwise
    update, float64): rows may come in blocks, in any number of calls to :meth:`add`."""

    def __init__(self, n_features: int):
        self.n = 0
        self.mean = np.zeros(n_features)
        self.m2 = np.zeros(n_features)

    def add(self, X: np.ndarray) -> Moments:
        X = np.asarray(X, np.float64)
        if len(X) == 0:
            return self
        n_b, mean_b = len(X), X.mean(axis=0)
        m2_b = ((X - mean_b) ** 2).sum(axis=0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * n_b / n)
        self.n = n
        return self

    def stats(self) -> np.ndarray:
        """``(2, n_features)`` float32 mean and sd (ddof 0); sd 0 becomes 1 (centred only)."""
        sd = np.sqrt(np.maximum(self.m2 / max(self.n, 1), 0.0))
        return np.stack([self.mean, np.where(sd > 0, sd, 1.0)]).astype(np.float32)


def zscore_within(X: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Z-score each voxel within each group of rows (std 0 -> centred only)."""
    X = np.array(X, dtype=np.float32)
    groups = np.asarray(groups)
    for g in pd.unique(groups):
        rows = groups == g
        X[rows] = apply_voxel_stats(X[rows], fit_voxel_stats(X[rows]))
    return X


def fit_voxel_stats(X: np.ndarray) -> np.ndarray:
    """Per-voxel mean and sd of ``(n_trials, n_voxels)`` (the train trials): ``(2, n_voxels)``
    float32; sd 0 becomes 1 (centred only)."""
    return Moments(np.shape(X)[1]).add(X).stats()


def apply_voxel_stats(X: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """Z-score ``(..., n_voxels)`` with stored train statistics (:func:`fit_voxel_stats`)."""
    return ((np.asarray(X, np.float32) - stats[0]) / stats[1]).astype(np.float32)


def as_stim_file(table: pd.DataFrame, spec: EventSpec) -> pd.DataFrame:
    if spec.stim_column != "stim_file":
        table = table.assign(stim_file=table[spec.stim_column].astype(str))
    return table


# ----------------------------------------------------------------------------- per-file tasks


@dataclass
class FmriPart:
    """One BOLD run's betas, or one betas file, in a part file ``(n_trials, n_inside)``
    (NaN in voxels without signal in it): what a worker returns."""

    path: Path
    trials: pd.DataFrame
    ok: np.ndarray  # (n_inside,) voxels with signal in this file
    tr: float | None = None


def _check_on_grid(img, ref_shape, ref_affine, *, path: Path, first: str) -> None:
    if img.shape[:3] != tuple(ref_shape) or not np.allclose(img.affine, ref_affine, atol=1e-3):
        raise DataError(f"grid {img.shape[:3]} / affine differs from the subject's first file "
                        f"({tuple(ref_shape)}, {first})", path=path,
                        hint="all runs of a subject must be on one voxel grid")


def _load_run(recording, *, bids_root: Path, spec: EventSpec, params: dict,
              inside: np.ndarray, ref_affine, first: str):
    """One BOLD run checked against its subject's grid and its events: ``(image, events, tr,
    the mask voxels with signal)``."""
    tr = read_tr(recording.fpath)
    img, data = load_4d(recording.fpath, what="BOLD image")
    _check_on_grid(img, inside.shape, ref_affine, path=recording.fpath, first=first)
    n_scans = img.shape[3]
    header_tr = float(img.header.get_zooms()[3])
    if header_tr > 0 and abs(header_tr - tr) > 1e-3:
        logger.warning("%s: header TR %.3f s differs from the sidecar's %.3f s; using the "
                       "sidecar", recording.fpath.name, header_tr, tr)
    events = as_stim_file(read_events(recording.events_path, bids_root=bids_root, spec=spec),
                          spec)
    check_events_within(events, duration=n_scans * tr, tmin=0.0,
                        tmax=float(events["duration"].max()), path=recording.events_path)
    ok = _coverage(data[inside], path=recording.fpath,
                   mask_name=params["mask"] or "MNI152 brain mask", positive=True)
    return img, events, tr, ok


def glm_to_file(recording, *, bids_root: Path, spec: EventSpec, params: dict,
                inside: np.ndarray, ref_affine, first: str, path: Path) -> FmriPart:
    """Single-trial betas of one BOLD run (checked against the subject's grid), saved to
    ``path``: the task a preprocessing worker runs."""
    import nibabel as nib

    img, events, tr, ok = _load_run(recording, bids_root=bids_root, spec=spec, params=params,
                                    inside=inside, ref_affine=ref_affine, first=first)
    run_mask = np.zeros(inside.shape, np.uint8)
    run_mask[inside] = ok
    betas = np.full((len(events), int(inside.sum())), np.nan, np.float32)
    betas[:, ok] = single_trial_betas(img, events, tr=tr,
                                      mask_img=nib.Nifti1Image(run_mask, img.affine),
                                      params=params, desc=f"{recording.fpath.name} trials")
    np.save(path, betas)
    trials = events.assign(subject=recording.subject, session=recording.session or "n/a",
                           run=recording.run or "n/a")
    return FmriPart(Path(path), trials, ok, tr)


def hrf_fit(recording, *, bids_root: Path, spec: EventSpec, params: dict,
            inside: np.ndarray, ref_affine, first: str) -> np.ndarray:
    """How well each HRF delay of :data:`HRF_ONSET_GRID` fits one BOLD run, per voxel of the
    subject's mask: ``(len(grid) + 1, n_voxels)`` float32, the variance that one regressor for
    every image (all trials alike: the mean evoked response) explains at each delay (ordinary
    least squares, after the drift regressors), then the variance the drift leaves; NaN for
    voxels without signal in this run. The worker task of ``hrf_onset: auto``
    (:func:`choose_hrf_onset`).

    A single regressor, delayed, fits the noise alike at every delay, so the variance it
    explains differs by the response it captures; a regressor per trial would absorb a wrong
    delay through its neighbours' regressors."""
    img, events, tr, ok = _load_run(recording, bids_root=bids_root, spec=spec, params=params,
                                    inside=inside, ref_affine=ref_affine, first=first)
    Y = np.asarray(img.dataobj, np.float32)[inside][ok].T.astype(np.float64)  # (scans, voxels)
    frame_times = np.arange(Y.shape[0]) * tr
    images = np.full(len(events), "images")
    designs = [_design(frame_times, events, images, {**params, "hrf_onset": onset})
               for onset in HRF_ONSET_GRID]
    drift = designs[0].drop(columns="images").to_numpy()  # the same at every delay
    u, sv, _ = np.linalg.svd(drift, full_matrices=False)
    u = u[:, sv > sv[0] * 1e-8]

    def residual(a: np.ndarray) -> np.ndarray:
        return a - u @ (u.T @ a)

    Y = residual(Y)
    out = np.full((len(designs) + 1, len(ok)), np.nan, np.float32)
    for k, design in enumerate(designs):
        x = residual(design["images"].to_numpy()[:, None])[:, 0]
        out[k, ok] = (x @ Y) ** 2 / max(float(x @ x), 1e-12)
    out[-1, ok] = np.einsum("tv,tv->v", Y, Y)
    return out


def choose_hrf_onset(fits: Sequence[np.ndarray]) -> dict[str, Any]:
    """A subject's HRF delay from its runs' :func:`hrf_fit`.

    Each run is scored on the :data:`HRF_VOXEL_SHARE` of its voxels that the *other* runs
    find most responsive at any delay (their pooled share of variance explained): voxels
    picked on the run that scores them would favour the delays at which its noise happens to
    fit. Per run, each delay's score is the share of those voxels' variance it explains; the
    delay nearest 0 whose mean over the runs is within one standard error (over runs) of the
    best delay's is kept (:func:`neurorecon.models.retrieval.one_standard_error`): a shift
    within the runs' noise leaves the canonical HRF as it is. Returns ``{"hrf_onset": s,
    "hrf_onset_r2": {delay: mean share explained}}``.
    """
    from neurorecon.models.retrieval import one_standard_error

    fits = np.asarray(fits, np.float64)  # (runs, delays + 1, voxels)
    explained, total = fits[:, :-1], fits[:, -1]
    scores = []
    for r in range(len(fits)):
        others = [k for k in range(len(fits)) if k != r] or [r]
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled = (np.nansum(explained[others], axis=0)
                      / np.nansum(total[others], axis=0)).max(axis=0)
        pooled[~np.isfinite(pooled) | np.isnan(total[r])] = -np.inf
        n = max(1, int(round(HRF_VOXEL_SHARE * np.isfinite(total[r]).sum())))
        best = np.argsort(pooled)[-n:]
        scores.append(explained[r][:, best].sum(axis=1) / max(total[r][best].sum(), 1e-12))
    scores = np.asarray(scores)
    out = one_standard_error({onset: scores[:, k] for k, onset in enumerate(HRF_ONSET_GRID)},
                             order=sorted(HRF_ONSET_GRID, key=abs))
    return {"hrf_onset": float(out["value"]),
            "hrf_onset_r2": {f"{float(k):g}": v for k, v in sorted(
                out["validation"].items(), key=lambda kv: float(kv[0]))}}


def load_masked_4d(path: Path, inside: np.ndarray, affine: np.ndarray, *, what: str,
                   first: str) -> tuple[Any, np.ndarray]:
    """A 4D NIfTI on the grid of ``inside`` (shape) and ``affine`` (that of ``first``, the
    subject's first file), read a block of volumes at a time and masked on the way:
    ``(image, (n_volumes, n_inside) float32)``; the full 4D volume is never in memory.
    NaN/inf inside the mask, a truncated file, a non-4D image or another grid are
    :class:`DataError` naming the file."""
    from .store import BLOCK_BYTES

    img = open_4d(path, what=what, keep_file_open=True)
    _check_on_grid(img, inside.shape, affine, path=path, first=first)
    n_vol = img.shape[3]
    step = max(1, BLOCK_BYTES // (4 * int(np.prod(img.shape[:3]))))
    out = np.empty((n_vol, int(inside.sum())), np.float32)
    try:
        for k in range(0, n_vol, step):
            block = np.asarray(img.dataobj[..., k : k + step], dtype=np.float32)
            out[k : k + step] = block[inside].T
    except Exception as exc:  # the kept-open file closes with the image's data proxy
        raise DataError(f"cannot read the {what}'s voxel data: truncated or corrupt file "
                        f"({type(exc).__name__}: {exc})", path=path) from exc
    check_finite(out, path=path, what=f"{what} (inside the mask)")
    return img, out


def betas_to_file(img_path: Path, trials_path: Path, *, index: int, subject: str,
                  bids_root: Path, spec: EventSpec, params: dict, inside: np.ndarray,
                  ref_affine, first: str, path: Path) -> FmriPart:
    """One betas file (a session), masked on load and saved to ``path``: a worker's task."""
    import mne_bids

    img, X = load_masked_4d(Path(img_path), inside, ref_affine, what="betas image",
                            first=first)
    trials = as_stim_file(read_trials(Path(trials_path), n_volumes=img.shape[3],
                                      image=Path(img_path), bids_root=bids_root, spec=spec),
                          spec)
    ok = _coverage(X.T, path=Path(img_path), mask_name=params["mask"] or "MNI152 brain mask",
                   positive=False)
    X[:, ~ok] = np.nan
    np.save(path, X)
    session = mne_bids.get_entities_from_fname(Path(img_path).name,
                                               on_error="ignore").get("session")
    defaults = {"subject": subject, "session": session or "n/a", "run": f"file{index + 1}"}
    trials = trials.assign(**{c: v for c, v in defaults.items() if c not in trials})
    return FmriPart(Path(path), trials.assign(subject=subject), ok)


# ----------------------------------------------------------------------------- per subject


def zscore_groups(trials: pd.DataFrame, mode: str) -> np.ndarray | None:
    """Row groups of per-voxel z-scoring: each run (``session/run``), each session, or None
    (``train``/``none``)."""
    if mode == "run":
        return (trials["session"].astype(str) + "/" + trials["run"].astype(str)).to_numpy()
    if mode == "session":
        return trials["session"].astype(str).to_numpy()
    return None


def _assemble_subject(label: str, parts: list[FmriPart], folder: Path, *, inside: np.ndarray,
                      ref, params: dict, recipe: dict, in_memory: bool) -> SubjectTrials:
    """A subject's part files -> z-scored, repeat-averaged ``X.npy``, streamed: the
    per-voxel statistics are accumulated over the parts first, then applied per block."""
    import nibabel as nib

    keep = np.logical_and.reduce([p.ok for p in parts])
    if not keep.all():
        logger.info("sub-%s: %d mask voxels without signal in some run dropped", label,
                    int((~keep).sum()))
    trials = pd.concat([p.trials for p in parts], ignore_index=True)
    first = ["subject", "session", "run", "onset", "stim_file", "split"]
    trials = trials[[c for c in first if c in trials]
                    + [c for c in trials.columns if c not in first]]
    check_split(trials, what=f"sub-{label} fMRI trials")
    files = [RowFile(p.path) for p in parts]
    starts = np.cumsum([0] + [len(f) for f in files])
    mode = params["zscore"]
    groups = zscore_groups(trials, mode)
    if mode == "train":
        groups = np.where(trials["split"] == "train", "train", "")
    stats: dict[str, np.ndarray] = {}
    if groups is not None:
        moments: dict[str, Moments] = {}
        for f, start in zip(files, starts, strict=False):
            for rows, block in f.blocks():
                g_rows = groups[rows + start]
                for g in pd.unique(g_rows):
                    if g != "":
                        moments.setdefault(g, Moments(int(keep.sum()))).add(
                            block[g_rows == g][:, keep])
        stats = {g: m.stats() for g, m in moments.items()}
    plan = repeat_plan(trials, stim_column="stim_file", average=params["average_test_repeats"])
    target = subject_dir(folder, label) / "X.npy"
    assembler = TrialAssembler(target, plan, (int(keep.sum()),),
                               average=params["average_test_repeats"])
    for f, start in zip(files, starts, strict=False):
        for rows, block in f.blocks():
            X = block[:, keep]
            if mode in ("run", "session"):
                g_rows = groups[rows + start]
                for g in pd.unique(g_rows):
                    X[g_rows == g] = apply_voxel_stats(X[g_rows == g], stats[g])
            elif mode == "train":
                X = apply_voxel_stats(X, stats["train"])
            assembler.add(rows + start, X)
        f.path.unlink()
    out_trials = assembler.close()
    inside_kept = inside.copy()
    inside_kept[inside] = keep
    mask_img = nib.Nifti1Image(inside_kept.astype(np.uint8), ref.affine)
    recipe["subjects"][label] = {
        "n_voxels": int(keep.sum()), "n_trials": int(plan.n_out),
        "voxel_size": [round(float(z), 4) for z in ref.header.get_zooms()[:3]],
        "split_half": split_half_from_halves(*assembler.halves()),
        **recipe["subjects"].get(label, {}),
    }
    X = load_rows(target, in_memory=in_memory)
    logger.info("sub-%s: %d trials x %d voxels", label, *X.shape)
    return SubjectTrials(subject=label, X=X, trials=out_trials, mask_img=mask_img,
                         voxel_stats=stats.get("train"))


def _subject_grid(path: Path, params: dict):
    """The voxel grid (lazy header) and analysis mask of a subject's first file."""
    img = open_4d(path, what="image")
    return _grid(img), _brain_mask(img, params, data_path=path)


def _by_subject(items, key) -> dict[str, list]:
    out: dict[str, list] = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out


def preprocess_fmri(recordings, *, bids_root: str | Path, spec: EventSpec | None = None,
                    params: Mapping[str, Any] | None = None, out: str | Path | None = None,
                    n_jobs: int = 1, executor: str = "joblib", address: str | None = None,
                    verbose: bool | str | int | None = None) -> Preprocessed:
    """Single-trial voxel patterns from BIDS BOLD runs.

    Parameters
    ----------
    recordings : list of Recording
        BOLD runs from :func:`~neurorecon.pipelines.data.studies.find_recordings`
        (``modality="fmri"``); several subjects, sessions and runs.
    bids_root : path
        The BIDS root (stimulus paths are relative to ``<bids_root>/<spec.stim_dir>``).
    spec : EventSpec | None
        Which events columns hold the stimulus and the split (None: the BIDS defaults).
    params : mapping
        The ``preprocess.fmri`` options: ``glm`` (``lsa`` | ``lss``), ``hrf_model``,
        ``hrf_onset`` (s, or ``auto``: chosen per subject, :func:`hrf_fit`),
        ``drift_model``, ``high_pass`` (Hz), ``noise_model`` (``ar1`` | ``ols``), ``mask``
        (None: MNI152 brain mask, or an ROI NIfTI path), ``smoothing_fwhm`` (mm),
        ``zscore`` (``run`` | ``session`` | ``train`` | ``none``), ``average_test_repeats``.
    out : path | None
        Folder to write the arrays into (visible to every worker); None: a temporary one,
        the arrays are returned in memory.
    n_jobs, executor, address : int, str, str | None
        GLM workers over runs (``-1``: every core), ``joblib`` | ``ray``, a Ray address.
    verbose : bool | str | int | None
        Log level for this call.

    Returns
    -------
    Preprocessed
        Modality ``"fmri"``; per subject ``X`` ``(n_trials, n_voxels)`` float32, the trials
        table (subject, session, run, onset, stim_file, split, n_repeats, event columns) and
        the mask; ``recipe`` holds the options and per-subject n_voxels, voxel size, TR, HRF
        delay and, with ``hrf_onset: auto``, each delay's variance explained.

    Raises
    ------
    DataError
        Naming the file: missing sidecar or ``RepetitionTime``, image not 4D, NaNs, events
        outside the run, missing stimulus column or image, mask/data grid mismatch.
    """
    from ..common.parallel import map_tasks

    spec = EventSpec() if spec is None else spec
    bids_root = Path(bids_root)
    with log_level(verbose), output_folder(out) as (folder, in_memory):
        params = fmri_params(params)
        recipe: dict[str, Any] = {"input": "bold", "space": "MNI152", **params, "subjects": {}}
        scratch = folder / ".parts"
        scratch.mkdir(parents=True, exist_ok=True)
        grids, items = {}, []
        for label, recs in _by_subject(recordings, lambda r: r.subject).items():
            ref, inside = grids[label] = _subject_grid(recs[0].fpath, params)
            items += [{"recording": rec, "bids_root": bids_root, "spec": spec,
                       "params": params, "inside": inside,
                       "ref_affine": ref.affine, "first": recs[0].fpath.name}
                      for rec in recs]
        if params["hrf_onset"] == "auto":  # each subject's delay, then its GLM with it
            fits = map_tasks(hrf_fit, items, n_jobs=n_jobs, executor=executor,
                             address=address, desc="fMRI runs (HRF delay)")
            for label, pairs in _by_subject(zip(items, fits, strict=True),
                                            lambda p: p[0]["recording"].subject).items():
                chosen = recipe["subjects"][label] = choose_hrf_onset([f for _, f in pairs])
                logger.info("sub-%s: HRF delay %+g s (share of the variance the mean evoked "
                            "response explains, per delay: %s)", label, chosen["hrf_onset"],
                            ", ".join(f"{k}: {v:.4f}" for k, v in chosen["hrf_onset_r2"].items()))
                for item, _ in pairs:
                    item["params"] = {**params, "hrf_onset": chosen["hrf_onset"]}
        else:
            for label in grids:
                recipe["subjects"][label] = {"hrf_onset": float(params["hrf_onset"])}
        items = [{**item, "path": scratch / f"{k:05d}.npy"} for k, item in enumerate(items)]
        done = map_tasks(glm_to_file, items, n_jobs=n_jobs, executor=executor,
                         address=address, desc="fMRI runs (GLM)")
        subjects = {}
        for label, pairs in _by_subject(zip(items, done, strict=True),
                                        lambda p: p[0]["recording"].subject).items():
            parts = [part for _, part in pairs]
            trs = sorted({p.tr for p in parts})
            recipe["subjects"][label] = {"tr": trs[0] if len(trs) == 1 else trs,
                                         "n_runs": len(parts),
                                         **recipe["subjects"].get(label, {})}
            ref, inside = grids[label]
            subjects[label] = _assemble_subject(label, parts, folder, inside=inside, ref=ref,
                                                params=params, recipe=recipe,
                                                in_memory=in_memory)
        shutil.rmtree(scratch)
        return Preprocessed(modality="fmri", subjects=subjects, recipe=recipe)


# ----------------------------------------------------------------------------- betas input


def find_betas(root: str | Path, pattern: str) -> list[tuple[Path, Path, str]]:
    """Precomputed single-trial betas under ``root``: ``[(img_path, trials_path, subject)]``.

    ``pattern`` is a glob relative to ``root`` for the 4D ``*_betas.nii.gz`` images; each needs
    a trial table with the same stem, ``*_trials.tsv``, and a ``sub-<label>`` entity.
    """
    import mne_bids

    root = Path(root)
    if not root.is_dir():
        raise DataError("betas root does not exist or is not a directory", path=root)
    images = sorted(p for p in root.glob(pattern) if p.is_file())
    if not images:
        raise DataError(f"no betas images match {pattern!r}", path=root,
                        hint="set data.betas_glob to the glob of the *_betas.nii.gz files")
    out = []
    for img in images:
        if not img.name.endswith("_betas.nii.gz"):
            raise DataError("betas image names must end with '_betas.nii.gz'", path=img)
        trials = img.with_name(img.name.removesuffix("_betas.nii.gz") + "_trials.tsv")
        check_file(trials, what=f"trial table of {img.name}")
        subject = mne_bids.get_entities_from_fname(img.name, on_error="ignore").get("subject")
        if not subject:
            raise DataError("no 'sub-<label>' entity in the file name", path=img)
        out.append((img, trials, subject))
    return out


def read_trials(path: Path, *, n_volumes: int, image: Path, bids_root: Path,
                 spec: EventSpec) -> pd.DataFrame:
    table = read_tsv(path, what="trial table", columns=[spec.stim_column])
    if len(table) != n_volumes:
        raise DataError(f"{len(table)} trial rows but {image.name} has {n_volumes} volumes",
                        path=path, hint="one row per volume of the betas image, in order")
    if table[spec.stim_column].isna().any():
        raise DataError(f"empty values in column {spec.stim_column!r}", path=path)
    table[spec.stim_column] = table[spec.stim_column].astype(str)
    stim_root = bids_root / spec.stim_dir
    missing = sorted(s for s in table[spec.stim_column].unique() if not (stim_root / s).is_file())
    if missing:
        raise DataError(f"{len(missing)} stimulus image(s) do not exist under {stim_root}: "
                        + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""), path=path)
    if spec.split_column in table:
        table["split"] = np.where(table[spec.split_column].astype(str) == str(spec.test_value),
                                  "test", "train")
    elif "split" in table and table["split"].isin(["train", "test"]).all():
        pass
    else:
        raise DataError(f"no split column: need {spec.split_column!r} (test value "
                        f"{spec.test_value!r}) or 'split' (train/test)", path=path)
    return table


def load_betas(betas: Sequence[tuple[Path, Path, str]], *, bids_root: str | Path,
               spec: EventSpec | None = None, params: Mapping[str, Any] | None = None,
               out: str | Path | None = None, n_jobs: int = 1, executor: str = "joblib",
               address: str | None = None,
               verbose: bool | str | int | None = None) -> Preprocessed:
    """Load precomputed single-trial betas (from :func:`find_betas`) into the fMRI contract.

    NSD-shaped input: one 4D file per session (one volume per trial) with its trial table.
    Each file is read a block of volumes at a time and masked on load
    (:func:`load_masked_4d`), so no session's full volume, let alone all of them, is held;
    files are read by ``n_jobs`` workers and streamed into ``X.npy`` per subject.

    Parameters
    ----------
    betas : list of (img_path, trials_path, subject)
        4D betas images (one volume per trial) and their trial tables.
    bids_root : path
        Root the stimulus paths are relative to (``<bids_root>/<spec.stim_dir>``).
    spec : EventSpec | None
        Stimulus and split columns of the trial tables (None: the BIDS defaults).
    params : mapping
        ``preprocess.fmri`` options; ``mask``, ``zscore`` (``run``: per ``run`` column when
        present, else per file; ``session``: per ``session`` column, else the file name's
        ``ses-`` entity; ``train``; ``none``) and ``average_test_repeats`` apply.
    out, n_jobs, executor, address : see :func:`preprocess_fmri`.
    verbose : bool | str | int | None
        Log level for this call.

    Returns
    -------
    Preprocessed
        As :func:`preprocess_fmri`, with ``recipe["input"] == "betas"``.
    """
    from ..common.parallel import map_tasks

    spec = EventSpec() if spec is None else spec
    bids_root = Path(bids_root)
    with log_level(verbose), output_folder(out) as (folder, in_memory):
        params = fmri_params(params)
        recipe: dict[str, Any] = {"input": "betas", **params, "subjects": {}}
        scratch = folder / ".parts"
        scratch.mkdir(parents=True, exist_ok=True)
        grids, items = {}, []
        for label, files in _by_subject(betas, lambda b: b[2]).items():
            ref, inside = grids[label] = _subject_grid(Path(files[0][0]), params)
            items += [{"img_path": Path(img), "trials_path": Path(tsv), "index": k,
                       "subject": label, "bids_root": bids_root, "spec": spec,
                       "params": params, "inside": inside,
                       "ref_affine": ref.affine, "first": Path(files[0][0]).name,
                       "path": scratch / f"{len(items) + k:05d}.npy"}
                      for k, (img, tsv, _) in enumerate(files)]
        done = map_tasks(betas_to_file, items, n_jobs=n_jobs, executor=executor,
                         address=address, desc="fMRI betas files")
        subjects = {}
        for label, pairs in _by_subject(zip(items, done, strict=True),
                                        lambda p: p[0]["subject"]).items():
            ref, inside = grids[label]
            subjects[label] = _assemble_subject(label, [part for _, part in pairs], folder,
                                                inside=inside, ref=ref, params=params,
                                                recipe=recipe, in_memory=in_memory)
        shutil.rmtree(scratch)
        return Preprocessed(modality="fmri", subjects=subjects, recipe=recipe)


# ----------------------------------------------------------------------------- summaries


def split_half_reliability(X: np.ndarray, trials: pd.DataFrame, *,
                           stim_column: str = "stim_file") -> dict[str, Any]:
    """Split-half reliability of the test patterns (before repeats are averaged).

    Repeats of each test stimulus are split into two halves (alternating in presentation
    order) and averaged per half. Reported: ``voxel_r_median`` (median over voxels of the
    correlation across stimuli between halves), ``pattern_r_same`` / ``pattern_r_other``
    (mean correlation of a stimulus' half-A pattern with its own / other stimuli's half-B
    patterns, patterns centred across stimuli), ``identification`` (fraction of half-A patterns
    whose best half-B match is their own stimulus) and its ``chance``. ``None`` values when
    fewer than 3 test stimuli have 2 or more repeats.
    """
    test = trials.reset_index(drop=True)
    test = test[test["split"] == "test"]
    halves_a, halves_b = [], []
    for _, g in test.groupby(stim_column, sort=True):
        if len(g) >= 2:
            idx = g.index.to_numpy()
            halves_a.append(X[idx[0::2]].mean(axis=0))
            halves_b.append(X[idx[1::2]].mean(axis=0))
    return split_half_from_halves(np.asarray(halves_a), np.asarray(halves_b))


def split_half_from_halves(A: np.ndarray, B: np.ndarray) -> dict[str, Any]:
    """:func:`split_half_reliability` from the half means ``(n_stimuli, n_voxels)`` of the
    test stimuli (as :meth:`~.store.TrialAssembler.halves` accumulates them)."""
    out: dict[str, Any] = {"n_stimuli": len(A), "voxel_r_median": None,
                           "pattern_r_same": None, "pattern_r_other": None,
                           "identification": None, "chance": None}
    if len(A) < 3:
        return out
    A = np.asarray(A, np.float64)
    B = np.asarray(B, np.float64)
    A = A - A.mean(axis=0)
    B = B - B.mean(axis=0)
    den = np.sqrt((A**2).sum(0) * (B**2).sum(0))
    voxel_r = np.where(den > 0, (A * B).sum(0) / np.where(den > 0, den, 1), 0.0)
    An = A / (np.linalg.norm(A, axis=1, keepdims=True) + 1e-12)
    Bn = B / (np.linalg.norm(B, axis=1, keepdims=True) + 1e-12)
    C = An @ Bn.T
    n = len(C)
    out.update(
        voxel_r_median=float(np.median(voxel_r)),
        pattern_r_same=float(np.diag(C).mean()),
        pattern_r_other=float(C[~np.eye(n, dtype=bool)].mean()),
        identification=float((C.argmax(axis=1) == np.arange(n)).mean()),
        chance=1.0 / n,
    )
    return out


def fmri_summary(pre: Preprocessed) -> dict[str, dict[str, Any]]:
    """Per-subject counts and test-pattern reliability of a preprocessed fMRI dataset.

    Returns ``{subject: {"n_trials", "n_train", "n_test", "n_voxels", "test_repeats",
    "split_half": {...}}}``; ``split_half`` (see :func:`split_half_reliability`) comes from the
    recipe, where it was computed before repeats were averaged, or from ``X`` when the test
    repeats are still separate.
    """
    if pre.modality != "fmri":
        raise ValueError(f"fmri_summary needs fMRI data, got modality {pre.modality!r}")
    out = {}
    for label, sub in pre.subjects.items():
        trials = sub.trials
        is_test = (trials["split"] == "test").to_numpy()
        reps = trials["n_repeats"] if "n_repeats" in trials else pd.Series(1, index=trials.index)
        stored = pre.recipe.get("subjects", {}).get(label, {}).get("split_half")
        out[label] = {
            "n_trials": int(len(trials)),
            "n_train": int((~is_test).sum()),
            "n_test": int(is_test.sum()),
            "n_voxels": int(sub.X.shape[1]),
            "test_repeats": float(reps[is_test].mean()) if is_test.any() else 0.0,
            "split_half": stored if stored is not None else split_half_reliability(
                np.asarray(sub.X), trials),
        }
    return out
