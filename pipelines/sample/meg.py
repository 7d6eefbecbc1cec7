"""Simulated MEG of the sample dataset, written as BIDS with mne-bids.

Physics: real CTF-275 sensor geometry (``mne.channels.read_meg_canonical_info``), a spherical
head model and a volume source space, and MNE's forward solution (``make_forward_solution``).
Each source gets a fixed tangential orientation (radial dipoles are silent in a sphere), so the
gain is ``G[:, s] = G_free[:, s] @ ori[s]``. Sensor data = gain @ source time courses (cheap;
``mne.simulation.simulate_raw`` would allocate tens of GB on recordings this long).

Neural model per trial (image onset at t=0):

* an onset response in posterior (occipital) sources, the same for every image;
* an early component (peak ~110 ms) in posterior sources whose amplitude is a subject-specific
  linear map of the image's low-level statistics (``ll0..ll9`` from :mod:`.stimuli`);
* a later, sustained component (~180-450 ms) in ventral temporal sources driven by a concept
  code shared across subjects through subject-specific source weights;
* an offset response when the image disappears;
* trial-to-trial latency jitter and amplitude variability.

Noise: 1/f brain background from random sources, bursty posterior alpha (8-12 Hz), sensor
white + 1/f noise, line noise with harmonics, and slow drift. Stimulus identity reaches the
sensors only through the neural response: the trigger channel carries the same code for every
image, the noise generator is independent of the stimulus order, and trial order is shuffled.
"""

from __future__ import annotations

from pathlib import Path

import mne
import mne_bids
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from neurorecon.models.common.logging import logger, progress

from .stimuli import trial_sequence

TASK = "images"
STIM_CHANNEL = "UPPT001"  # CTF trigger channel name
EVENT_ID = {"train": 1, "test": 2}
N_CODE = 16  # dimension of the shared concept code

# typical magnitudes (tesla)
EVOKED_SENSOR_RMS = 120e-15  # at the peak of the evoked response, snr=1
BRAIN_NOISE_RMS = 250e-15
ALPHA_RMS = 120e-15
SENSOR_NOISE_RMS = 60e-15
LINE_NOISE_AMP = 150e-15
DRIFT_RMS = 800e-15


def _gamma_bump(t: np.ndarray, peak: float, width: float) -> np.ndarray:
    """A smooth unimodal waveform peaking at ``peak`` s (zero before onset)."""
    k = (peak / width) ** 2
    theta = width**2 / peak
    x = np.clip(t, 0, None) / theta
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(t > 0, np.exp((k - 1) * np.log(np.maximum(x, 1e-12)) - x), 0.0)
    return y / (y.max() + 1e-30)


def _pink_noise(rng: np.random.Generator, n_signals: int, n_times: int, exponent=1.0):
    """Gaussian noise with a 1/f**exponent power spectrum, unit std per row."""
    from scipy import fft

    n_fft = fft.next_fast_len(n_times, real=True)
    n_freq = n_fft // 2 + 1
    spec = rng.standard_normal((n_signals, n_freq)) + 1j * rng.standard_normal((n_signals, n_freq))
    f = np.arange(n_freq, dtype=float)
    f[0] = 1.0
    spec *= f ** (-exponent / 2)
    spec[:, 0] = 0
    x = fft.irfft(spec, n=n_fft, axis=-1, workers=-1)[:, :n_times]
    return x / x.std(axis=1, keepdims=True)


def _sinusoids(amp: np.ndarray, freq: float, phase: np.ndarray, times: np.ndarray) -> np.ndarray:
    """``amp * sin(2 pi freq t + phase)`` per row, as two outer products (fast)."""
    w = 2 * np.pi * freq * times
    return (amp * np.cos(phase)) * np.sin(w)[None] + (amp * np.sin(phase)) * np.cos(w)[None]


def _head_transform(rng: np.random.Generator) -> mne.transforms.Transform:
    """A plausible device->head transform: a few mm shift and a few degrees of rotation."""
    from scipy.spatial.transform import Rotation

    rot = Rotation.from_euler("xyz", rng.normal(0, 3, 3), degrees=True).as_matrix()
    trans = np.eye(4)
    trans[:3, :3] = rot
    trans[:3, 3] = rng.normal(0, 0.003, 3) + np.array([0.0, 0.0, 0.006])
    return mne.transforms.Transform("meg", "head", trans)


def _subject_model(info: mne.Info, rng: np.random.Generator, n_features: int, code_dim: int):
    """Forward model and source maps of one simulated subject."""
    sphere = mne.make_sphere_model(r0=(0.0, 0.0, 0.0), head_radius=0.085, verbose=False)
    src = mne.setup_volume_source_space(sphere=sphere, pos=12.0, mindist=5.0, verbose=False)
    fwd = mne.make_forward_solution(info, trans=None, src=src, bem=sphere, meg=True, eeg=False,
                                    verbose=False)
    sol = fwd["sol"]["data"]  # (n_meg, 3 * n_sources), free orientation
    # sources near the sphere centre are silent in MEG (and have no radial direction)
    keep = np.linalg.norm(fwd["source_rr"], axis=1) > 0.015
    rr = fwd["source_rr"][keep]
    g_free = sol.reshape(sol.shape[0], -1, 3)[:, keep]
    # fixed tangential orientation per source
    radial = rr / np.linalg.norm(rr, axis=1, keepdims=True)
    ori = np.cross(radial, rng.standard_normal(rr.shape))
    ori /= np.linalg.norm(ori, axis=1, keepdims=True)
    gain = np.einsum("csk,sk->cs", g_free, ori)
    x, y, z = rr.T
    posterior = np.flatnonzero((y < -0.025) & (z > -0.01))
    ventral = np.flatnonzero((y > -0.045) & (y < 0.01) & (z < 0.0) & (np.abs(x) > 0.02))
    pick = lambda idx, n: rng.choice(idx, size=min(n, len(idx)), replace=False)  # noqa: E731
    model = {
        "gain": gain,
        "onset_src": pick(posterior, 12),
        "low_src": pick(posterior, 30),
        "concept_src": pick(ventral, 30),
        "alpha_src": pick(posterior, 8),
        "noise_src": rng.choice(len(rr), size=min(200, len(rr)), replace=False),
    }
    n_on, n_low, n_con = (len(model[k]) for k in ("onset_src", "low_src", "concept_src"))
    model["onset_w"] = rng.uniform(0.5, 1.0, n_on) * rng.choice([-1, 1], n_on)
    model["low_W"] = rng.standard_normal((n_low, n_features)) / np.sqrt(n_features)
    model["concept_U"] = rng.standard_normal((n_con, code_dim)) / np.sqrt(code_dim)
    return model


def _simulate_run(
    info: mne.Info,
    model: dict,
    trials: pd.DataFrame,
    codes: dict[str, np.ndarray],
    *,
    cfg: DictConfig,
    rng: np.random.Generator,
) -> tuple[mne.io.RawArray, np.ndarray]:
    """Simulate one run; return the Raw and the onset samples of the trials."""
    sfreq = float(cfg.sfreq)
    soa = rng.uniform(cfg.soa[0], cfg.soa[1], len(trials))
    onsets = 2.0 + np.concatenate([[0.0], np.cumsum(soa[:-1])])
    n_times = int(round((onsets[-1] + 3.0) * sfreq))
    times = np.arange(n_times) / sfreq
    gain = model["gain"]
    n_meg = gain.shape[0]
    feats = trials[[f"ll{j}" for j in range(model["low_W"].shape[1])]].to_numpy()

    # --- evoked sources -------------------------------------------------------------------
    src_idx = np.concatenate([model["onset_src"], model["low_src"], model["concept_src"]])
    n_on = len(model["onset_src"])
    src = np.zeros((len(src_idx), n_times))
    t_win = np.arange(int(0.9 * sfreq)) / sfreq
    w_on = _gamma_bump(t_win, 0.095, 0.03) - 0.6 * _gamma_bump(t_win, 0.17, 0.04)
    w_low = _gamma_bump(t_win, 0.115, 0.035)
    w_con = _gamma_bump(t_win, float(cfg.concept_peak),
                        float(cfg.concept_width))
    w_off = _gamma_bump(t_win - cfg.image_duration, 0.1, 0.03)
    for i, onset in enumerate(onsets):
        jitter = rng.normal(0.0, float(cfg.latency_jitter))
        start = int(round((onset + jitter) * sfreq))
        stop = min(start + len(t_win), n_times)
        n = stop - start
        gain_trial = rng.lognormal(0.0, 0.25)
        amp_on = model["onset_w"][:, None] * (w_on + 0.4 * w_off)[None, :n]
        amp_low = (model["low_W"] @ feats[i])[:, None] * w_low[None, :n]
        amp_con = (model["concept_U"] @ codes[trials["concept"].iloc[i]])[:, None] * w_con[None, :n]
        block = np.concatenate([amp_on, cfg.lowlevel_gain * amp_low,
                                cfg.concept_gain * amp_con]) * gain_trial
        src[:, start:stop] += block
    evoked = gain[:, src_idx] @ src
    # scale so that the mean evoked response peaks at EVOKED_SENSOR_RMS (x snr)
    peak_rms = np.sqrt((gain[:, src_idx[:n_on]] @ model["onset_w"][:, None]) ** 2).mean()
    evoked *= cfg.snr * EVOKED_SENSOR_RMS / max(peak_rms, 1e-30)
    del src

    # --- noise ----------------------------------------------------------------------------
    noise_src = _pink_noise(rng, len(model["noise_src"]), n_times)
    brain = gain[:, model["noise_src"]] @ noise_src
    brain *= BRAIN_NOISE_RMS / brain.std()
    del noise_src
    alpha_env = np.abs(_pink_noise(rng, len(model["alpha_src"]), n_times, exponent=2.0))
    alpha_freq = rng.uniform(9.0, 11.5, len(model["alpha_src"]))[:, None]
    alpha_phase = rng.uniform(0, 2 * np.pi, (len(alpha_freq), 1))
    alpha = alpha_env * np.sin(2 * np.pi * alpha_freq * times + alpha_phase)
    alpha_sens = gain[:, model["alpha_src"]] @ alpha
    alpha_sens *= ALPHA_RMS / alpha_sens.std()
    del alpha, alpha_env
    sensor = SENSOR_NOISE_RMS * (
        0.7 * rng.standard_normal((n_meg, n_times)) + 0.7 * _pink_noise(rng, n_meg, n_times)
    )
    line_phase = rng.uniform(0, 2 * np.pi, (n_meg, 1))
    line_amp = LINE_NOISE_AMP * rng.uniform(0.3, 1.0, (n_meg, 1))
    line = sum(_sinusoids(line_amp / h, h * cfg.line_freq, h * line_phase, times)
               for h in (1, 2, 3))
    drift = DRIFT_RMS * _pink_noise(rng, n_meg, n_times, exponent=2.0)
    data = evoked + brain + alpha_sens + sensor + line + drift
    del evoked, brain, alpha_sens, sensor, line, drift

    # noisy channels and one dead channel (realistic bad channels; the dead one is declared)
    n_noisy = int(cfg.n_noisy_channels)
    *noisy, dead = rng.choice(n_meg, size=n_noisy + 1, replace=False)
    for ch in noisy:
        data[ch] += 16 * BRAIN_NOISE_RMS * _pink_noise(rng, 1, n_times, exponent=0.5)[0]
    data[dead] = 1e-16 * rng.standard_normal(n_times)

    stim = np.zeros((1, n_times))
    onset_samples = np.round(onsets * sfreq).astype(int)
    stim[0, onset_samples] = 1.0  # same trigger code for every image
    raw = mne.io.RawArray(np.concatenate([data, stim]).astype(np.float32), info, verbose=False)
    raw.info["bads"] = [info["ch_names"][dead]]
    raw.orig_format = "single"  # mne-bids saves FIF in this precision (float32 is plenty)
    return raw, onset_samples


def simulate_meg_bids(
    root: str | Path,
    stimuli: pd.DataFrame,
    *,
    cfg: DictConfig,
    seed: int,
    n_test_repeats: int,
) -> None:
    """Simulate MEG for ``cfg.n_subjects`` subjects and write it as BIDS under ``root``.

    Parameters
    ----------
    root : path
        BIDS root; ``root/stimuli`` must already hold the images of ``stimuli``.
    stimuli : DataFrame
        Stimulus table from :func:`.stimuli.make_stimuli`.
    cfg : DictConfig
        The ``sample.meg`` config (n_subjects, n_runs, sfreq, system, line_freq, soa,
        image_duration, snr, lowlevel_gain, concept_gain, concept_peak, concept_width,
        latency_jitter, n_noisy_channels).
    seed : int
        Seed of the whole sample dataset.
    n_test_repeats : int
        How often each test exemplar is shown.
    """
    root = Path(root)
    n_features = sum(c.startswith("ll") for c in stimuli.columns)
    code_rng = np.random.default_rng([seed, 1])  # concept codes: shared by all subjects
    codes = {c: code_rng.standard_normal(N_CODE) for c in sorted(stimuli["concept"].unique())}
    canonical = mne.channels.read_meg_canonical_info(cfg.system)
    for s in range(cfg.n_subjects):
        subject = f"{s + 1:02d}"
        rng = np.random.default_rng([seed, 2, s])
        info = canonical.copy()
        with info._unlock():
            info["sfreq"] = float(cfg.sfreq)
            info["line_freq"] = float(cfg.line_freq)
            info["dev_head_t"] = _head_transform(rng)
            info["lowpass"] = float(cfg.sfreq) / 2
        info = mne.pick_info(info, mne.pick_types(info, meg=True, ref_meg=False))
        info = _add_stim(info)
        model = _subject_model(info, rng, n_features, N_CODE)
        runs = trial_sequence(stimuli, n_test_repeats=n_test_repeats, n_runs=cfg.n_runs, rng=rng)
        for r, trials in enumerate(progress(runs, desc=f"MEG sub-{subject}")):
            raw, onset_samples = _simulate_run(info, model, trials, codes, cfg=cfg, rng=rng)
            events = np.column_stack([
                onset_samples,
                np.zeros(len(onset_samples), int),
                trials["split"].map(EVENT_ID).to_numpy(),
            ])
            # with event_metadata, mne-bids writes trial_type only if it is a metadata column
            metadata = pd.DataFrame({
                "trial_type": trials["split"].to_numpy(),
                "stim_file": trials["stim_file"].to_numpy(),
                "concept": trials["concept"].to_numpy(),
                "exemplar": trials["exemplar"].to_numpy(),
            })
            bids_path = mne_bids.BIDSPath(subject=subject, session="01", task=TASK,
                                          run=f"{r + 1:02d}", datatype="meg", root=root)
            raw.set_meas_date(None)
            mne_bids.write_raw_bids(
                raw, bids_path, events=events, event_id=EVENT_ID,
                event_metadata=metadata,
                extra_columns_descriptions={
                    "trial_type": "train: exemplar shown once; test: exemplar shown repeatedly",
                    "stim_file": "Image shown, relative to the stimuli/ folder",
                    "concept": "Concept (photo) the image was cropped from",
                    "exemplar": "Exemplar number within the concept",
                },
                format="FIF", allow_preload=True, overwrite=True, verbose=False,
            )
    logger.info("sample MEG: %d subjects written under %s", cfg.n_subjects, root)


def _add_stim(info: mne.Info) -> mne.Info:
    """Return ``info`` with the trigger channel appended."""
    raw = mne.io.RawArray(np.zeros((len(info["ch_names"]), 1)), info, verbose=False)
    stim = mne.io.RawArray(np.zeros((1, 1)), mne.create_info([STIM_CHANNEL], info["sfreq"], "stim"),
                           verbose=False)
    with stim.info._unlock():
        stim.info["dev_head_t"] = info["dev_head_t"]
        stim.info["line_freq"] = info["line_freq"]
    raw.add_channels([stim], force_update_info=True)
    return raw.info
