"""Simulated MEG of the sample dataset, written as BIDS with mne-bids.

Physics: real CTF-275 sensor geometry (``mne.channels.read_meg_canonical_info``), a spherical
head model and a volume source space, and MNE's forward solution (``make_forward_solution``).
Each source gets a fixed tangential orientation (radial dipoles are silent in a sphere), so the
gain is ``G[:, s] = G_free[:, s] @ ori[s]``. Sensor data = gain @ source time courses (cheap;
``mne.simulation.simulate_raw`` would allocate tens of GB on recordings this long).

Neural model per trial (image onset at t=0):

* an onset response in posterior (occipital) sources, the same for every image;
* an early component (peak ``lowlevel_peak``, ~110 ms) in posterior sources whose amplitude is
  a subject-specific linear map of the image's low-level statistics (``ll0..ll9``, see
  :mod:`.stimuli`);
* a later, sustained component (peak ``concept_peak``) in ventral temporal sources driven by an
  image code shared across subjects (a concept code, mixed with a projection of the image's
  own pixels when ``concept_share < 1``) through subject-specific source weights;
* with ``concept_stages`` > 1, that component is a chain of stages ``concept_stage_spacing``
  s apart, each carrying the same code through its own sources and weights, so the sensor
  pattern of the code changes over time (King & Dehaene 2014); its power is shared among them;
* an offset response when the image disappears;
* trial-to-trial latency jitter and amplitude variability.

Noise: 1/f brain background from random sources, bursty posterior alpha (8-12 Hz), sensor
white + 1/f noise, line noise with harmonics, and slow drift. Physiological artifacts (off in
the fixed presets, drawn by the randomized family): eye blinks, spontaneous
(``blink_rate``) and in the pause after an image (``blink_after_image``, the probability per
trial), through the field of sources behind the eyes, and the heartbeat (``ecg_gain``), a
QRS complex and T wave at 55-85 beats per minute through a deep inferior source; both are
large beside the evoked response, as in a recording without ICA or SSP. Stimulus identity
reaches the sensors only through the neural response: the trigger channel carries the same code
for every image, the noise generator is independent of the stimulus order, and trial order is
shuffled.

Generation runs in bounded memory, whatever the run length: every random value of a trial
(latency jitter, gain) is drawn up front, and the recording is then made in blocks of
``BLOCK_S`` seconds, each the sum of the evoked responses of the trials that overlap it and of
the noise. Colored noise (``1/f**exponent``, exponents 0.5, 1 and 2) is a stateful filter of
white noise (:class:`_ColoredNoise`) that continues from block to block, sinusoids (alpha, line
noise) are evaluated in absolute time, and every normalisation is the expected variance under
the model (from the gain matrix and the unit-variance noise), not a statistic of the data, so
the data do not depend on the block size. Blocks go to a float32 scratch file that a lazily
read Raw (:class:`_ScratchRaw`) streams into mne-bids, and the scratch file is removed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mne
import mne_bids
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from neurorecon.models.common.logging import logger, progress

from .bids_meta import EVENT_COLUMNS, describe_dataset, describe_meg_run, meg_digitization
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
BLINK_RMS = 600e-15  # over the sensors, at the peak of a blink (blink_gain=1)
ECG_RMS = 300e-15  # over the sensors, at the R peak (ecg_gain=1)

# EOG and ECG electrodes (volts), written when the config has artifacts
EXG_CHANNELS = {"EOG061": "eog", "ECG063": "ecg"}  # name: type
EOG_BLINK = 250e-6  # vertical EOG at the peak of a blink (amplitude 1)
EOG_NOISE_RMS = 10e-6
ECG_PEAK = 1e-3  # ECG at the R peak
ECG_NOISE_RMS = 20e-6

BLOCK_S = 10.0  # s of recording generated at a time: memory does not grow with the run
COLORED_F_LO = 0.01  # Hz: colored noise is 1/f**exponent above this corner, flat below


def _gamma_bump(t: np.ndarray, peak: float, width: float) -> np.ndarray:
    """A smooth unimodal waveform peaking at ``peak`` s (zero before onset)."""
    k = (peak / width) ** 2
    theta = width**2 / peak
    x = np.clip(t, 0, None) / theta
    log_y = np.where(t > 0, (k - 1) * np.log(np.maximum(x, 1e-12)) - x, -np.inf)
    if not np.isfinite(log_y).any():
        return np.zeros_like(t, dtype=float)
    return np.exp(log_y - log_y.max())  # in the log domain: no overflow for narrow bumps


class _ColoredNoise:
    """Gaussian noise with a ``1/f**exponent`` power spectrum, unit variance, made block by block.

    A cascade of first-order pole/zero sections filters white noise (``scipy.signal.sosfilt``,
    its state carried from one call to the next, so consecutive calls continue one signal).
    The poles are log-spaced, two per decade, from ``f_lo`` to Nyquist, and each zero sits
    ``R**(exponent / 2)`` above its pole (``R`` the pole spacing): the spectrum follows
    ``1/f**exponent`` within 1.5 dB from ``10 * f_lo`` to 300 Hz (up to 4 dB above it near
    Nyquist) and is flat below ``f_lo``; ``exponent=2`` is one pole. The variance of the
    cascade and the covariance of its stationary state solve its discrete Lyapunov equation, so
    the output is normalised analytically and starts in the stationary state (no warm-up).

    Parameters
    ----------
    rng : Generator
        The stream this noise alone draws from.
    n_signals : int
        Number of independent signals (rows of each block).
    exponent : float
        Spectral exponent, in (0, 2].
    sfreq : float
        Sampling rate (Hz).
    f_lo : float
        Corner (Hz) below which the spectrum is flat.
    """

    def __init__(self, rng: np.random.Generator, n_signals: int, exponent: float, sfreq: float,
                 f_lo: float = COLORED_F_LO):
        from scipy import linalg

        if not 0 < exponent <= 2:
            raise ValueError(f"exponent must be in (0, 2], got {exponent}")
        f_hi = sfreq / 2
        if exponent == 2:
            poles, zeros = np.array([f_lo]), np.array([np.inf])
        else:
            n_poles = int(np.ceil(2 * np.log10(f_hi / f_lo))) + 1
            spacing = (f_hi / f_lo) ** (1 / (n_poles - 1))
            poles = f_lo * spacing ** np.arange(n_poles)
            zeros = poles * spacing ** (exponent / 2)
        p, z = np.exp(-2 * np.pi * poles / sfreq), np.exp(-2 * np.pi * zeros / sfreq)
        n_sec = len(p)
        # section k: y = x + s_k, s_k <- -z_k x + p_k y (sosfilt's transposed direct form II)
        self.sos = np.zeros((n_sec, 6))
        self.sos[:, 0], self.sos[:, 1], self.sos[:, 3], self.sos[:, 4] = 1.0, -z, 1.0, -p

        def step(state, w):
            new, x = np.empty(n_sec), w
            for k in range(n_sec):
                y = x + state[k]
                new[k] = -z[k] * x + p[k] * y
                x = y
            return new, x

        # state space: state <- a @ state + b w, output = c @ state + d w
        cols, outs = zip(*(step(e, 0.0) for e in np.eye(n_sec)), strict=True)
        a, c = np.column_stack(cols), np.array(outs)
        b, d = step(np.zeros(n_sec), 1.0)
        cov = linalg.solve_discrete_lyapunov(a, np.outer(b, b))  # stationary state covariance
        self.scale = 1 / np.sqrt(c @ cov @ c + d**2)
        lam, vec = np.linalg.eigh(cov)
        state = rng.standard_normal((n_signals, n_sec)) @ (vec * np.sqrt(np.clip(lam, 0, None))).T
        self.zi = np.zeros((n_sec, n_signals, 2))
        self.zi[:, :, 0] = state.T
        self.rng, self.n_signals = rng, n_signals

    def __call__(self, n_times: int) -> np.ndarray:
        """The next ``n_times`` samples, ``(n_signals, n_times)``."""
        from scipy import signal

        # time-major draws: the stream does not depend on how the samples are split in blocks
        white = self.rng.standard_normal((n_times, self.n_signals)).T
        out, self.zi = signal.sosfilt(self.sos, white, axis=-1, zi=self.zi)
        return out * self.scale


def _sinusoids(amp: np.ndarray, freq: float, phase: np.ndarray, times: np.ndarray) -> np.ndarray:
    """``amp * sin(2 pi freq t + phase)`` per row, as two outer products (fast)."""
    w = 2 * np.pi * freq * times
    return (amp * np.cos(phase)) * np.sin(w)[None] + (amp * np.sin(phase)) * np.cos(w)[None]


def _head_transform(rng: np.random.Generator, *, shift: float = 0.003,
                    rotation: float = 3.0) -> mne.transforms.Transform:
    """A plausible device->head transform: a random shift (sd ``shift`` m) and rotation (sd
    ``rotation`` degrees per axis)."""
    from scipy.spatial.transform import Rotation

    rot = Rotation.from_euler("xyz", rng.normal(0, rotation, 3), degrees=True).as_matrix()
    trans = np.eye(4)
    trans[:3, :3] = rot
    trans[:3, 3] = rng.normal(0, shift, 3) + np.array([0.0, 0.0, 0.006])
    return mne.transforms.Transform("meg", "head", trans)


def _subject_model(info: mne.Info, rng: np.random.Generator, n_features: int, code_dim: int,
                   *, n_stages: int = 1, stage_rng: np.random.Generator | None = None):
    """Forward model and source maps of one simulated subject.

    ``n_stages`` > 1: the concept stages after the first draw their sources and weights from
    ``stage_rng`` (every draw of ``rng`` stays as with one stage)."""
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
    # artifact fields, from fixed places and orientations (no draw of rng): behind the eyes
    # (a blink rotates the eyes' corneo-retinal dipoles) and deep inferior (the heart's field)
    def field(points, direction) -> np.ndarray:
        idx = [int(np.argmin(np.linalg.norm(rr - np.asarray(pt), axis=1))) for pt in points]
        topo = g_free[:, idx] @ (np.asarray(direction) / np.linalg.norm(direction))
        topo = topo.sum(1)
        return topo / np.sqrt(np.mean(topo**2))

    model["blink_topo"] = field([(-0.03, 0.06, -0.02), (0.03, 0.06, -0.02)], (0.0, 0.5, 1.0))
    model["ecg_topo"] = field([(0.01, -0.01, -0.065)], (0.4, 0.3, 1.0))
    model["onset_w"] = rng.uniform(0.5, 1.0, n_on) * rng.choice([-1, 1], n_on)
    model["low_W"] = rng.standard_normal((n_low, n_features)) / np.sqrt(n_features)
    model["concept_U"] = rng.standard_normal((n_con, code_dim)) / np.sqrt(code_dim)
    # later concept stages: other ventral and temporal sources, other weights
    temporal = np.flatnonzero((y > -0.045) & (z < 0.03) & (np.abs(x) > 0.02))
    model["stages"] = [(model["concept_src"], model["concept_U"])] + [
        (stage_rng.choice(temporal, size=min(30, len(temporal)), replace=False),
         stage_rng.standard_normal((min(30, len(temporal)), code_dim)) / np.sqrt(code_dim))
        for _ in range(1, n_stages)]
    return model


class _ScratchRaw(mne.io.BaseRaw):
    """A Raw whose samples stay in a scratch file and are read on demand.

    The file holds ``(n_times, n_chans)`` little-endian float32 values in physical units
    (channel calibrations are 1), sample after sample, as :func:`_simulate_run` writes them.
    """

    def __init__(self, fname: Path, info: mne.Info, n_times: int):
        super().__init__(info, preload=False, last_samps=[n_times - 1], filenames=[fname],
                         raw_extras=[{"n_chans": info["nchan"]}], orig_format="single",
                         verbose=False)

    def _read_segment_file(self, data, idx, fi, start, stop, cals, mult):
        n_chans = self._raw_extras[fi]["n_chans"]
        with open(self.filenames[fi], "rb") as fid:
            fid.seek(start * n_chans * 4)
            block = np.fromfile(fid, dtype="<f4", count=(stop - start) * n_chans)
        block = block.reshape(stop - start, n_chans).T[idx]
        data[:] = block * cals if mult is None else mult @ block


class _Evoked:
    """Sensor-level evoked responses of one run, evaluated on any block of samples.

    Per trial, the response is a sum of rank-one terms, a sensor topography times a waveform
    (onset + offset, low-level, one per concept stage), scaled by the trial's gain and shifted
    by its jitter.
    """

    def __init__(self, model: dict, trials: pd.DataFrame, codes: dict[str, np.ndarray],
                 onsets: np.ndarray, *, cfg: DictConfig, rng: np.random.Generator):
        sfreq = float(cfg.sfreq)
        gain = model["gain"]
        low = (float(cfg.lowlevel_peak), float(cfg.lowlevel_width))
        stages = model["stages"]
        peaks = float(cfg.concept_peak) + float(cfg.concept_stage_spacing) * \
            np.arange(len(stages))
        widths = float(cfg.concept_width) * peaks / peaks[0]  # later stages: wider
        # long enough for the slowest response to decay (0.9 s for the fixed presets)
        t_win = np.arange(int(max(0.9, peaks[-1] + 5 * widths[-1]) * sfreq)) / sfreq
        w_on = _gamma_bump(t_win, 0.095, 0.03) - 0.6 * _gamma_bump(t_win, 0.17, 0.04)
        w_off = _gamma_bump(t_win - cfg.image_duration, 0.1, 0.03)
        self.waves = np.stack([
            w_on + 0.4 * w_off,
            _gamma_bump(t_win, *low),
            *(_gamma_bump(t_win, peak, width) for peak, width in zip(peaks, widths,
                                                                      strict=True)),
        ])  # (2 + stages, n_win)
        self.topo_on = gain[:, model["onset_src"]] @ model["onset_w"]
        self.map_low = cfg.lowlevel_gain * gain[:, model["low_src"]] @ model["low_W"]
        # (stages, n_meg, code): the stages share the concept response's power
        self.map_con = np.stack([cfg.concept_gain / np.sqrt(len(stages)) * gain[:, src] @ u
                                 for src, u in stages])
        # scale so that the mean evoked response peaks at EVOKED_SENSOR_RMS (x snr)
        peak_rms = np.sqrt(self.topo_on**2).mean()
        self.scale = cfg.snr * EVOKED_SENSOR_RMS / max(peak_rms, 1e-30)
        self.feats = trials[[f"ll{j}" for j in range(model["low_W"].shape[1])]].to_numpy()
        self.codes = np.stack([codes[f] for f in trials["stim_file"]])
        # every random value of a trial, drawn up front: blocks do not depend on their size
        jitter = rng.normal(0.0, float(cfg.latency_jitter), len(trials))
        self.trial_gain = rng.lognormal(0.0, 0.25, len(trials))
        self.starts = np.round((onsets + jitter) * sfreq).astype(int)

    def __call__(self, start: int, stop: int) -> np.ndarray:
        """The evoked responses on samples ``start:stop``, ``(n_meg, stop - start)``."""
        n_win = self.waves.shape[1]
        out = np.zeros((len(self.topo_on), stop - start))
        for i in np.flatnonzero((self.starts < stop) & (self.starts + n_win > start)):
            lo, hi = max(self.starts[i], start), min(self.starts[i] + n_win, stop)
            topo = np.column_stack([self.topo_on, self.map_low @ self.feats[i],
                                    *(self.map_con @ self.codes[i])])
            topo *= self.scale * self.trial_gain[i]
            out[:, lo - start : hi - start] += topo @ self.waves[:, lo - self.starts[i] :
                                                                   hi - self.starts[i]]
        return out


class _Artifacts:
    """Blinks and heartbeats of one run at the sensors, evaluated on any block of samples.

    Every event (time, amplitude) is drawn up front from ``rng`` (its own stream: a dataset
    without artifacts is the same as before they existed), so blocks do not depend on their
    size. Returns None from :meth:`of` when the config has no artifacts."""

    def __init__(self, model: dict, onsets: np.ndarray, n_times: int, *, cfg: DictConfig,
                 rng: np.random.Generator):
        sfreq = float(cfg.sfreq)
        duration = n_times / sfreq
        spontaneous = rng.uniform(0.0, duration, rng.poisson(float(cfg.blink_rate) * duration))
        after = rng.random(len(onsets)) < float(cfg.blink_after_image)
        delays = float(cfg.image_duration) + rng.uniform(0.05, 0.4, len(onsets))
        blinks = np.concatenate([spontaneous, (onsets + delays)[after]])
        period = 60.0 / rng.uniform(55.0, 85.0)
        beats = np.cumsum(period * (1 + 0.05 * rng.standard_normal(int(duration / period) + 2)))
        beats += rng.uniform(0.0, period) - period
        t = np.arange(int(0.6 * sfreq)) / sfreq
        gauss = lambda mu, sd: np.exp(-0.5 * ((t - mu) / sd) ** 2)  # noqa: E731
        self.events = [  # (topography, waveform, onset samples, amplitudes)
            (float(cfg.blink_gain) * BLINK_RMS * model["blink_topo"], _gamma_bump(t, 0.12, 0.04),
             np.round(blinks * sfreq).astype(int), rng.lognormal(0.0, 0.3, len(blinks))),
            (float(cfg.ecg_gain) * ECG_RMS * model["ecg_topo"],
             gauss(0.1, 0.008) - 0.15 * gauss(0.08, 0.006) - 0.25 * gauss(0.12, 0.008)
             + 0.3 * gauss(0.35, 0.04), np.round(beats * sfreq).astype(int),
             1 + 0.05 * rng.standard_normal(len(beats))),
        ]
        self._electrode_noise = rng.spawn(1)[0]  # drawn block after block

    @staticmethod
    def configured(cfg: DictConfig) -> bool:
        """Whether ``cfg`` has blinks or heartbeats (the recordings then hold EOG and ECG
        channels, as a real recording does)."""
        return bool(cfg.get("blink_rate", 0) or cfg.get("blink_after_image", 0)
                    or cfg.get("ecg_gain", 0))

    @classmethod
    def of(cls, model: dict, onsets: np.ndarray, n_times: int, *, cfg: DictConfig,
           rng: np.random.Generator) -> _Artifacts | None:
        return cls(model, onsets, n_times, cfg=cfg, rng=rng) if cls.configured(cfg) else None

    def _series(self, start: int, stop: int) -> np.ndarray:
        """``(2, stop - start)``: the blink and heartbeat time courses (unit peak x amplitude)."""
        out = np.zeros((len(self.events), stop - start))
        for series, (_, wave, starts, amps) in zip(out, self.events, strict=True):
            for i in np.flatnonzero((starts < stop) & (starts + len(wave) > start)):
                lo, hi = max(starts[i], start), min(starts[i] + len(wave), stop)
                series[lo - start:hi - start] += amps[i] * wave[lo - starts[i]:hi - starts[i]]
        return out

    def __call__(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """The artifacts on samples ``start:stop``: at the MEG sensors ``(n_meg, n)`` (T) and
        on the EOG and ECG channels ``(2, n)`` (V, with electrode noise)."""
        series = self._series(start, stop)
        meg = np.column_stack([topo for topo, *_ in self.events]) @ series
        n = stop - start
        exg = series * np.array([[EOG_BLINK], [ECG_PEAK]])
        exg += np.array([[EOG_NOISE_RMS], [ECG_NOISE_RMS]]) * \
            self._electrode_noise.standard_normal((n, 2)).T
        return meg, exg


def _simulate_run(
    info: mne.Info,
    model: dict,
    trials: pd.DataFrame,
    codes: dict[str, np.ndarray],
    *,
    cfg: DictConfig,
    rng: np.random.Generator,
    fname: Path,
    block_s: float = BLOCK_S,
    artifact_rng: np.random.Generator | None = None,
) -> tuple[_ScratchRaw, np.ndarray]:
    """Simulate one run into the scratch file ``fname``, ``block_s`` seconds at a time
    (``artifact_rng``: the stream of the run's blinks and heartbeats, if the config has any).

    Returns a Raw that reads ``fname`` lazily and the onset samples of the trials. The data do
    not depend on ``block_s`` (up to float rounding).
    """
    sfreq = float(cfg.sfreq)
    soa = rng.uniform(cfg.soa[0], cfg.soa[1], len(trials))
    onsets = 2.0 + np.concatenate([[0.0], np.cumsum(soa[:-1])])
    n_times = int(round((onsets[-1] + 3.0) * sfreq))
    onset_samples = np.round(onsets * sfreq).astype(int)
    gain = model["gain"]
    n_meg = gain.shape[0]
    evoked = _Evoked(model, trials, codes, onsets, cfg=cfg, rng=rng)
    artifacts = (None if artifact_rng is None else
                 _Artifacts.of(model, onsets, n_times, cfg=cfg, rng=artifact_rng))
    names = [STIM_CHANNEL, *(EXG_CHANNELS if artifacts is not None else ())]
    if info["ch_names"][n_meg:] != names:
        raise ValueError(f"info must hold the {n_meg} MEG channels of the gain, then {names}")

    # noise: fixed parameters, then one random stream per generator (blocks draw in turn)
    g_noise = gain[:, model["noise_src"]]
    g_alpha = gain[:, model["alpha_src"]]
    # expected sensor variance: unit-variance sources; alpha = |envelope| x sine, mean square 1/2
    brain_scale = BRAIN_NOISE_RMS / np.sqrt((g_noise**2).sum() / n_meg)
    alpha_scale = ALPHA_RMS / np.sqrt(0.5 * (g_alpha**2).sum() / n_meg)
    alpha_freq = rng.uniform(9.0, 11.5, len(model["alpha_src"]))[:, None]
    alpha_phase = rng.uniform(0, 2 * np.pi, (len(alpha_freq), 1))
    line_phase = rng.uniform(0, 2 * np.pi, (n_meg, 1))
    line_amp = LINE_NOISE_AMP * rng.uniform(0.3, 1.0, (n_meg, 1))
    # noisy channels and one dead channel (realistic bad channels; the dead one is declared)
    *noisy, dead = rng.choice(n_meg, size=int(cfg.n_noisy_channels) + 1, replace=False)
    streams = rng.spawn(7)
    brain = _ColoredNoise(streams[0], g_noise.shape[1], 1.0, sfreq)
    alpha_env = _ColoredNoise(streams[1], g_alpha.shape[1], 2.0, sfreq)
    sensor_white = streams[2]
    sensor_pink = _ColoredNoise(streams[3], n_meg, 1.0, sfreq)
    drift = _ColoredNoise(streams[4], n_meg, 2.0, sfreq)
    noisy_noise = _ColoredNoise(streams[5], len(noisy), 0.5, sfreq) if noisy else None
    dead_noise = streams[6]

    block = max(1, int(round(block_s * sfreq)))
    with open(fname, "wb") as fid:
        for start in range(0, n_times, block):
            stop = min(start + block, n_times)
            n = stop - start
            times = np.arange(start, stop) / sfreq
            data = np.empty((len(info["ch_names"]), n))
            meg = data[:n_meg]
            meg[:] = evoked(start, stop)
            meg += brain_scale * (g_noise @ brain(n))
            alpha = np.abs(alpha_env(n)) * np.sin(2 * np.pi * alpha_freq * times + alpha_phase)
            meg += alpha_scale * (g_alpha @ alpha)
            meg += 0.7 * SENSOR_NOISE_RMS * sensor_white.standard_normal((n, n_meg)).T
            meg += 0.7 * SENSOR_NOISE_RMS * sensor_pink(n)
            for h in (1, 2, 3):
                meg += _sinusoids(line_amp / h, h * cfg.line_freq, h * line_phase, times)
            meg += DRIFT_RMS * drift(n)
            if artifacts is not None:
                at_meg, data[n_meg + 1:] = artifacts(start, stop)
                meg += at_meg
            if noisy_noise is not None:
                meg[noisy] += 16 * BRAIN_NOISE_RMS * noisy_noise(n)
            meg[dead] = 1e-16 * dead_noise.standard_normal(n)
            data[n_meg] = 0.0
            in_block = onset_samples[(onset_samples >= start) & (onset_samples < stop)]
            data[n_meg, in_block - start] = 1.0  # same trigger code for every image
            np.ascontiguousarray(data.T, dtype="<f4").tofile(fid)
    raw = _ScratchRaw(fname, info, n_times)
    raw.info["bads"] = [info["ch_names"][dead]]
    return raw, onset_samples


def simulate_meg_bids(
    root: str | Path,
    stimuli: pd.DataFrame,
    *,
    cfg: DictConfig,
    seed: int,
    n_test_repeats: int,
    draw: dict | None = None,
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
        image_duration, snr, lowlevel_gain, lowlevel_peak, lowlevel_width, concept_gain,
        concept_peak, concept_width, concept_stages, concept_stage_spacing, latency_jitter,
        n_noisy_channels, head_shift, head_rotation, blink_rate, blink_after_image,
        blink_gain, ecg_gain).
    seed : int
        Seed of the whole sample dataset.
    n_test_repeats : int
        How often each test exemplar is shown.
    draw : dict | None
        The parameters of a random draw (:mod:`.family`), recorded in the dataset description.
    """
    root = Path(root)
    n_features = sum(c.startswith("ll") for c in stimuli.columns)
    codes = _image_codes(root / "stimuli", stimuli, seed=seed,
                         concept_share=float(cfg.concept_share))
    canonical = mne.channels.read_meg_canonical_info(cfg.system)
    # blocks go to a scratch file per run, removed as soon as the run is in BIDS (or on error)
    with tempfile.TemporaryDirectory(prefix=".scratch-meg-", dir=root) as scratch:
        fname = Path(scratch) / "run.f32"
        for s in range(cfg.n_subjects):
            subject = f"{s + 1:02d}"
            rng = np.random.default_rng([seed, 2, s])
            info = canonical.copy()
            with info._unlock():
                info["sfreq"] = float(cfg.sfreq)
                info["line_freq"] = float(cfg.line_freq)
                info["dev_head_t"] = _head_transform(rng, shift=float(cfg.head_shift),
                                                     rotation=float(cfg.head_rotation))
                info["lowpass"] = float(cfg.sfreq) / 2
            info = mne.pick_info(info, mne.pick_types(info, meg=True, ref_meg=False))
            info = _add_channels(info, {STIM_CHANNEL: "stim"})
            # own stream: the digitization leaves every other draw of the subject as it was
            info.set_montage(meg_digitization(np.random.default_rng([seed, 4, s]), cfg.system))
            model = _subject_model(info, rng, n_features, N_CODE,
                                   n_stages=int(cfg.concept_stages),
                                   stage_rng=np.random.default_rng([seed, 5, s]))
            runs = trial_sequence(stimuli, n_test_repeats=n_test_repeats, n_runs=cfg.n_runs,
                                  rng=rng)
            info = _add_channels(info, EXG_CHANNELS if _Artifacts.configured(cfg) else {})
            for r, trials in enumerate(progress(runs, desc=f"MEG sub-{subject}")):
                raw, onset_samples = _simulate_run(
                    info, model, trials, codes, cfg=cfg, rng=rng, fname=fname,
                    artifact_rng=np.random.default_rng([seed, 6, s, r]))
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
                # the lazily read raw streams into the FIF in buffers (never loaded whole)
                mne_bids.write_raw_bids(
                    raw, bids_path, events=events, event_id=EVENT_ID,
                    event_metadata=metadata,
                    extra_columns_descriptions={
                        **EVENT_COLUMNS,
                        "concept": "Concept (photo) the image was cropped from",
                        "exemplar": "Exemplar number within the concept",
                    },
                    format="FIF", allow_preload=True, overwrite=True, verbose=False,
                )
                describe_meg_run(bids_path, cfg.system)
                fname.unlink()
    _describe_dataset(root, cfg=cfg, seed=seed, draw=draw)
    logger.info("sample MEG: %d subjects written", cfg.n_subjects)


def _add_channels(info: mne.Info, channels: dict[str, str]) -> mne.Info:
    """Return ``info`` with ``channels`` (name: MNE channel type) appended."""
    if not channels:
        return info
    raw = mne.io.RawArray(np.zeros((len(info["ch_names"]), 1)), info, verbose=False)
    extra = mne.io.RawArray(np.zeros((len(channels), 1)),
                            mne.create_info(list(channels), info["sfreq"], list(channels.values())),
                            verbose=False)
    with extra.info._unlock():
        extra.info["dev_head_t"] = info["dev_head_t"]
        extra.info["line_freq"] = info["line_freq"]
    raw.add_channels([extra], force_update_info=True)
    return raw.info


def _image_codes(stim_dir: Path, stimuli: pd.DataFrame, *, seed: int,
                 concept_share: float) -> dict[str, np.ndarray]:
    """The code (``N_CODE``) driving each image's later response, shared by all subjects.

    ``sqrt(concept_share)`` x a random code per concept + ``sqrt(1 - concept_share)`` x a fixed
    random projection of the image's own content (its 8 x 8 RGB thumbnail, z-scored over the
    set): 1 makes all exemplars of a concept evoke the same response; lower values make each
    image's response its own, related to its pixels rather than to a category.
    """
    if not 0.0 <= concept_share <= 1.0:
        raise ValueError(f"concept_share must be in [0, 1], got {concept_share}")
    code_rng = np.random.default_rng([seed, 1])  # concept codes: shared by all subjects
    concept = {c: code_rng.standard_normal(N_CODE) for c in sorted(stimuli["concept"].unique())}
    codes = {f: concept[c] for f, c in zip(stimuli["stim_file"], stimuli["concept"],
                                           strict=True)}
    if concept_share >= 1.0:
        return codes
    thumbs = np.stack([np.asarray(Image.open(stim_dir / f).convert("RGB").resize((8, 8)),
                                  np.float64).ravel() for f in stimuli["stim_file"]])
    thumbs = (thumbs - thumbs.mean(0)) / (thumbs.std(0) + 1e-9)
    proj = np.random.default_rng([seed, 3]).standard_normal((thumbs.shape[1], N_CODE))
    own = thumbs @ proj
    own /= own.std(0, keepdims=True) + 1e-12
    a, b = np.sqrt(concept_share), np.sqrt(1.0 - concept_share)
    return {f: a * codes[f] + b * own[i] for i, f in enumerate(stimuli["stim_file"])}


def _describe_dataset(root: Path, *, cfg: DictConfig, seed: int, draw: dict | None) -> None:
    """``dataset_description.json`` and README: what the dataset is and, for a random draw,
    its parameters (``GeneratedBy[0].Description``)."""
    params = draw if draw is not None else {"meg": OmegaConf.to_container(cfg, resolve=True)}
    kind = f"random draw {seed}" if draw is not None else f"seed {seed}"
    describe_dataset(
        root, name=f"neurorecon simulated MEG ({cfg.system}, {cfg.sfreq:g} Hz, {kind})",
        seed=seed, params=params)
