"""MEG preprocessing (after Benchetrit, Banville & King 2023), offline and streaming.

Offline, per recording: read with mne-bids -> blinks and heartbeats found on the EOG and
ECG channels, if any (MNE's detectors, at the recording's rate) -> pick the MEG channels ->
band-pass (zero-phase FIR, or causal IIR with ``phase="causal"``) -> decimate to ``sfreq`` ->
epochs ``[tmin, tmax]`` around image onsets -> baseline correction. Per subject: artifact
projectors (SSP, from the average blink and beat of all its recordings) -> robust scaling per
channel (median / IQR fitted on *train* epochs only) -> clamp at ``±clamp`` -> optional
averaging of test repeats.

The same transform exists in a causal, chunk-by-chunk form for the real-time decoder:
:class:`StreamingMegFilter` (IIR state carried across chunks, the output rate reached at any
input rate by :class:`RateConverter`) plus :func:`prepare_window` with the projectors and
scaler statistics frozen from the training data. Its output equals the
offline ``phase="causal"`` path sample for sample.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import mne
import numpy as np
import pandas as pd

from neurorecon.models.common.checks import (
    DataError,
    check_finite,
    check_number,
    check_option,
)
from neurorecon.models.common.logging import logger

from ..data.events import EventSpec, check_events_within, read_events
from ..data.studies import Recording
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

#: filter phases: zero-phase FIR (offline) or causal IIR (identical to the streamed form)
PHASES = ("zero", "causal")
#: bad-channel sources: BIDS ``channels.tsv`` plus robust variance outliers, or BIDS only
BAD_CHANNEL_MODES = ("auto", "bids")
#: artifact projectors (SSP): the epoch (s) around each detected event whose average they
#: remove, as ``mne.preprocessing.compute_proj_eog`` / ``compute_proj_ecg``
SSP_WINDOWS = {"eog": (-0.2, 0.2), "ecg": (-0.2, 0.4)}
#: fewer detected events than this in a subject's recordings: no projector of that kind
SSP_MIN_EVENTS = 10
#: head-frame origin used to flatten sensor positions to 2D (MNE's default for MEG)
LAYOUT_ORIGIN = np.array([0.0, 0.0, 0.04])


@dataclass(frozen=True)
class MegParams:
    """Parameters of the MEG transform (``configs/preprocess/default.yaml``, key ``meg``)."""

    l_freq: float | None = 0.1
    h_freq: float | None = 40.0
    phase: str = "zero"
    iir_order: int = 4
    sfreq: float = 120.0
    tmin: float = -0.5
    tmax: float = 1.0
    baseline: tuple[float | None, float | None] | None = (None, 0.0)
    clamp: float | None = 20.0
    bad_channels: str = "auto"
    bad_threshold: float = 6.0
    ssp_eog: int = 1
    ssp_ecg: int = 1
    average_test_repeats: bool = True

    def __post_init__(self) -> None:
        """Raise :class:`DataError` naming the ``preprocess.meg`` key of the first value out
        of its range (the config is checked with this before any work)."""
        key = "preprocess.meg."
        check_option(key + "phase", self.phase, PHASES)
        check_option(key + "bad_channels", self.bad_channels, BAD_CHANNEL_MODES)
        check_number(key + "sfreq", self.sfreq, low=0, low_open=True)
        nyquist = self.sfreq / 2
        check_number(key + "l_freq", self.l_freq, low=0, high=nyquist, low_open=True,
                     high_open=True, none=True,
                     why=f"below the Nyquist frequency of {key}sfreq={self.sfreq:g} Hz")
        check_number(key + "h_freq", self.h_freq, low=self.l_freq or 0, high=nyquist,
                     low_open=True, high_open=True, none=True,
                     why=f"above {key}l_freq and below the Nyquist frequency of "
                     f"{key}sfreq={self.sfreq:g} Hz, or the decimation aliases")
        check_number(key + "iir_order", self.iir_order, low=1, integer=True)
        check_number(key + "tmin", self.tmin)
        check_number(key + "tmax", self.tmax, low=self.tmin, low_open=True,
                     why=f"{key}tmin is {self.tmin:g} s")
        if self.baseline is not None:
            if not isinstance(self.baseline, tuple) or len(self.baseline) != 2:
                raise DataError(f"Invalid value for {key + 'baseline'!r}: {self.baseline!r}. "
                                "Allowed values: null or [start, end] (s, inside [tmin, tmax]; "
                                "a null start is the epoch start).")
            start = check_number(key + "baseline[0]", self.baseline[0], low=self.tmin,
                                 high=self.tmax, none=True, why="inside the epoch [tmin, tmax]")
            check_number(key + "baseline[1]", self.baseline[1],
                         low=self.tmin if start is None else start, high=self.tmax,
                         none=True, why="inside the epoch, from the baseline start on")
        check_number(key + "clamp", self.clamp, low=0, low_open=True, none=True)
        check_number(key + "bad_threshold", self.bad_threshold, low=0, low_open=True)
        for kind in SSP_WINDOWS:
            check_number(key + f"ssp_{kind}", getattr(self, f"ssp_{kind}"), low=0, integer=True)

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> MegParams:
        """The recipe from a ``preprocess.meg`` mapping (config or stored recipe); unknown
        keys are a :class:`DataError` listing the known ones."""
        values = dict(params)
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise DataError(f"unknown preprocess.meg option(s) {unknown}; known: {known}")
        if isinstance(values.get("baseline"), list):
            values["baseline"] = tuple(values["baseline"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["baseline"] = None if self.baseline is None else list(self.baseline)
        return d


# --------------------------------------------------------------------------------------------
# the continuous transform: band-pass + decimation
# --------------------------------------------------------------------------------------------
def decimation_factor(sfreq_in: float, sfreq_out: float) -> int | None:
    """Integer factor from ``sfreq_in`` to ``sfreq_out``, or None if the ratio is not integer."""
    ratio = sfreq_in / sfreq_out
    return int(round(ratio)) if abs(ratio - round(ratio)) < 1e-6 and ratio >= 1 else None


def causal_sos(sfreq: float, params: MegParams) -> np.ndarray:
    """Second-order sections of the causal Butterworth band-pass (designed by MNE)."""
    filt = mne.filter.create_filter(
        None, sfreq, params.l_freq, params.h_freq, method="iir",
        iir_params=dict(order=params.iir_order, ftype="butter", output="sos"),
        phase="forward", verbose=False,
    )
    return filt["sos"]


class RateConverter:
    """Brings band-limited samples from ``sfreq_in`` to ``sfreq_out`` chunk by chunk, causally.

    Output sample ``k`` is the input at time ``k / sfreq_out`` from the first input sample:

    * integer ratios keep every ``factor``-th sample (decimation);
    * other ratios (1000 -> 120 Hz, a Neuromag's 600.614 Hz) interpolate linearly between the
      two input samples around that time, so the output exists as soon as the later one has
      arrived (less than one input period later). The band-pass below ``sfreq_out / 2`` is
      the anti-alias filter; at the input rates of MEG systems (>= 5x the band-pass edge)
      linear interpolation changes a 40 Hz component by < 3 % and a 10 Hz one by < 0.2 %.

    Feeding the same samples in chunks of any size gives the same output, so the offline
    causal path (:func:`filter_and_decimate`) and the streamed one
    (:class:`StreamingMegFilter`) are equal.
    """

    def __init__(self, sfreq_in: float, sfreq_out: float):
        if not sfreq_out <= sfreq_in:
            raise DataError(f"cannot bring {sfreq_in:g} Hz data up to preprocess.meg.sfreq="
                            f"{sfreq_out:g} Hz", hint=f"set preprocess.meg.sfreq <= {sfreq_in:g}")
        self.factor = decimation_factor(sfreq_in, sfreq_out)
        #: input samples per output sample
        self.ratio = float(self.factor) if self.factor else float(sfreq_in) / float(sfreq_out)
        self.reset()

    def reset(self) -> None:
        """Start a new stream: the next input sample is sample 0."""
        self.n_in = 0  # input samples seen
        self.n_out = 0  # output samples produced
        self._last: np.ndarray | None = None  # the previous chunk's last sample

    def positions(self, start: int, stop: int) -> np.ndarray:
        """Input positions (fractional sample indices) of output samples ``start..stop-1``."""
        return np.arange(start, stop) * self.ratio

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """The output samples that ``chunk`` (``(n_chans, n_samples)``) completes."""
        n, first = chunk.shape[1], self.n_in
        if self.factor is not None:
            out = chunk[:, (-first) % self.factor :: self.factor]
        else:
            pos = self.positions(self.n_out, self.n_out + int(n / self.ratio) + 2)
            pos = pos[pos < first + n - 1]  # both neighbours are in
            if self._last is not None:
                chunk_ = np.concatenate([self._last, chunk], axis=1)
                first -= 1
            else:
                chunk_ = chunk
            i = np.floor(pos).astype(np.int64)
            frac = pos - i
            i -= first
            out = chunk_[:, i] * (1.0 - frac) + chunk_[:, i + 1] * frac
            if n:
                self._last = chunk[:, -1:].copy()
        self.n_in += n
        self.n_out += out.shape[1]
        return out


def filter_and_decimate(raw: mne.io.BaseRaw, params: MegParams) -> mne.io.BaseRaw:
    """Band-pass ``raw`` (in place) and bring it to ``params.sfreq``; return the new Raw.

    The rate goes down by :class:`RateConverter` (decimation, or causal interpolation for
    a non-integer ratio), whose anti-alias low-pass is the band-pass itself; zero-phase
    filtering at a non-integer ratio uses MNE's resampling (not causal) instead.
    """
    sfreq_in = raw.info["sfreq"]
    if params.l_freq is not None or params.h_freq is not None:
        if params.phase == "zero":
            raw.filter(params.l_freq, params.h_freq, picks="data", verbose=False)
        else:
            raw.filter(params.l_freq, params.h_freq, picks="data", method="iir",
                       iir_params=dict(sos=causal_sos(sfreq_in, params)),
                       phase="forward", verbose=False)
    converter = RateConverter(sfreq_in, params.sfreq)
    if converter.factor is None and params.phase == "zero":
        return raw.resample(params.sfreq, verbose=False)
    if converter.factor == 1:
        return raw
    info = raw.info.copy()
    with info._unlock():
        info["sfreq"] = sfreq_in / converter.ratio
        info["lowpass"] = min(info["lowpass"], info["sfreq"] / 2)
    # in time blocks: no second full-rate copy of the recording
    data = np.concatenate([converter.process(b) for b in time_blocks(raw, 8192)], axis=1)
    return mne.io.RawArray(data, info, first_samp=0, verbose=False)


def time_blocks(raw: mne.io.BaseRaw, n_samples: int):
    """``raw``'s data in consecutive blocks of ``n_samples`` samples (the last may be shorter)."""
    for start in range(0, raw.n_times, n_samples):
        yield raw.get_data(start=start, stop=min(start + n_samples, raw.n_times))


class StreamingMegFilter:
    """Causal band-pass + rate conversion applied chunk by chunk (real-time form).

    Feeding a recording in chunks of any size gives, concatenated, exactly the output of
    :func:`filter_and_decimate` with ``phase="causal"`` on the whole recording, at any input
    rate (:class:`RateConverter`).

    Parameters
    ----------
    sfreq : float
        Sampling rate of the incoming stream (Hz).
    n_chans : int
        Number of channels of the incoming chunks.
    params : MegParams
        The recipe (only the filter and ``sfreq`` fields are used here).
    """

    def __init__(self, *, sfreq: float, n_chans: int, params: MegParams):
        from scipy import signal

        self._signal = signal
        self.sfreq_in = float(sfreq)
        self.rate = RateConverter(self.sfreq_in, params.sfreq)
        self.n_chans = n_chans
        self.sos = (
            causal_sos(self.sfreq_in, params)
            if params.l_freq is not None or params.h_freq is not None else None
        )
        self.reset()

    def reset(self) -> None:
        """Forget the filter state and the output phase (start of a new stream)."""
        self._zi = None if self.sos is None else np.zeros((self.sos.shape[0], self.n_chans, 2))
        self.rate.reset()

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Filter a ``(n_chans, n_samples)`` chunk; return its output samples."""
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[0] != self.n_chans:
            raise ValueError(
                f"expected a chunk of shape ({self.n_chans}, n_samples), got {chunk.shape}"
            )
        if self.sos is not None:
            chunk, self._zi = self._signal.sosfilt(self.sos, chunk, axis=-1, zi=self._zi)
        return self.rate.process(chunk)


# --------------------------------------------------------------------------------------------
# per-window operations shared by offline epochs and streaming windows
# --------------------------------------------------------------------------------------------
def baseline_slice(params: MegParams) -> slice:
    """Sample slice of the baseline window within a ``[tmin, tmax]`` window at ``sfreq``."""
    if params.baseline is None:
        return slice(0, 0)
    b0 = params.tmin if params.baseline[0] is None else params.baseline[0]
    b1 = 0.0 if params.baseline[1] is None else params.baseline[1]
    i0 = int(round((b0 - params.tmin) * params.sfreq))
    i1 = int(round((b1 - params.tmin) * params.sfreq)) + 1
    return slice(max(i0, 0), i1)


def scale_window(
    x: np.ndarray, *, center: np.ndarray, scale: np.ndarray, clamp: float | None
) -> np.ndarray:
    """Robust-scale ``(..., n_chans, n_times)`` per channel and clamp to ``[-clamp, clamp]``."""
    out = (x - center[:, None]) / scale[:, None]
    if clamp is not None:
        np.clip(out, -clamp, clamp, out=out)
    return out


def project_out(X: np.ndarray, basis: np.ndarray | None) -> np.ndarray:
    """``(..., n_chans, n_times)`` without its part in the span of ``basis``
    (``(n_chans, k)``, orthonormal columns: the subject's artifact projectors, see
    :func:`ssp_basis`); ``X`` itself when there are none. A spatial projection, so it commutes
    with the filters and the baseline and applies to a live window as to a recording."""
    if basis is None or basis.shape[1] == 0:
        return X
    return X - basis @ (basis.T @ X)


def scale_epochs(X: np.ndarray, *, center: np.ndarray, scale: np.ndarray, good: np.ndarray,
                 clamp: float | None, ssp: np.ndarray | None = None) -> np.ndarray:
    """The frozen per-channel transform of a subject applied to ``(..., n_chans, n_times)``:
    artifact projectors (``ssp``, see :func:`project_out`), scaler, clamp.

    Bad channels (``good`` False) are zero in the output, as in training. Returns a new
    float64 array (the input is not modified).
    """
    X = project_out(np.asarray(X, dtype=np.float64), ssp)
    out = scale_window(X, center=center, scale=scale, clamp=clamp)
    out[..., ~good, :] = 0.0
    return out


def prepare_window(window: np.ndarray, params: MegParams, *, center: np.ndarray,
                   scale: np.ndarray, good: np.ndarray,
                   ssp: np.ndarray | None = None) -> np.ndarray:
    """One ``(n_chans, n_times)`` window of filtered, decimated data spanning
    ``[tmin, tmax]`` around an onset -> the model input: baseline correction (the samples of
    :func:`baseline_slice`, as ``mne.Epochs`` does), artifact projectors, frozen scaler, clamp,
    bad channels zeroed. Applied to :class:`StreamingMegFilter` output it equals the offline
    ``phase="causal"`` epoch.
    """
    window = np.asarray(window, dtype=np.float64)
    base = baseline_slice(params)
    if base.stop > base.start:
        window = window - window[:, base].mean(axis=1, keepdims=True)
    return scale_epochs(window, center=center, scale=scale, good=good, clamp=params.clamp,
                        ssp=ssp)


#: histogram bins per channel of the streamed quantiles (exact values come from a 3rd pass)
QUANTILE_BINS = 16384


def streamed_quantiles(blocks: Callable[[], Iterable[np.ndarray]], n_chans: int,
                       q: Sequence[float]) -> np.ndarray:
    """Exact per-channel quantiles (``np.percentile``'s linear method) of data that come in
    ``(n_epochs, n_chans, n_times)`` blocks, in memory that does not grow with the data.

    ``blocks()`` yields the blocks and is called three times: per-channel range; a
    :data:`QUANTILE_BINS`-bin histogram that locates each wanted order statistic; the values
    of just those bins, sorted. Returns ``(len(q), n_chans)``.
    """
    lo, hi, n = np.full(n_chans, np.inf), np.full(n_chans, -np.inf), 0
    for b in blocks():
        lo = np.minimum(lo, b.min(axis=(0, 2)))
        hi = np.maximum(hi, b.max(axis=(0, 2)))
        n += b.shape[0] * b.shape[2]
    if n == 0:
        raise ValueError("no data to fit the scaler on")
    K = QUANTILE_BINS
    width = np.where(hi > lo, (hi - lo) / K, 1.0)
    offsets = (np.arange(n_chans) * K)[:, None]

    def bins(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # bin index, values (float64)
        x = np.moveaxis(b, 1, 0).reshape(n_chans, -1).astype(np.float64)
        return np.clip(((x - lo[:, None]) / width[:, None]).astype(np.int64), 0, K - 1), x

    counts = np.zeros(n_chans * K, np.int64)
    for b in blocks():
        idx, _ = bins(b)
        counts += np.bincount((idx + offsets).ravel(), minlength=n_chans * K)
    cum = counts.reshape(n_chans, K).cumsum(axis=1)
    pos = (n - 1) * np.asarray(q, float) / 100.0  # fractional rank of each quantile
    ranks = np.stack([np.floor(pos), np.minimum(np.floor(pos) + 1, n - 1)]).astype(np.int64)
    # bin holding each wanted rank, per channel: (n_chans, 2, n_q)
    where = np.stack([np.searchsorted(cum[c], ranks, side="right") for c in range(n_chans)])
    wanted = np.zeros((n_chans, K), bool)
    wanted[np.arange(n_chans)[:, None], where.reshape(n_chans, -1)] = True
    values = [[] for _ in range(n_chans)]
    for b in blocks():
        idx, x = bins(b)
        sel = wanted[np.arange(n_chans)[:, None], idx]
        for c in np.flatnonzero(sel.any(axis=1)):
            values[c].append(np.stack([idx[c, sel[c]], x[c, sel[c]]]))
    out = np.empty((len(pos), n_chans))
    frac = pos - np.floor(pos)
    for c in range(n_chans):
        got = np.concatenate(values[c], axis=1)
        order = np.lexsort((got[1], got[0]))  # by bin, then value: global order within bins
        b_sorted, v_sorted = got[0, order], got[1, order]
        # rank r lies in bin where[c]: it is that bin's (r - values below the bin)-th value
        below = np.concatenate([[0], cum[c]])[where[c]]
        val = v_sorted[np.searchsorted(b_sorted, where[c]) + ranks - below]
        out[:, c] = val[0] + frac * (val[1] - val[0])
    return out


def fit_robust_scaler(X: np.ndarray | Callable[[], Iterable[np.ndarray]],
                      n_chans: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel median and inter-quartile range of ``(n_epochs, n_chans, n_times)`` data
    (sklearn's ``RobustScaler`` statistics; a zero range becomes 1), given as one array or
    as a function yielding blocks of epochs (:func:`streamed_quantiles`)."""
    if not callable(X):
        arr = np.asarray(X)
        X, n_chans = (lambda: [arr]), arr.shape[1]
    q25, median, q75 = streamed_quantiles(X, int(n_chans), (25.0, 50.0, 75.0))
    iqr = q75 - q25
    return median, np.where(iqr > 0, iqr, 1.0)


# --------------------------------------------------------------------------------------------
# sensor layout and bad channels
# --------------------------------------------------------------------------------------------
def sensor_layout(info: mne.Info, picks: Sequence[int]) -> np.ndarray:
    """2D sensor positions in [0, 1]² from head-frame positions (system independent).

    Positions are mapped to the head frame with ``dev_head_t`` and flattened with an
    azimuthal equidistant projection around the vertex, with a fixed scale, so recordings
    from different MEG systems share one 2D frame.
    """
    pos = np.array([info["chs"][i]["loc"][:3] for i in picks])
    if not np.isfinite(pos).all() or np.allclose(pos, 0):
        raise DataError("MEG channels have no sensor positions; the spatial model needs them")
    if info["dev_head_t"] is not None:
        pos = mne.transforms.apply_trans(info["dev_head_t"], pos)
    pos = pos - LAYOUT_ORIGIN
    r = np.linalg.norm(pos, axis=1)
    theta = np.arccos(np.clip(pos[:, 2] / r, -1, 1))  # angle from the vertex
    phi = np.arctan2(pos[:, 1], pos[:, 0])
    rho = theta / np.pi  # [0, 1]
    return np.column_stack([0.5 + 0.5 * rho * np.cos(phi), 0.5 + 0.5 * rho * np.sin(phi)])


_FIFF = mne.io.constants.FIFF
#: coil types of planar gradiometers (Neuromag/Elekta/MEGIN VectorView and TRIUX, Neuromag-122)
_PLANAR_COILS = {_FIFF.FIFFV_COIL_NM_122, _FIFF.FIFFV_COIL_VV_PLANAR_W,
                 _FIFF.FIFFV_COIL_VV_PLANAR_T1, _FIFF.FIFFV_COIL_VV_PLANAR_T2,
                 _FIFF.FIFFV_COIL_VV_PLANAR_T3, _FIFF.FIFFV_COIL_VV_PLANAR_T4}
#: coil types of axial gradiometers (CTF, KIT, 4D/BTi, Artemis, KRISS, Compumedics, ...)
_AXIAL_COILS = {v for k, v in _FIFF.items()
                if k.startswith("FIFFV_COIL_") and k.endswith("_GRAD") and "REF" not in k
                and v not in _PLANAR_COILS}


def sensor_kinds(info: mne.Info, picks: Sequence[int]) -> tuple[list[str], np.ndarray]:
    """Sensor kind and in-layout orientation of each channel.

    Returns
    -------
    kinds : list of str
        ``"mag"`` (magnetometer), ``"axial"`` (axial gradiometer, e.g. CTF, KIT) or
        ``"planar"`` (planar gradiometer, e.g. the two per Neuromag triplet).
    orientation : ndarray, shape (n_picks, 2)
        For planar gradiometers, the unit direction of the measured gradient in the 2D layout
        of :func:`sensor_layout` (the coil's ``ex`` axis, projected); zeros otherwise. The two
        gradiometers of a triplet share a position but not an orientation, so the spatial
        attention can tell them apart.
    """
    picks = list(picks)
    kinds = []
    for i in picks:
        coil = info["chs"][i]["coil_type"]
        if coil in _PLANAR_COILS:
            kinds.append("planar")
        elif coil in _AXIAL_COILS:
            kinds.append("axial")
        else:
            kinds.append("mag")
    orientation = np.zeros((len(picks), 2))
    planar = [k for k, kind in enumerate(kinds) if kind == "planar"]
    if planar:
        step = 0.005  # m along the gradient axis; small against the sensor spacing
        ex = np.array([info["chs"][picks[k]]["loc"][3:6] for k in planar])
        shifted = info.copy()
        with shifted._unlock():
            for k, direction in zip(planar, ex, strict=True):
                shifted["chs"][picks[k]]["loc"][:3] = (info["chs"][picks[k]]["loc"][:3]
                                                       + step * direction)
        delta = (sensor_layout(shifted, [picks[k] for k in planar])
                 - sensor_layout(info, [picks[k] for k in planar]))
        norm = np.linalg.norm(delta, axis=1, keepdims=True)
        orientation[planar] = delta / np.where(norm > 0, norm, 1.0)
    return kinds, orientation


def detect_bad_channels(data: np.ndarray, *, threshold: float) -> np.ndarray:
    """Boolean mask of channels whose log-variance is a robust outlier (flat or noisy)."""
    logvar = np.log(np.var(data, axis=1) + 1e-60)
    med = np.median(logvar)
    mad = 1.4826 * np.median(np.abs(logvar - med)) + 1e-12
    return np.abs(logvar - med) / mad > threshold


# --------------------------------------------------------------------------------------------
# offline pipeline
# --------------------------------------------------------------------------------------------
#: s a recording may fall short of its sidecar's ``RecordingDuration`` (which may be rounded)
DURATION_TOLERANCE = 1.0


def read_raw(recording: Recording) -> mne.io.BaseRaw:
    """Read a recording with mne-bids and check that it is whole.

    MNE's warnings while reading (an invalid tag at the end of a truncated file, annotations
    beyond the data) are held back: they are logged once the recording passed the checks,
    and dropped when a clearer error follows.

    Parameters
    ----------
    recording : Recording
        From :func:`~neurorecon.pipelines.data.studies.find_recordings`.

    Returns
    -------
    mne.io.BaseRaw
        The recording, not preloaded.

    Raises
    ------
    DataError
        Naming the file: empty, unreadable, or shorter than the ``RecordingDuration`` of
        its ``*_meg.json`` sidecar (a truncated file, of which MNE reads what is there).
    """
    import mne_bids

    fpath = recording.fpath
    if fpath.is_file() and fpath.stat().st_size == 0:
        raise DataError("empty MEG recording (0 bytes)", path=fpath)
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")
        try:
            raw = mne_bids.read_raw_bids(recording.bids_path, verbose=False)
        # MNE fails with an AttributeError on a file cut inside its first tag
        except (OSError, ValueError, RuntimeError, AttributeError) as exc:
            raise DataError(f"cannot read MEG recording: corrupt or truncated file "
                            f"({type(exc).__name__}: {exc})", path=fpath) from exc
    sidecar = Path(recording.bids_path.copy().update(extension=".json", split=None).fpath)
    if sidecar.is_file():
        expected = json.loads(sidecar.read_text()).get("RecordingDuration")
        duration = float(raw.times[-1])
        if isinstance(expected, (int, float)) and duration < expected - DURATION_TOLERANCE:
            raise DataError(
                f"truncated recording: {duration:.2f} s read, but {sidecar.name} gives "
                f"RecordingDuration {expected:.2f} s", path=fpath,
                hint="copy the file again (an interrupted transfer?), or correct "
                "RecordingDuration if the recording was shortened on purpose")
    for warning in held:
        logger.warning("%s: %s", fpath.name, warning.message)
    return raw


def cut_epochs(raw: mne.io.BaseRaw, events: pd.DataFrame, params: MegParams, *,
               path: str | Path | None = None) -> np.ndarray:
    """Epochs ``[tmin, tmax]`` around ``events["onset"]`` (s) of filtered, decimated ``raw``,
    baseline-corrected by ``mne.Epochs``: ``(n_events, n_chans, n_times)``, every channel."""
    sfreq = raw.info["sfreq"]
    samples = np.round(events["onset"].to_numpy() * sfreq).astype(int) + raw.first_samp
    mne_events = np.column_stack([samples, np.zeros_like(samples), np.arange(1, len(samples) + 1)])
    with raw.info._unlock():
        raw.info["bads"] = []
    epochs = mne.Epochs(raw, mne_events, tmin=params.tmin, tmax=params.tmax,
                        baseline=params.baseline, picks="all", preload=True, reject=None,
                        flat=None, proj=False, event_repeated="error", verbose=False)
    if len(epochs) != len(events):
        raise DataError(f"only {len(epochs)} of {len(events)} epochs could be cut "
                        "(events too close to the start or end of the recording)", path=path)
    return epochs.get_data(copy=False)


def artifact_events(raw: mne.io.BaseRaw, params: MegParams) -> dict[str, np.ndarray]:
    """Times (s from the first sample) of the blinks and heartbeats that MNE's detectors
    (``find_eog_events``, ``find_ecg_events``) find on the recording's EOG and ECG channels;
    a kind without its channel, or with ``ssp_<kind>=0``, is left out. Run it at the
    recording's own rate (a QRS complex lasts a few samples at ``sfreq``)."""
    found = {}
    for kind in SSP_WINDOWS:
        if not getattr(params, f"ssp_{kind}") or not len(
                mne.pick_types(raw.info, meg=False, **{kind: True})):
            continue
        if kind == "eog":
            events = mne.preprocessing.find_eog_events(raw, verbose=False)
        else:
            events = mne.preprocessing.find_ecg_events(raw, verbose=False)[0]
        found[kind] = (events[:, 0] - raw.first_samp) / raw.info["sfreq"]
    return found


def artifact_sums(raw: mne.io.BaseRaw,
                  times: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, int]]:
    """Per kind of :func:`artifact_events`: the sum of ``raw``'s epochs ``SSP_WINDOWS[kind]``
    around its events, ``(n_chans, n_times)``, and their number (events too near an end are
    left out), so that the recordings of a subject pool into one average."""
    sums = {}
    sfreq = raw.info["sfreq"]
    for kind, onsets in times.items():
        samples = np.unique(np.round(onsets * sfreq).astype(int)) + raw.first_samp
        if not len(samples):
            continue
        events = np.column_stack([samples, np.zeros_like(samples), np.ones_like(samples)])
        epochs = mne.Epochs(raw, events, tmin=SSP_WINDOWS[kind][0], tmax=SSP_WINDOWS[kind][1],
                            baseline=None, picks="all", preload=True, reject=None, flat=None,
                            proj=False, verbose=False)
        data = epochs.get_data(copy=False)
        if len(data):
            sums[kind] = (data.sum(axis=0), len(data))
    return sums


def ssp_basis(parts: Sequence[RecordingEpochs], good: np.ndarray,
              params: MegParams) -> tuple[np.ndarray, dict[str, int]]:
    """A subject's artifact projectors: per kind, MNE's ``compute_proj_evoked`` on the
    average artifact of all its recordings (``ssp_<kind>`` vectors per sensor type, good
    channels only), orthonormalised together.

    Returns the basis ``(n_chans, k)`` (zero on bad channels; ``k=0`` without artifact
    channels) for :func:`project_out`, and the number of events of each kind.
    """
    info = mne.pick_info(parts[0].info, np.flatnonzero(good))
    vectors, counts = [], {}
    for kind, (tmin, _) in SSP_WINDOWS.items():
        found = [part.artifacts[kind] for part in parts if kind in part.artifacts]
        if not found:
            continue
        counts[kind] = n = sum(count for _, count in found)
        if n < SSP_MIN_EVENTS:
            logger.warning("only %d %s events found: no %s projector", n, kind.upper(), kind)
            continue
        k = getattr(params, f"ssp_{kind}")
        average = sum(total for total, _ in found)[good] / n
        evoked = mne.EvokedArray(average, info, tmin=tmin, nave=n, verbose=False)
        for proj in mne.compute_proj_evoked(evoked, n_grad=k, n_mag=k, n_eeg=0,
                                            desc_prefix=kind, verbose=False):
            weights = dict(zip(proj["data"]["col_names"], proj["data"]["data"][0], strict=True))
            vectors.append([weights.get(ch, 0.0) for ch in info["ch_names"]])
            logger.info("SSP %s: %d events, %s explains %.0f%% of their average", kind.upper(),
                        n, proj["desc"], 100 * float(proj.get("explained_var") or 0.0))
    basis = np.zeros((len(good), 0))
    if vectors:
        u, sv, _ = np.linalg.svd(np.asarray(vectors).T, full_matrices=False)
        basis = np.zeros((len(good), int((sv > 1e-10 * sv[0]).sum())))
        basis[good] = u[:, :basis.shape[1]]
    return basis, counts


@dataclass
class RecordingEpochs:
    """Epochs of one recording before scaling, over *all* its MEG channels."""

    X: np.ndarray  # (n_epochs, n_meg, n_times) float32
    trials: pd.DataFrame
    info: mne.Info  # after decimation
    bads: list[str]
    sfreq_in: float
    artifacts: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)  # artifact_sums


def epoch_recording(
    recording: Recording, *, bids_root: str | Path, spec: EventSpec, params: MegParams
) -> RecordingEpochs:
    """Filter, decimate and epoch one recording (before scaling).

    Bad channels are kept (and listed) so that the runs of a subject align channel by channel.
    """
    events = read_events(recording.events_path, bids_root=bids_root, spec=spec)
    raw = read_raw(recording)
    check_events_within(events, duration=raw.times[-1], tmin=params.tmin, tmax=params.tmax,
                        path=recording.events_path)
    meg_picks = mne.pick_types(raw.info, meg=True, ref_meg=False, exclude=[])
    if len(meg_picks) == 0:
        raise DataError("recording has no MEG channels", path=recording.fpath)
    exg_picks = mne.pick_types(raw.info, meg=False, eog=True, ecg=True, exclude=[])
    raw.pick(np.concatenate([meg_picks, exg_picks])).load_data(verbose=False)
    for block in time_blocks(raw, 8192):
        check_finite(block, path=recording.fpath, what="MEG, EOG and ECG data")
    artifact_times = artifact_events(raw, params)
    raw.pick(np.arange(len(meg_picks)))
    bads = list(raw.info["bads"])
    sfreq_in = raw.info["sfreq"]
    raw = filter_and_decimate(raw, params)
    if params.bad_channels == "auto":
        good = [i for i, ch in enumerate(raw.ch_names) if ch not in bads]
        auto = detect_bad_channels(raw.get_data(picks=good), threshold=params.bad_threshold)
        bads += [raw.ch_names[good[i]] for i in np.flatnonzero(auto)]
    X = cut_epochs(raw, events, params, path=recording.events_path).astype(np.float32)
    trials = events.assign(subject=recording.subject, session=recording.session or "n/a",
                           run=recording.run or "n/a", recording=recording.fpath.name)
    return RecordingEpochs(X, trials, raw.info, sorted(set(bads)), sfreq_in,
                           artifact_sums(raw, artifact_times))


def epoch_to_file(recording: Recording, *, bids_root: str | Path, spec: EventSpec,
                  params: MegParams, path: str | Path) -> RecordingEpochs:
    """:func:`epoch_recording`, its epochs saved to ``path`` (``.npy``) instead of returned
    (``X`` is then a zero-row placeholder): the task a preprocessing worker runs."""
    part = epoch_recording(recording, bids_root=bids_root, spec=spec, params=params)
    np.save(path, part.X)
    part.X = np.empty((0, *part.X.shape[1:]), np.float32)
    return part


def preprocess_meg(
    recordings: Sequence[Recording],
    *,
    bids_root: str | Path,
    spec: EventSpec,
    params: MegParams,
    out: str | Path | None = None,
    n_jobs: int = 1,
    executor: str = "joblib",
    address: str | None = None,
    verbose: bool | str | None = None,
) -> Preprocessed:
    """Preprocess MEG recordings into per-subject scaled epochs.

    Recordings are epoched independently (``n_jobs`` workers of ``executor``; see
    :func:`~neurorecon.pipelines.common.parallel.map_tasks`), each into a part file; each
    subject's parts are then streamed through the scaler into ``out/sub-<label>/X.npy``,
    so memory does not grow with the number of trials.

    Parameters
    ----------
    recordings : list of Recording
        From :func:`neurorecon.pipelines.data.studies.find_recordings`.
    bids_root : path
        BIDS root (stimulus paths are checked under ``<bids_root>/<spec.stim_dir>``).
    spec : EventSpec
        Events columns.
    params : MegParams
        The recipe.
    out : path | None
        Folder to write the arrays into (a cache entry being written; it must be visible to
        every worker); None: a temporary one, the arrays are returned in memory.
    n_jobs, executor, address : int, str, str | None
        Workers (``-1``: every core), ``joblib`` | ``ray``, and a Ray cluster's address.
    verbose : bool | str | None
        Log level for this call.

    Returns
    -------
    Preprocessed
        ``X`` per subject is ``(n_trials, n_chans, n_times)`` (memory-mapped from ``out``);
        bad channels are zero and marked ``good=False`` in ``channels``; the recipe holds
        per-subject scaler statistics.
    """
    from neurorecon.models.common.logging import log_level

    from ..common.parallel import map_tasks

    with log_level(verbose), output_folder(out) as (folder, in_memory):
        scratch = folder / ".parts"
        scratch.mkdir(parents=True, exist_ok=True)
        items = [{"recording": r, "bids_root": bids_root, "spec": spec, "params": params,
                  "path": scratch / f"{k:05d}.npy"} for k, r in enumerate(recordings)]
        done = map_tasks(epoch_to_file, items, n_jobs=n_jobs, executor=executor,
                         address=address, desc="MEG recordings")
        by_subject: dict[str, list[tuple[Recording, RecordingEpochs, Path]]] = {}
        for item, part in zip(items, done, strict=True):
            by_subject.setdefault(item["recording"].subject, []).append(
                (item["recording"], part, item["path"]))
        subjects, recipe_subjects = {}, {}
        for subject, entries in by_subject.items():
            subjects[subject], recipe_subjects[subject] = _assemble_subject(
                subject, entries, folder, params=params, spec=spec, in_memory=in_memory)
        shutil.rmtree(scratch)
        recipe = {"params": params.to_dict(), "subjects": recipe_subjects}
        return Preprocessed("meg", subjects, recipe)


def _assemble_subject(subject: str, entries, folder: Path, *, params: MegParams,
                      spec: EventSpec, in_memory: bool) -> tuple[SubjectTrials, dict[str, Any]]:
    """One subject's part files -> its scaled (and repeat-averaged) ``X.npy``, streamed."""
    recs = [rec for rec, _, _ in entries]
    parts = [part for _, part, _ in entries]
    files = [RowFile(path) for *_, path in entries]
    ch_names = parts[0].info["ch_names"]
    for part, rec in zip(parts, recs, strict=True):
        if part.info["ch_names"] != ch_names:
            raise DataError(
                f"channel names differ from the subject's first recording "
                f"({recs[0].fpath.name})", path=rec.fpath,
                hint="runs of one subject must share their MEG channel set")
    bads = sorted(set().union(*(p.bads for p in parts)))
    good = np.array([ch not in bads for ch in ch_names])
    splits = [(p.trials["split"] == "train").to_numpy() for p in parts]
    if not any(s.any() for s in splits):
        raise DataError(f"sub-{subject}: no train trials to fit the scaler on",
                        path=recs[0].events_path)

    ssp, ssp_events = ssp_basis(parts, good, params)

    def train_blocks():
        for f, train in zip(files, splits, strict=True):
            for _, block in f.blocks(np.flatnonzero(train)):
                yield project_out(block, ssp)[:, good]

    center, scale = fit_robust_scaler(train_blocks, int(good.sum()))
    full_center, full_scale = np.zeros(len(ch_names)), np.ones(len(ch_names))
    full_center[good], full_scale[good] = center, scale
    trials = pd.concat([p.trials for p in parts], ignore_index=True)
    plan = repeat_plan(trials, stim_column=spec.stim_column,
                       average=params.average_test_repeats)
    n_times = files[0].row_shape[1]
    target = subject_dir(folder, subject) / "X.npy"
    assembler = TrialAssembler(target, plan, (len(ch_names), n_times),
                               average=params.average_test_repeats)
    offset = 0
    for f in files:
        for rows, block in f.blocks():
            assembler.add(rows + offset, scale_epochs(block, center=full_center,
                                                      scale=full_scale, good=good,
                                                      clamp=params.clamp, ssp=ssp))
        offset += len(f)
        f.path.unlink()
    trials = assembler.close()
    xy = sensor_layout(parts[0].info, range(len(ch_names)))
    kinds, ori = sensor_kinds(parts[0].info, range(len(ch_names)))
    channels = pd.DataFrame({"name": ch_names, "x": xy[:, 0], "y": xy[:, 1], "good": good,
                             "kind": kinds, "ori_x": ori[:, 0], "ori_y": ori[:, 1]})
    X = load_rows(target, in_memory=in_memory)
    logger.info("MEG sub-%s: %d trials x %d channels (%d bad) x %d samples, %d artifact "
                "projectors", subject, X.shape[0], X.shape[1], len(bads), X.shape[2],
                ssp.shape[1])
    recipe = {"sfreq_in": parts[0].sfreq_in, "ch_names": ch_names, "bads": bads,
              "scaler_center": full_center.tolist(), "scaler_scale": full_scale.tolist(),
              "n_times": n_times, "ssp": ssp.T.tolist(), "ssp_events": ssp_events}
    return SubjectTrials(subject, X, trials, channels), recipe
