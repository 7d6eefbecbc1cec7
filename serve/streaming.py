"""Real-time MEG decoding, without the LSL plumbing: raw chunks in, decoded messages out.

:class:`OnlineDecoder` is built once per stream connection from a bundle's
:class:`~neurorecon.pipelines.inference.Decoder` and the stream's channel names, rate and
units. Each chunk goes through the bundle's causal filter and decimation
(:class:`~neurorecon.pipelines.preprocess.meg.StreamingMegFilter`, the offline
``phase=causal`` transform) into a fixed-size ring buffer; windows of the bundle's epoch
length are then cut every ``hop`` seconds (sliding mode) and around each marker (event mode)
and go through ``Decoder.meg_window`` (baseline, frozen scaler, clamp) -> ``encode`` ->
``retrieve``. No second implementation of any of these.

Faults are flagged, not hidden: a gap in the timestamps (dropped chunks) or a clock jump
resets the filter state (the window is marked ``gap``, then ``warmup`` until the buffer holds
filtered data again); channels with NaNs, flat or saturated in the window are masked out of the
spatial attention (``quality`` counts them) and decoding goes on. Memory is fixed: two ring
buffers sized at connection time.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from neurorecon.models.common.checks import DataError
from neurorecon.pipelines.inference import Decoder

#: |value| at or above which an MEG sample counts as saturated (T for magnetometers and axial
#: gradiometers, T/m for planar ones): far beyond brain signals (1e-13..1e-11 T)
SATURATION = {"mag": 1e-8, "axial": 1e-8, "planar": 1e-6}
#: a channel whose peak-to-peak amplitude in the window is below this is flat (T or T/m)
FLAT_PTP = 1e-16


@dataclass(frozen=True)
class StreamParams:
    """What the decoder does with a stream (the ``serve.stream`` settings it needs)."""

    hop: float = 0.1  # s between sliding windows (0: sliding mode off)
    top_k: int = 5
    ring_s: float = 10.0  # seconds of decimated data kept
    warmup_s: float = 1.0  # after a (re)start, windows are flagged while the filter settles
    gap_tolerance: float = 2.5  # missing samples (in sample periods) before a gap is declared
    embeddings: bool = False  # include the embedding in each message
    split: str | None = None  # restrict candidates to one gallery split


class OnlineDecoder:
    """One stream of one subject through a bundle.

    Parameters
    ----------
    decoder : Decoder
        A causal MEG bundle.
    subject : str
        The subject whose per-subject statistics (scaler, layout, subject layer) apply.
    ch_names : sequence of str
        The stream's channel names, in stream order.
    sfreq : float
        The stream's nominal rate (Hz).
    units : sequence of float | None
        Per stream channel, the factor that turns stream values into SI (T, T/m); None: SI.
    params : StreamParams
    publish : callable
        Called with each message (a dict, JSON-ready).

    Raises
    ------
    DataError
        When the stream cannot be decoded by this bundle: another rate that the decimation
        cannot reach, a zero-phase bundle, or fewer than half of the bundle's channels.
    """

    def __init__(self, decoder: Decoder, *, subject: str, ch_names: Sequence[str],
                 sfreq: float, units: Sequence[float] | None = None,
                 params: StreamParams = StreamParams(),
                 publish: Callable[[dict[str, Any]], None] = lambda m: None):
        self.decoder, self.params, self.publish = decoder, params, publish
        self.subject = str(subject).removeprefix("sub-")
        info = decoder.config.subjects.get(self.subject)
        if info is None:
            raise DataError(f"serve.stream.subject: unknown subject {subject!r}; the bundle "
                            f"knows {decoder.subjects}")
        self.recipe = decoder.meg_params
        self.filter = decoder.streaming_filter(self.subject, sfreq=sfreq)  # checks rate, phase
        self.sfreq = float(sfreq)
        names = list(info.ch_names)
        position = {name: i for i, name in enumerate(ch_names)}
        self.present = np.array([n in position for n in names])
        if self.present.sum() < len(names) / 2:
            raise DataError(f"the stream lacks {int((~self.present).sum())} of the bundle's "
                            f"{len(names)} channels (e.g. "
                            f"{[n for n in names if n not in position][:3]})",
                            hint="stream the MEG system and channel set the bundle was "
                                 "trained on")
        self.missing = [n for n in names if n not in position]
        # the channels the model uses: present in the stream and good in training
        self.used = self.present & np.asarray(info.good, bool)
        self.picks = np.array([position.get(n, 0) for n in names])
        factor = np.ones(len(ch_names)) if units is None else np.asarray(units, float)
        self.to_si = np.where(self.present, factor[self.picks], 0.0)
        kinds = info.kinds
        self.saturation = np.array([SATURATION.get(k, 1e-8) for k in kinds])
        self.n_chans, self.n_times = len(names), info.n_times
        self.ratio = self.filter.rate.ratio  # stream samples per output sample
        self.sfreq_dec = self.sfreq / self.ratio
        self.first = int(round(self.recipe.tmin * self.sfreq_dec))  # onset -> window start
        # fixed-size rings, one slot per decimated sample: filtered data and timestamps, and
        # the raw samples' min / max / any-NaN per slot (signal quality of any window)
        self.cap = max(int(math.ceil(params.ring_s * self.sfreq_dec)), 2 * self.n_times + 2)
        self.ring = np.zeros((self.n_chans, self.cap))
        self.ring_ts = np.full(self.cap, np.nan)
        self.slot_min = np.zeros((self.n_chans, self.cap))
        self.slot_max = np.zeros((self.n_chans, self.cap))
        self.slot_nan = np.zeros((self.n_chans, self.cap), bool)
        self.seq = 0
        self.samples = self.gaps = self.dropped = self.clock_jumps = 0
        self.latencies: deque[float] = deque(maxlen=2000)
        #: where the time goes (ms, the last 2000 of each): per chunk the filter and rate
        #: conversion, per decoded window its preparation, the encoder and the retrieval
        self.timings: dict[str, deque[float]] = {
            stage: deque(maxlen=2000) for stage in ("filter", "window", "encode", "retrieve")}
        self.pending: list[tuple[float, str]] = []  # markers waiting for their last sample
        self.last_quality: dict[str, Any] | None = None
        # (model input, mask, its clip-head embedding) of the latest decoded window
        self.last_window: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._reset(None)
        decoder.warm_up(self.subject, mask=self.used, split=params.split)  # caches, this mask

    # ------------------------------------------------------------------ state
    def _reset(self, reason: str | None) -> None:
        """Forget filter state and buffers (start, gap, clock jump)."""
        self.filter.reset()
        self.n_dec = 0  # decimated samples written since the reset
        self.n_raw = 0  # raw samples since the reset
        self.last_ts: float | None = None
        self.t0: float | None = None  # timestamp of the first raw sample since the reset
        self.hold = np.zeros(self.n_chans)  # last finite value per channel (NaN bursts)
        self.next_slide = None
        self.gap_pending = reason is not None

    @property
    def window_s(self) -> float:
        return self.n_times / self.sfreq_dec

    # ------------------------------------------------------------------ input
    def add_marker(self, timestamp: float, value: str) -> None:
        """A marker (event onset, LSL time): its epoch is decoded once its last sample is in."""
        self.pending.append((float(timestamp), str(value)))
        self.pending.sort()

    def push(self, chunk: np.ndarray, timestamps: np.ndarray, *,
             arrival: float | None = None) -> list[dict[str, Any]]:
        """A ``(n_samples, n_stream_channels)`` chunk with its LSL timestamps; returns (and
        publishes) the messages it completes. A gap or a clock jump, at the chunk's start or
        inside it, resets the filter there."""
        arrival = time.perf_counter() if arrival is None else arrival
        timestamps = np.asarray(timestamps, float)
        if not len(timestamps):
            return []
        data = np.asarray(chunk, float)
        prev = timestamps[0] - 1 / self.sfreq if self.last_ts is None else self.last_ts
        steps = np.diff(timestamps, prepend=prev) * self.sfreq
        breaks = np.flatnonzero((steps < -0.5) | (steps - 1 > self.params.gap_tolerance))
        bounds = np.unique(np.r_[0, breaks, len(timestamps)])
        messages = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            if lo in breaks:
                self._break(steps[lo])
            messages += self._segment(data[lo:hi], timestamps[lo:hi], arrival)
        return messages

    def _break(self, step: float) -> None:
        """A step of ``step`` sample periods between two samples: a clock jump or a gap."""
        self.gaps += 1
        if step < -0.5:  # the clock went back
            self.clock_jumps += 1
            self._reset("clock jump")
        else:
            self.dropped += int(round(step)) - 1
            self._reset("gap")

    def _segment(self, chunk: np.ndarray, timestamps: np.ndarray,
                 arrival: float) -> list[dict[str, Any]]:
        """A piece of a chunk without breaks inside."""
        t_filter = time.perf_counter()
        x = chunk[:, self.picks].T * self.to_si[:, None]
        n = x.shape[1]
        self.samples += n
        if self.t0 is None:
            self.t0 = float(timestamps[0])
        bad = ~np.isfinite(x)
        self._write_slots(x, bad)
        if bad.any():  # hold the last finite value so the filter state stays finite
            for c in np.flatnonzero(bad.any(axis=1)):
                row = x[c]
                idx = np.where(~bad[c], np.arange(n), -1)
                np.maximum.accumulate(idx, out=idx)
                row[:] = np.where(idx >= 0, row[np.maximum(idx, 0)], self.hold[c])
        self.hold = x[:, -1].copy()
        rate = self.filter.rate
        n_in, n_out = rate.n_in, rate.n_out
        out = self.filter.process(x)
        # each output sample's time: its position between the stream samples around it (the
        # first may lie between the previous chunk's last sample and this chunk's first)
        pos = rate.positions(n_out, rate.n_out) - n_in
        prev = timestamps[0] - 1 / self.sfreq if self.last_ts is None else self.last_ts
        self._write_ring(out, np.interp(pos, np.arange(-1, n), np.r_[prev, timestamps]))
        self.timings["filter"].append((time.perf_counter() - t_filter) * 1e3)
        self.n_raw += n
        self.last_ts = float(timestamps[-1])
        return self._due(arrival)

    def _write_slots(self, x: np.ndarray, bad: np.ndarray) -> None:
        """Per slot (the raw samples of one decimated sample): min, max and any NaN."""
        slots = np.floor((self.n_raw + np.arange(x.shape[1])) / self.ratio).astype(np.int64)
        starts = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]])
        any_bad = bad.any()  # the usual chunk has none: no masked copies then
        lo = np.minimum.reduceat(np.where(bad, np.inf, x) if any_bad else x, starts, axis=1)
        hi = np.maximum.reduceat(np.where(bad, -np.inf, x) if any_bad else x, starts, axis=1)
        nan = np.logical_or.reduceat(bad, starts, axis=1)
        idx = slots[starts] % self.cap
        # the first slot continues the previous chunk's last one
        if self.n_raw and slots[0] == np.floor((self.n_raw - 1) / self.ratio):
            first = idx[0]
            lo[:, 0] = np.minimum(lo[:, 0], self.slot_min[:, first])
            hi[:, 0] = np.maximum(hi[:, 0], self.slot_max[:, first])
            nan[:, 0] |= self.slot_nan[:, first]
        self.slot_min[:, idx], self.slot_max[:, idx], self.slot_nan[:, idx] = lo, hi, nan

    def _write_ring(self, out: np.ndarray, ts: np.ndarray) -> None:
        m = out.shape[1]
        if not m:
            return
        idx = (self.n_dec + np.arange(m)) % self.cap
        self.ring[:, idx] = out
        self.ring_ts[idx] = ts[:m]
        self.n_dec += m

    # ------------------------------------------------------------------ windows
    def _ring(self, start: int, stop: int) -> slice | np.ndarray:
        """Ring slots of the output samples ``[start, stop)`` (absolute indices since the
        reset): a slice (a view, no copy) unless they wrap around the ring's end."""
        a, b = start % self.cap, (stop - 1) % self.cap + 1
        return slice(a, b) if a < b else np.arange(start, stop) % self.cap

    def _window(self, end: int) -> np.ndarray:
        """Output samples ``[end - n_times, end)``."""
        return self.ring[:, self._ring(end - self.n_times, end)]

    def _due(self, arrival: float) -> list[dict[str, Any]]:
        messages = []
        # event mode: markers whose epoch is complete
        while self.pending and self.t0 is not None:
            t_m, value = self.pending[0]
            # the nearest input sample, then the decimated one (half to even, as the offline
            # epochs: a marker on an input sample between two kept ones lands where it does)
            onset = round(round((t_m - self.t0) * self.sfreq) / self.ratio)
            start = onset + self.first
            end = start + self.n_times
            if end > self.n_dec:
                break  # not all in yet
            self.pending.pop(0)
            if start < max(0, self.n_dec - self.cap):
                messages.append(self._message("event", None, arrival, marker=value,
                                              error="marker too old or before a gap: its "
                                                    "epoch is not in the buffer"))
                continue
            messages.append(self._decode(end, "event", arrival, marker=value))
        # sliding mode: the latest window every hop seconds of stream time; after an event's
        # decoding it waits for the next chunk, so that neither waits for the other
        if self.params.hop > 0 and self.n_dec >= 1 and not messages:
            latest = self.ring_ts[(self.n_dec - 1) % self.cap]
            if self.next_slide is None:
                self.next_slide = latest
            if latest >= self.next_slide:
                messages.append(self._decode(self.n_dec, "sliding", arrival))
                self.next_slide = max(self.next_slide + self.params.hop,
                                      latest - self.params.hop / 2)
        for message in messages:
            self.publish(message)
        return messages

    def _quality(self, end: int) -> tuple[dict[str, Any], np.ndarray]:
        """Signal quality of the window ending at ``end`` and the channels to mask."""
        idx = self._ring(max(end - self.n_times, 0), max(end, 1))
        nan = self.slot_nan[:, idx].any(axis=1) & self.used
        lo, hi = self.slot_min[:, idx].min(axis=1), self.slot_max[:, idx].max(axis=1)
        saturated = (np.maximum(np.abs(lo), np.abs(hi)) >= self.saturation) & self.used \
            & ~nan & np.isfinite(lo)
        flat = ((hi - lo) < FLAT_PTP) & self.used & ~nan & ~saturated  # a railed one is
        # saturated, not flat
        warmup = end < self.n_times or (self.n_dec - self.n_times) < self.params.warmup_s * \
            self.sfreq_dec
        quality = {"gap": bool(self.gap_pending), "nan_channels": int(nan.sum()),
                   "flat_channels": int(flat.sum()),
                   "saturated_channels": int(saturated.sum()), "warmup": bool(warmup),
                   "missing_channels": int((~self.present).sum())}
        return quality, self.used & ~nan & ~flat & ~saturated

    def _decode(self, end: int, mode: str, arrival: float, *,
                marker: str | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        quality, keep = self._quality(end)
        if end < self.n_times:  # not a full window since the reset
            return self._message(mode, end, arrival, marker=marker, quality=quality,
                                 error="warm-up: less than one window since the stream "
                                       "(re)started")
        x = self.decoder.meg_window(self._window(end), subject=self.subject)
        x[~keep] = 0.0
        t1 = time.perf_counter()
        emb = self.decoder.encode(x, subject=self.subject, mask=keep)
        self.last_window = (x, keep, emb)
        t2 = time.perf_counter()
        hits = self.decoder.retrieve(emb, k=self.params.top_k, split=self.params.split)[0]
        t3 = time.perf_counter()
        for stage, dt in (("window", t1 - t0), ("encode", t2 - t1), ("retrieve", t3 - t2)):
            self.timings[stage].append(dt * 1e3)
        self.gap_pending = False
        return self._message(mode, end, arrival, marker=marker, quality=quality, hits=hits,
                             embedding=emb[0])

    def _message(self, mode: str, end: int | None, arrival: float, *, marker=None,
                 quality=None, hits=None, embedding=None, error=None) -> dict[str, Any]:
        self.seq += 1
        t_lsl = None if end is None or end < 1 else float(self.ring_ts[(end - 1) % self.cap])
        msg: dict[str, Any] = {"seq": self.seq, "mode": mode, "t_lsl": t_lsl}
        if marker is not None:
            msg["marker"] = marker
        msg["topk"] = [] if hits is None else [
            {"id": h["image_id"], "score": round(h["score"], 5), "row": h["row"],
             "concept": h["concept"]} for h in hits]
        scores = [h["score"] for h in hits or []]
        msg["confidence"] = (round(scores[0] - scores[1], 5) if len(scores) > 1 else None)
        # no window (a marker too old, a failed window): the same keys, nothing counted
        msg["quality"] = quality or {"gap": bool(self.gap_pending), "nan_channels": 0,
                                     "flat_channels": 0, "saturated_channels": 0,
                                     "warmup": True, "missing_channels": 0}
        if error:
            msg["error"] = error
        if embedding is not None and self.params.embeddings:
            msg["embedding"] = [float(v) for v in embedding]
        latency = (time.perf_counter() - arrival) * 1e3
        msg["latency_ms"] = round(latency, 3)
        self.latencies.append(latency)
        self.last_quality = msg["quality"]
        return msg

    # ------------------------------------------------------------------ status
    def stats(self) -> dict[str, Any]:
        def pct(values, q: float) -> float | None:
            return round(float(np.percentile(values, q)), 3) if len(values) else None

        timing = {stage: {"p50": pct(v, 50), "p99": pct(v, 99)}
                  for stage, v in self.timings.items() if len(v)}
        return {"samples": self.samples, "gaps": self.gaps, "dropped": self.dropped,
                "clock_jumps": self.clock_jumps, "messages": self.seq,
                "latency_p50_ms": pct(self.latencies, 50),
                "latency_p99_ms": pct(self.latencies, 99),
                "quality": self.last_quality, "missing_channels": self.missing[:20],
                "window_s": round(self.window_s, 4), "sfreq": self.sfreq,
                "pending_markers": len(self.pending), "timing_ms": timing}
