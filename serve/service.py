"""The service's shared state: settings, decoders, API keys, the job store, the stream (its
supervised decoder process, :mod:`.stream_process`), rate limits, metrics and the supervised
job worker processes (:class:`Service`)."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import uuid
from collections import deque

from neurorecon.models.common.logging import logger
from neurorecon.pipelines.inference import Decoder

from .bundles import load_bundles
from .children import launch
from .keys import KeyRing
from .lsl import Hub
from .metrics import Metrics
from .settings import ServeSettings, StreamSettings
from .store import JobStore
from .stream_process import StreamProcess


class Service:
    """What the routes need: settings, decoders, keys, the job store, limits, metrics."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.keys = KeyRing.load(settings.api_keys_file)
        self.decoders: dict[str, Decoder] = load_bundles(settings.bundles)
        self.store = JobStore(settings.data_dir)
        self.hub = Hub(settings.stream.client_queue)
        self.streamer = self._stream(settings.stream)
        self.metrics = Metrics(self.store, streamer=lambda: self.streamer)
        self.workers: list[subprocess.Popen] = []
        self._hits: dict[str, deque] = {}
        self._lock = threading.Lock()

    def allow(self, owner: str) -> float | None:
        """Sliding one-minute window per key: None if allowed, else seconds to wait."""
        now = time.monotonic()
        with self._lock:
            hits = self._hits.setdefault(owner, deque())
            while hits and hits[0] <= now - 60:
                hits.popleft()
            if len(hits) >= self.settings.rate_limit_per_minute:
                return max(0.0, 60 - (now - hits[0]))
            hits.append(now)
        return None

    def restart_stream(self, settings: StreamSettings) -> None:
        """Decode another stream (or none): the old session stops, a new one starts."""
        self.streamer.stop(wait=2.0)
        self.streamer = self._stream(settings)
        self.streamer.start()

    def _stream(self, settings: StreamSettings) -> StreamProcess:
        """The decoder process of a stream session (started by ``start()``)."""
        return StreamProcess(self.settings, settings, self.hub, log_dir=self.store.root)

    # ------------------------------------------------------------------ workers
    def n_worker_processes(self) -> int:
        return 1 if self.settings.executor == "ray" else self.settings.workers

    def start_worker(self, k: int) -> subprocess.Popen:
        proc = launch("worker", self.settings.model_dump_json(), f"w{k}-{uuid.uuid4().hex[:6]}",
                      log=self.store.root / f"worker-{k}.log")
        logger.info("serve: worker %d started (pid %d)", k, proc.pid)
        return proc

    async def supervise(self) -> None:
        """Restart a worker that died (backoff up to 30 s)."""
        delays = [1.0] * len(self.workers)
        while True:
            await asyncio.sleep(0.5)
            for k, proc in enumerate(self.workers):
                if proc.poll() is not None:
                    logger.warning("serve: worker %d exited (code %s); restarting in %.0f s",
                                   k, proc.returncode, delays[k])
                    await asyncio.sleep(delays[k])
                    delays[k] = min(30.0, delays[k] * 2)
                    self.workers[k] = self.start_worker(k)

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.workers:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
