"""fMRI voxel weights: each subject's voxel relevance, and a new subject's region prior.

With a few hundred trials (a new participant: a few dozen) and tens of thousands of voxels,
most of them outside the regions that respond to images, a subject's principal axes, and the
adapter on them, are set by noise. So each subject's voxel relevance is measured on its train
trials (:func:`voxel_relevance`: the cross-validated share of each voxel's response that the
stimulus embedding predicts, a voxel-wise encoding model as in Kay et al. 2008), and its
voxels are weighted by it (:func:`voxel_scale`, the subspace adapter's ``scale``:
:class:`~neurorecon.models.fmri.encoder.SubspaceProjection`). The relevance is kept with the
adapter. What trained subjects share is *where* the stimulus is carried (the regions;
MindEye's group-level ``nsdgeneral`` ROI is such a map), not their voxel patterns: a new
subject of a trained model also gets the trained subjects' maps, taken to MNI space through
their masks, resampled onto its grid and averaged (:class:`RegionPrior`), mixed with its own
by its number of trials.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neurorecon.models.common.logging import logger

#: principal components of the stimulus embeddings the voxel encoding model predicts from
N_COMPONENTS = 16
#: cross-validation folds of the encoding model (trials in turn)
FOLDS = 5
#: ridge penalty of the encoding model (components at unit variance)
ALPHA = 10.0
#: mm, smoothing of a relevance map on the subject's grid
SMOOTHING_FWHM = 6.0
#: train trials at which a new subject's own relevance map counts as much as the region prior
PRIOR_TRIALS = 100


def voxel_relevance(blocks: Callable[[], Iterable[np.ndarray]], targets: np.ndarray, *,
                    n_components: int = N_COMPONENTS, folds: int = FOLDS,
                    alpha: float = ALPHA) -> np.ndarray:
    """Each voxel's cross-validated encoding R² (clipped at 0), ``(n_voxels,)`` float32.

    ``blocks()`` yields a subject's trials ``(rows, n_voxels)`` block by block (re-readable:
    two passes, nothing held but sums), ``targets`` ``(n_trials, dim)`` their stimulus
    embeddings in the same order. The embeddings' top ``n_components`` principal components
    (at unit variance) predict every voxel by ridge (``alpha``) fitted on the other folds
    (trial ``i`` is in fold ``i % folds``); the share of the voxel's variance the held-out
    predictions explain is its relevance. Fewer than ``2 * folds`` trials, or targets that do
    not vary: zeros (not measured).
    """
    Y = np.asarray(targets, np.float64)
    n = len(Y)
    Y = Y - Y.mean(0)
    _, svals, vt = np.linalg.svd(Y, full_matrices=False)
    if n < 2 * folds or not svals[0] > 0:  # too few trials, or one image for all of them
        first = next(iter(blocks()))
        return np.zeros(np.shape(first)[1], np.float32)
    m = max(1, min(n_components, int((svals > svals[0] * 1e-6).sum())))
    Y = Y @ vt[:m].T / (svals[:m] / np.sqrt(n - 1))
    Y = np.hstack([Y, np.ones((n, 1))])  # the intercept, unpenalised
    fold = np.arange(n) % folds

    def passes():
        start = 0
        for block in blocks():
            block = np.asarray(block, np.float64)
            rows = slice(start, start + len(block))
            start += len(block)
            yield block, Y[rows], fold[rows]

    gram = np.zeros((folds, m + 1, m + 1))
    cross: np.ndarray | None = None
    total = sq = None
    for X, y, f in passes():
        if cross is None:
            cross = np.zeros((folds, m + 1, X.shape[1]))
            total, sq = np.zeros(X.shape[1]), np.zeros(X.shape[1])
        for k in np.unique(f):
            gram[k] += y[f == k].T @ y[f == k]
            cross[k] += y[f == k].T @ X[f == k]
        total += X.sum(0)
        sq += (X * X).sum(0)
    penalty = alpha * np.diag([1.0] * m + [0.0])
    weights = [np.linalg.solve(gram.sum(0) - gram[k] + penalty, cross.sum(0) - cross[k])
               for k in range(folds)]
    sse = np.zeros_like(total)
    for X, y, f in passes():
        for k in np.unique(f):
            sse += ((X[f == k] - y[f == k] @ weights[k]) ** 2).sum(0)
    sst = sq - total**2 / n
    r2 = np.where(sst > 0, 1 - sse / np.where(sst > 0, sst, 1), 0.0)
    return np.clip(r2, 0, None).astype(np.float32)


@dataclass
class RegionPrior:
    """The trained subjects' voxel relevance maps (NIfTI images in their own grids, MNI space),
    from which a new subject's voxel weights are made (:func:`voxel_scale`)."""

    maps: dict[str, Any]
    _on: dict = field(default_factory=dict, repr=False, compare=False)  # mask -> relevance_on

    @classmethod
    def of(cls, nets: Mapping[str, Any], masks: Mapping[str, Any]) -> RegionPrior | None:
        """The prior of the subjects ``masks`` names (their mask images), each subject's
        relevance read from its model in ``nets`` (label → encoder); None where no subject's
        relevance was measured (a bundle saved before it was, or a non-subspace adapter)."""
        from nilearn.masking import unmask

        maps = {}
        for label, mask in masks.items():
            net = nets.get(label)
            relevance = (net.voxel_relevance(label) if hasattr(net, "voxel_relevance")
                         and label in net.subjects else None)
            if relevance is not None:
                maps[label] = unmask(relevance.detach().cpu().numpy(), mask)
        return cls(maps) if maps else None

    @property
    def subjects(self) -> list[str]:
        return list(self.maps)

    def relevance_on(self, mask_img) -> np.ndarray:
        """The trained subjects' mean relevance on ``mask_img``'s voxels (each map resampled
        onto its grid, averaged, smoothed by :data:`SMOOTHING_FWHM`), ``(n_voxels,)``;
        computed once per mask (a new subject's adapter is fitted for each way, fraction and
        seed, and again for a refit)."""
        import nibabel as nib
        from nilearn.image import resample_to_img, smooth_img
        from nilearn.masking import apply_mask

        from ..preprocess.fmri import same_grid

        key = (mask_img.shape, np.asarray(mask_img.affine).tobytes(),
               hashlib.sha1(np.ascontiguousarray(mask_img.dataobj)).hexdigest())
        if key not in self._on:
            mean = np.mean([np.asarray((img if same_grid(img, mask_img) else resample_to_img(
                img, mask_img, interpolation="continuous", force_resample=True,
                copy_header=True)).get_fdata()) for img in self.maps.values()], axis=0)
            smooth = smooth_img(nib.Nifti1Image(np.nan_to_num(mean).astype(np.float32),
                                                mask_img.affine), SMOOTHING_FWHM)
            self._on[key] = np.clip(apply_mask(smooth, mask_img), 0, None)
        return self._on[key]


def voxel_scale(relevance: np.ndarray | None, mask_img, *, prior: RegionPrior | None = None,
                n_trials: int = 0) -> np.ndarray | None:
    """A subject's voxel weights (the subspace adapter's ``scale``) on its mask ``mask_img``:
    the square root of a relevance map (a kernel weighted by it), scaled to mean square 1.

    The map is the subject's own ``relevance`` (:func:`voxel_relevance` on its ``n_trials``
    train trials) smoothed on its grid, and, for a new subject of a trained model, the
    ``prior`` mixed in, each normalised to mean 1: the own map's share is
    ``n_trials / (n_trials + PRIOR_TRIALS)``, so a few dozen trials lean on where the trained
    subjects responded and a full session on the subject's own map. None where neither map
    has a voxel above 0 (the voxels unweighted)."""
    from nilearn.masking import unmask

    maps = []
    if relevance is not None and np.any(relevance):
        own = RegionPrior({"own": unmask(np.asarray(relevance, np.float32), mask_img)})
        maps.append((float(n_trials), own.relevance_on(mask_img)))
    if prior is not None:
        maps.append((float(PRIOR_TRIALS), prior.relevance_on(mask_img)))
    maps = [(w, p / p.mean()) for w, p in maps if p.any()]
    if not maps:
        return None
    mixed = sum(w * p for w, p in maps) / sum(w for w, _ in maps)
    return np.sqrt(mixed / mixed.mean()).astype(np.float32)


def voxel_weighting(cfg) -> bool:
    """``voxel_weights.fmri`` (default true): each fMRI subject's voxels weighted by their
    relevance (:func:`voxel_scale`)."""
    return bool((cfg.get("voxel_weights") or {}).get("fmri", True))


def new_subject_prior(cfg, nets: Mapping[str, Any], masks: Mapping[str, Any]
                      ) -> RegionPrior | None:
    """The region prior new fMRI subjects of a model get (:class:`RegionPrior`, from the
    trained subjects ``masks`` names and their models ``nets``), or None: switched off
    (``region_prior.fmri=false``), or no trained subject's relevance measured."""
    if not bool((cfg.get("region_prior") or {}).get("fmri", True)):
        return None
    prior = RegionPrior.of(nets, masks)
    if prior is None:
        logger.info("fMRI: the trained model holds no voxel relevance (saved before it was "
                    "measured): new subjects get no region prior")
    return prior
