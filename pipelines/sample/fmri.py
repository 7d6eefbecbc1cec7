"""Simulated event-related fMRI of the sample dataset, written as BIDS (``func/*_bold.nii.gz``).

Each subject is scanned in MNI space on nilearn's MNI152 brain mask, resampled to that subject's
voxel size (so subjects have different voxel counts). The BOLD signal of a run is

``baseline * (1 + (signal + drift + noise) / 100)`` with ``signal = sum_t hrf_t(time) * a_t``,

where ``hrf_t`` is the HRF-convolved boxcar of trial ``t`` (nilearn's design matrix) and the
single-trial amplitude pattern ``a_t`` (percent signal change) holds:

- a generic visual response in occipital (MNI ``y < -70``) and ventral temporal voxels;
- occipital voxels: a smooth, voxel-specific linear tuning to the low-level image features
  ``ll0..ll9`` of the stimulus table;
- ventral temporal voxels: the stimulus' concept code (a random code per concept drawn from
  ``seed`` and shared by all subjects) read out through subject-specific smooth voxel weights;
- trial-to-trial variability: a random gain per trial and a random per-voxel pattern.

Noise is spatially smoothed AR(1) noise plus slow cosine drifts (nilearn's drift regressors).
The stimulus reaches the data only through ``a_t``: the noise generators are seeded per
(subject, run) and never see the stimulus order. ``cfg.snr`` scales the stimulus-driven part;
``cfg.hrf_onset`` delays the HRF, ``cfg.lowlevel_gain`` / ``cfg.concept_gain`` scale the two
tuned responses and ``cfg.noise`` / ``noise_ar`` / ``noise_fwhm`` shape the noise (the
randomized family draws them, :mod:`.family`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from neurorecon.models.common.logging import logger, progress

from .bids_meta import describe_dataset, events_sidecar, fmri_sidecar
from .stimuli import trial_sequence

TASK = "images"
BASELINE = 1000.0  # mean BOLD intensity in brain voxels (arbitrary scanner units)
FEATURES = [f"ll{j}" for j in range(10)]

# response model, in percent signal change of a single trial's HRF peak (before cfg.snr)
EVOKED = 1.0  # generic visual response (occipital; 0.6x in ventral temporal)
LOWLEVEL = 1.5  # std across stimuli of the low-level feature response (x cfg.lowlevel_gain)
CONCEPT = 1.5  # std across concepts of the concept response (x cfg.concept_gain)
TRIAL_GAIN = 0.25  # std of the log gain of a trial (all stimulus-driven responses)
TRIAL_PATTERN = 0.4  # std of the per-trial, per-voxel response variability (visual voxels)
N_CODE = 8  # dimension of the shared concept code
WEIGHT_FWHM = 10.0  # mm, smoothness of voxel tuning weights

# noise model (besides cfg.noise, cfg.noise_ar and cfg.noise_fwhm)
DRIFT = 0.8  # percent, std of each slow cosine drift coefficient
LEAD_IN = 6.0  # s before the first image
TAIL = 16.0  # s after the last image ends


def _seed(seed: int, *keys: int) -> np.random.Generator:
    """An independent generator for one purpose (keys: stream tag, subject, run)."""
    return np.random.default_rng([int(seed), *keys])


def _template_space(voxel_size: float):
    """MNI152 brain mask and a BOLD-like baseline image on an isotropic ``voxel_size`` grid."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template
    from nilearn.image import resample_img, resample_to_img

    mask = resample_img(load_mni152_brain_mask(resolution=2),
                        target_affine=np.diag([float(voxel_size)] * 3), interpolation="nearest")
    template = resample_to_img(load_mni152_template(resolution=2), mask,
                               interpolation="continuous")
    return mask, template


def _smooth_fields(rng: np.random.Generator, n: int, mask, fwhm: float) -> np.ndarray:
    """``n`` spatially smooth Gaussian fields on ``mask`` voxels, unit std: ``(n, n_voxels)``."""
    import nibabel as nib
    from nilearn.image import smooth_img
    from nilearn.masking import apply_mask

    white = rng.standard_normal((*mask.shape, n)).astype(np.float32)
    fields = apply_mask(smooth_img(nib.Nifti1Image(white, mask.affine), fwhm), mask)
    return fields / fields.std(axis=1, keepdims=True)


def _trial_regressors(onsets: np.ndarray, *, duration: float, frame_times: np.ndarray,
                      hrf_delay: float = 0.0) -> np.ndarray:
    """HRF-convolved boxcar of each trial (Glover HRF delayed by ``hrf_delay`` s),
    peak-normalized: ``(n_scans, n_trials)``."""
    from nilearn.glm.first_level import make_first_level_design_matrix

    from ..preprocess.fmri import DelayedHrf

    names = [f"t{i:04d}" for i in range(len(onsets))]
    events = pd.DataFrame({"onset": onsets, "duration": duration, "trial_type": names})
    dm = make_first_level_design_matrix(frame_times, events,
                                        hrf_model=DelayedHrf("glover", hrf_delay),
                                        drift_model=None)
    reg = dm[[f"{n}_hrf" for n in names]].to_numpy()
    return reg / reg.max(axis=0, keepdims=True)


def _write_run(bids_path, data: np.ndarray, mask, *, tr: float, events: pd.DataFrame) -> None:
    import nibabel as nib
    from nilearn.masking import unmask

    vol = np.rint(unmask(data, mask).get_fdata(dtype=np.float32))
    img = nib.Nifti1Image(np.clip(vol, 0, np.iinfo(np.int16).max).astype(np.int16), mask.affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((*img.header.get_zooms()[:3], tr))
    bids_path.mkdir()
    nib.save(img, bids_path.fpath)
    sidecar = bids_path.copy().update(extension=".json")
    sidecar.fpath.write_text(json.dumps(fmri_sidecar(tr=tr, task=TASK), indent=2))
    events_path = bids_path.copy().update(suffix="events", extension=".tsv")
    events.to_csv(events_path.fpath, sep="\t", index=False, float_format="%.3f")
    events_path.update(extension=".json").fpath.write_text(json.dumps(events_sidecar(),
                                                                      indent=2))


def simulate_fmri_bids(root: str | Path, stimuli: pd.DataFrame, *, cfg, seed: int,
                       n_test_repeats: int) -> None:
    """Write the simulated fMRI BIDS dataset into ``root`` (``root/stimuli`` already exists).

    Parameters
    ----------
    root : path
        BIDS root to write ``sub-XX/func/*`` and the top-level files into.
    stimuli : DataFrame
        Stimulus table of :func:`~neurorecon.pipelines.sample.stimuli.make_stimuli`
        (``stim_file``, ``concept``, ``split``, ``ll0..ll9``).
    cfg : mapping
        The ``sample.fmri`` config: ``n_subjects``, ``n_runs``, ``voxel_sizes`` (mm, cycled over
        subjects), ``tr`` (s), ``soa`` (``[min, max]`` s), ``image_duration`` (s), ``snr``,
        ``hrf_onset`` (s), ``lowlevel_gain``, ``concept_gain``, ``noise`` (percent),
        ``noise_ar``, ``noise_fwhm`` (mm).
    seed : int
        Seed of everything random; the concept code depends on it alone (shared by subjects).
    n_test_repeats : int
        Presentations of each test exemplar per subject.
    """
    import mne_bids
    from nibabel.affines import apply_affine
    from nilearn.masking import apply_mask
    from scipy.signal import lfilter

    root = Path(root)
    tr = float(cfg.tr)
    soa_min, soa_max = (float(v) for v in cfg.soa)
    duration = float(cfg.image_duration)
    snr = float(cfg.snr)
    noise_sd, noise_ar = float(cfg.noise), float(cfg.noise_ar)
    if not 0 < soa_min <= soa_max:
        raise ValueError(f"sample.fmri.soa must be 0 < min <= max, got {list(cfg.soa)}")
    concepts = list(dict.fromkeys(stimuli["concept"]))
    code = _seed(seed, 1).standard_normal((len(concepts), N_CODE))  # shared across subjects
    code_of = dict(zip(concepts, code, strict=True))
    participants = []
    for s in progress(range(int(cfg.n_subjects)), desc="fMRI subjects"):
        subject = f"{s + 1:02d}"
        voxel_size = float(cfg.voxel_sizes[s % len(cfg.voxel_sizes)])
        mask, template = _template_space(voxel_size)
        xyz = apply_affine(mask.affine, np.argwhere(mask.get_fdata() > 0))
        t_val = apply_mask(template, mask)
        baseline = BASELINE * (0.75 + 0.25 * t_val / t_val.mean())
        occipital = xyz[:, 1] < -70
        ventral = ((xyz[:, 1] >= -70) & (xyz[:, 1] <= -25) & (xyz[:, 2] >= -32)
                   & (xyz[:, 2] <= -2) & (np.abs(xyz[:, 0]) >= 18) & (np.abs(xyz[:, 0]) <= 56))
        # subject-specific smooth tuning: low-level (occipital), concept readout (ventral)
        rng_w = _seed(seed, 2, s)
        fields = _smooth_fields(rng_w, 1 + len(FEATURES) + N_CODE, mask, WEIGHT_FWHM)
        evoked = EVOKED * (1 + 0.3 * fields[0]) * (occipital + 0.6 * ventral)
        w_ll = (fields[1 : 1 + len(FEATURES)] * occipital * LOWLEVEL
                * float(cfg.lowlevel_gain) / np.sqrt(len(FEATURES)))
        w_c = (fields[1 + len(FEATURES) :] * ventral * CONCEPT * float(cfg.concept_gain)
               / np.sqrt(N_CODE))
        visual = (occipital | ventral).astype(np.float32)
        feats = stimuli.set_index("stim_file")[FEATURES]
        runs = trial_sequence(stimuli, n_test_repeats=n_test_repeats, n_runs=int(cfg.n_runs),
                              rng=_seed(seed, 3, s))
        for r, run_stim in enumerate(runs):
            n = len(run_stim)
            rng_t = _seed(seed, 4, s, r)  # timing and trial variability: by position only
            onsets = LEAD_IN + np.concatenate([[0.0], np.cumsum(rng_t.uniform(soa_min, soa_max,
                                                                                n - 1))])
            n_scans = int(np.ceil((onsets[-1] + duration + TAIL) / tr))
            frame_times = np.arange(n_scans) * tr
            gain = np.exp(TRIAL_GAIN * rng_t.standard_normal(n))[:, None]
            jitter = TRIAL_PATTERN * rng_t.standard_normal((n, len(baseline))) * visual
            stim_drive = (feats.loc[run_stim["stim_file"]].to_numpy() @ w_ll
                          + np.stack([code_of[c] for c in run_stim["concept"]]) @ w_c)
            amplitude = snr * (gain * (evoked + stim_drive) + jitter)
            hrf = _trial_regressors(onsets, duration=duration, frame_times=frame_times,
                                    hrf_delay=float(cfg.hrf_onset))
            signal = hrf @ amplitude
            # noise: spatially smooth AR(1) + slow cosine drifts, independent of the stimuli
            rng_n = _seed(seed, 5, s, r)
            noise = _smooth_fields(rng_n, n_scans, mask, float(cfg.noise_fwhm))
            noise = lfilter([np.sqrt(1 - noise_ar**2)], [1, -noise_ar], noise, axis=0)
            cosines = _drift_regressors(frame_times)
            drift = cosines @ (DRIFT * rng_n.standard_normal((cosines.shape[1], len(baseline))))
            bold = baseline * (1 + (signal + noise_sd * noise + drift) / 100)
            events = pd.DataFrame({
                "onset": onsets, "duration": duration,
                "trial_type": run_stim["split"].to_numpy(),
                "stim_file": run_stim["stim_file"].to_numpy(),
            })
            path = mne_bids.BIDSPath(root=root, subject=subject, task=TASK, run=f"{r + 1:02d}",
                                     datatype="func", suffix="bold", extension=".nii.gz",
                                     check=False)
            _write_run(path, bold.astype(np.float32), mask, tr=tr, events=events)
        participants.append({"participant_id": f"sub-{subject}", "voxel_size_mm": voxel_size,
                             "n_voxels": int(len(baseline))})
        logger.info("sample fMRI: sub-%s, %d runs, %d voxels of %g mm", subject, len(runs),
                    len(baseline), voxel_size)
    describe_dataset(root, name="neurorecon sample fMRI (simulated)", seed=seed,
                     params={"fmri": OmegaConf.to_container(cfg, resolve=True)})
    pd.DataFrame(participants).to_csv(root / "participants.tsv", sep="\t", index=False)
    (root / "participants.json").write_text(json.dumps({
        "participant_id": {"Description": "Unique participant identifier"},
        "voxel_size_mm": {"Description": "Isotropic voxel size of the subject's scans",
                          "Units": "mm"},
        "n_voxels": {"Description": "Brain voxels (MNI152 mask at that voxel size)"},
    }, indent=2))


def _drift_regressors(frame_times: np.ndarray) -> np.ndarray:
    """Slow cosine drifts (nilearn's drift model, 1/128 Hz cut-off), unit std: ``(n_scans, k)``."""
    from nilearn.glm.first_level import make_first_level_design_matrix

    dm = make_first_level_design_matrix(frame_times, None, drift_model="cosine",
                                        high_pass=1 / 128)
    cosines = dm.drop(columns="constant").to_numpy()
    return cosines / cosines.std(axis=0, keepdims=True)
