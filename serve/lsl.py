"""The streaming decoder's LSL side: connect to an MEG stream (an ``mne_lsl.lsl.StreamInlet``),
feed its chunks to an :class:`~.streaming.OnlineDecoder`, take event onsets from a marker
stream or the stream's stim channel, reconnect with backoff when the source stops, and fan the
decoded messages out to WebSocket clients (:class:`Hub`) and an LSL outlet.

Discovery is scoped by liblsl's configuration (``LSLAPICFG``; ``shared/lsl_api.cfg`` keeps it
to this machine). Nothing here raises into the service: every failure becomes the status'
``state`` and ``error``.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger
from neurorecon.pipelines.inference import Decoder

from .lslconfig import use_loopback_discovery
from .settings import StreamSettings
from .streaming import OnlineDecoder, StreamParams

use_loopback_discovery()  # before liblsl loads (mne_lsl is imported where it is used)

#: FIFF unit codes the bundle's MEG channels are in (T, T/m)
SI_UNITS = {112: "T", 201: "T/m"}
OUTLET_TYPE = "neurorecon"
#: s of liblsl's backlog of the MEG stream: samples waiting while the model warms up or a
#: window is decoded (with 1 s, a replayed stream lost its first samples in the tests)
ACQUIRE_BUFFER_S = 10
#: s of samples taken per pull at most (a backlog is pulled in pieces of this length)
PULL_S = 0.1
#: markers taken per pull: mne-lsl frees one string per slot of the pull, used or not
MARKERS_PER_PULL = 16


class Hub:
    """Fan-out of decoded messages to WebSocket clients: one bounded queue per client (the
    newest message wins when it is full), and the latest message for clients that (re)join."""

    def __init__(self, queue_size: int = 16):
        self.queue_size = queue_size
        self.loop: asyncio.AbstractEventLoop | None = None
        self.clients: set[asyncio.Queue] = set()
        self.latest: dict[str, Any] | None = None
        self.dropped = 0  # messages a slow client never got

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.queue_size)
        self.clients.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self.clients.discard(queue)

    def publish(self, message: dict[str, Any]) -> None:
        """From any thread."""
        if message.get("type", "decoded") == "decoded":
            self.latest = message
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._fanout, message)

    def _fanout(self, message: dict[str, Any]) -> None:
        for queue in list(self.clients):
            if queue.full():
                queue.get_nowait()  # newest wins: a slow client skips, nobody waits
                self.dropped += 1
            queue.put_nowait(message)


class DecodedOutlet:
    """LSL outlet ``neurorecon-decoded`` (float32, irregular rate): per message ``seq``,
    ``latency_ms``, ``confidence``, then the top-k gallery rows and their scores, stamped
    with the LSL time of the input sample the window ends at."""

    def __init__(self, name: str, k: int, source_id: str):
        from mne_lsl.lsl import StreamInfo, StreamOutlet

        self.k = k
        info = StreamInfo(name=name, stype=OUTLET_TYPE, n_channels=3 + 2 * k, sfreq=0.0,
                          dtype="float32", source_id=source_id)
        info.set_channel_names(["seq", "latency_ms", "confidence",
                                *(f"row_{i + 1}" for i in range(k)),
                                *(f"score_{i + 1}" for i in range(k))])
        self.outlet = StreamOutlet(info)

    def push(self, message: dict[str, Any]) -> None:
        top = message["topk"]
        if not top:
            return
        rows = [h["row"] for h in top] + [-1] * (self.k - len(top))
        scores = [h["score"] for h in top] + [np.nan] * (self.k - len(top))
        values = np.array([message["seq"], message["latency_ms"],
                           np.nan if message["confidence"] is None else message["confidence"],
                           *rows, *scores], np.float32)
        self.outlet.push_sample(values, timestamp=message["t_lsl"] or 0.0)


class StreamService:
    """Decode one LSL stream continuously in background threads; :meth:`status` for the API."""

    def __init__(self, decoders: dict[str, Decoder], settings: StreamSettings, hub: Hub, *,
                 on_message: Callable[[dict[str, Any]], None] | None = None):
        self.decoders, self.settings, self.hub = decoders, settings, hub
        self.on_message = on_message
        self.state = "idle"
        self.error: str | None = None
        self.online: OnlineDecoder | None = None
        self.model: str | None = None
        self.reconnects = 0
        self.connected_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_chunk = 0.0
        self._outlet: DecodedOutlet | None = None
        self._markers = None
        self._stim: int | None = None
        self._stim_last = 0.0
        self._preview = ThreadPoolExecutor(max_workers=1)
        self._preview_busy = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if not self.settings.source:
            self.state, self.error = "idle", None
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="neurorecon-stream",
                                        daemon=True)
        self._thread.start()

    def stop(self, *, wait: float = 10.0) -> None:
        """Stop decoding; waits up to ``wait`` s for the thread (a pending LSL resolve ends
        on its own timeout, then the thread exits)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=wait)
        self._thread = None
        self.state = "idle"
        self._preview.shutdown(wait=False, cancel_futures=True)

    def _decoder(self) -> tuple[str, Decoder]:
        megs = {k: d for k, d in self.decoders.items() if d.modality == "meg"}
        model = self.settings.model
        if model is None:
            if len(megs) != 1:
                raise DataError(f"serve.stream.model is required: MEG bundles {sorted(megs)}")
            model = next(iter(megs))
        if model not in megs:
            raise DataError(f"serve.stream.model: {model!r} is not a loaded MEG bundle "
                            f"({sorted(megs)})")
        return model, megs[model]

    def _run(self) -> None:
        import torch

        torch.set_num_threads(self.settings.threads)
        backoff, ever = 0.5, False
        while not self._stop.is_set():
            self.state = "reconnecting" if ever else "connecting"
            stream = None
            try:
                model, decoder = self._decoder()
                subject = str(self.settings.subject).removeprefix("sub-")
                if subject in decoder.config.subjects:
                    # before the stream's samples start to queue
                    decoder.warm_up(subject, split=self.settings.split)
                # what is loaded now stays: later collections skip it (no long gen-2 pauses
                # in the decoding thread); before connecting, as the collection takes a while
                gc.collect()
                gc.freeze()
                self._markers = self._open_markers()  # before the data: no marker missed
                # pulled only by _watch, so the filter sees the stream from its first sample
                stream = _DataInlet(self.settings.source, timeout=2)
                if self._stop.is_set():
                    break
                online = self._online(decoder, stream)
                self._outlet = self._outlet or DecodedOutlet(
                    self.settings.outlet, self.settings.top_k,
                    source_id=f"neurorecon-{model}")
                self.online, self.model = online, model
                self._last_chunk = time.monotonic()
                self.state, self.error, backoff = "connected", None, 0.5
                if ever:
                    self.reconnects += 1
                ever = True
                self.connected_since = time.time()
                logger.info("stream: decoding %s (sub-%s, %d channels at %g Hz) with %s",
                            self.settings.source, online.subject, len(stream.info.ch_names),
                            online.sfreq, model)
                self._watch(stream)
            except _NotFound as exc:
                self.error = str(exc)
            except DataError as exc:  # a stream this bundle cannot decode: say it, retry
                self.state, self.error = "error", str(exc)
                logger.error("stream: %s", exc)
            except Exception as exc:  # noqa: BLE001 - never let the streamer die
                self.state, self.error = "error", f"{type(exc).__name__}: {exc}"
                logger.exception("stream: unexpected error")
            finally:
                self._close(stream)
            self._stop.wait(backoff)
            backoff = min(8.0, backoff * 2)

    def _watch(self, stream) -> None:
        """Connected: pull chunks (each goes through :meth:`_callback`); stale after
        ``stale_s`` without data, reconnect after ``reconnect_s``."""
        while not self._stop.is_set():
            stream.pull(self._callback)
            self._stop.wait(0.002)
            age = time.monotonic() - self._last_chunk
            if age > self.settings.reconnect_s:
                logger.warning("stream: no data for %.1f s; reconnecting", age)
                return
            self.state = "stale" if age > self.settings.stale_s else "connected"

    def _close(self, stream) -> None:
        closers = [stream.close] if stream is not None else []
        if self._markers is not None:
            closers.append(self._markers.close_stream)
        for close in closers:
            try:
                close()
            except Exception:  # noqa: BLE001 - closing a dead stream may fail; nothing to do
                pass
        self._markers = None

    # ------------------------------------------------------------------ connection checks
    def _online(self, decoder: Decoder, stream) -> OnlineDecoder:
        info = decoder.config.subjects.get(str(self.settings.subject).removeprefix("sub-"))
        units = [(ch["unit"], ch["unit_mul"]) for ch in stream.info["chs"]]
        names = list(stream.info.ch_names)
        factor = np.ones(len(names))
        if info is not None:
            wanted = set(info.ch_names)
            wrong = []
            for i, (name, (unit, mul)) in enumerate(zip(names, units, strict=True)):
                if name in wanted:
                    if int(unit) not in SI_UNITS:
                        wrong.append(f"{name} ({unit})")
                    factor[i] = 10.0 ** int(mul)
            if wrong:
                raise DataError(f"stream {self.settings.source!r}: {len(wrong)} of the "
                                f"bundle's channels are not in T or T/m, e.g. {wrong[:3]}")
        types = stream.info.get_channel_types()
        self._stim = next((i for i, t in enumerate(types) if t == "stim"), None) \
            if not self.settings.markers else None
        self._stim_last = 0.0
        params = StreamParams(hop=self.settings.hop, top_k=self.settings.top_k,
                              ring_s=self.settings.ring_s, warmup_s=self.settings.warmup_s,
                              embeddings=self.settings.embeddings, split=self.settings.split)
        return OnlineDecoder(decoder, subject=str(self.settings.subject), ch_names=names,
                             sfreq=float(stream.info["sfreq"]), units=factor, params=params,
                             publish=self._publish)

    def _open_markers(self):
        if not self.settings.markers:
            return None
        from mne_lsl.lsl import StreamInlet, resolve_streams

        found = resolve_streams(timeout=2, name=self.settings.markers)
        if not found:
            raise _NotFound(f"no LSL marker stream named {self.settings.markers!r}")
        inlet = StreamInlet(found[0], processing_flags=["clocksync"])
        inlet.open_stream(timeout=2)
        inlet.time_correction(timeout=2)  # now: the first pull would wait for it (~0.6 s)
        return inlet

    # ------------------------------------------------------------------ data path
    def _callback(self, data: np.ndarray, timestamps: np.ndarray) -> None:
        """The decoding thread, once per chunk ``(n_samples, n_chans)``: markers, stim
        onsets, decode."""
        arrival = time.perf_counter()
        self._last_chunk = time.monotonic()
        online = self.online
        if online is None:
            return
        try:
            if self._markers is not None:
                values, ts = self._markers.pull_chunk(timeout=0.0,
                                                      max_samples=MARKERS_PER_PULL)
                for value, t in zip(values, ts, strict=False):
                    online.add_marker(float(t), str(np.ravel(value)[0]))
            elif self._stim is not None:
                stim = np.asarray(data[:, self._stim], float)
                before = np.concatenate([[self._stim_last], stim[:-1]])
                for i in np.flatnonzero((stim != 0) & (before == 0)):
                    online.add_marker(float(timestamps[i]), str(int(stim[i])))
                self._stim_last = float(stim[-1])
            online.push(data, timestamps, arrival=arrival)
        except Exception as exc:  # noqa: BLE001 - a bad chunk must not disconnect the stream
            self.error = f"{type(exc).__name__}: {exc}"
            logger.exception("stream: chunk failed")

    def _publish(self, message: dict[str, Any]) -> None:
        message["type"], message["model"] = "decoded", self.model
        if self._outlet is not None:
            try:
                self._outlet.push(message)
            except Exception:  # noqa: BLE001
                logger.exception("stream: LSL outlet push failed")
        self.hub.publish(message)
        if self.on_message is not None:
            self.on_message(message)
        every = self.settings.preview_every
        if every and message["seq"] % every == 0 and message["topk"] and \
                not self._preview_busy.is_set():
            self._preview_busy.set()
            self._preview.submit(self._make_preview, message["seq"])

    def _make_preview(self, seq: int) -> None:
        """A low-rate reconstruction from the latest window (regression head)."""
        try:
            online = self.online
            if online is None or online.last_window is None:
                return
            x, keep, found = online.last_window
            decoder = online.decoder
            emb = decoder.encode(x, subject=online.subject, head=decoder.generation_head,
                                 mask=keep)
            image = decoder.reconstruct(emb, subject=online.subject, lowlevel=x[None],
                                        retrieval=found)[0]
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            self.hub.publish({"type": "preview", "seq": seq, "note": image.info.get(
                "neurorecon_note", ""), "image": "data:image/png;base64,"
                + base64.b64encode(buf.getvalue()).decode()})
        except Exception:  # noqa: BLE001 - previews are best effort
            logger.exception("stream: preview failed")
        finally:
            self._preview_busy.clear()

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        online = self.online
        out = {"state": self.state, "error": self.error, "source": self.settings.source,
               "markers": self.settings.markers, "subject": self.settings.subject,
               "model": self.model or self.settings.model, "hop": self.settings.hop,
               "reconnects": self.reconnects, "connected_since": self.connected_since,
               "clients": len(self.hub.clients), "client_drops": self.hub.dropped,
               "events_from": ("markers" if self.settings.markers else
                               "stim channel" if self._stim is not None else None)}
        if online is not None:
            out.update(online.stats())
        return out


class _DataInlet:
    """The MEG stream's inlet, pulled by the decoding thread (:meth:`pull`), chunks straight
    to the decoder.

    Not ``mne_lsl.stream.StreamLSL``: its ring buffer, which the decoder never reads, is
    copied whole (``np.roll``) after every chunk, e.g. 2 s x 307 channels x 8 bytes = 10 MB
    200 times a second at 2000 Hz: most of a core, and the model's weights flushed from the
    cache before each window.
    """

    def __init__(self, name: str, *, timeout: float):
        from mne_lsl.lsl import StreamInlet, resolve_streams

        found = resolve_streams(timeout=timeout, name=name)
        if len(found) != 1:
            raise _NotFound(f"no LSL stream named {name!r} on this machine" if not found else
                            f"{len(found)} LSL streams named {name!r} on this machine")
        if found[0].sfreq <= 0 or found[0].dtype == "string":
            raise DataError(f"LSL stream {name!r} is not a regularly sampled numeric stream "
                            f"(rate {found[0].sfreq:g} Hz, {found[0].dtype})")
        self.inlet = StreamInlet(found[0], max_buffered=ACQUIRE_BUFFER_S,
                                 processing_flags=["clocksync"])
        self.inlet.open_stream(timeout=timeout)
        self.inlet.time_correction(timeout=timeout)  # now: the first pull would wait for it
        self.info = self.inlet.get_sinfo().get_channel_info()  # mne.Info: names, kinds, units
        self.max_samples = max(1, round(PULL_S * found[0].sfreq))

    def pull(self, callback: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """Every sample waiting, in chunks of at most :data:`PULL_S` s, to ``callback``."""
        while True:
            data, ts = self.inlet.pull_chunk(timeout=0.0, max_samples=self.max_samples)
            if ts.size:
                callback(data, ts)
            if ts.size < self.max_samples:
                return

    def close(self) -> None:
        self.inlet.close_stream()


class _NotFound(Exception):
    """The stream (or marker stream) is not on this machine (yet)."""
