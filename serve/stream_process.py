"""The real-time MEG decoder as a process of its own, supervised by the service as the job
workers are: ``python -m neurorecon.serve.stream_process <serve settings json> <stream settings
json> <message fd> <parent pid>`` (:func:`.children.launch`).

Decoding runs in that process (:class:`~.lsl.StreamService`: LSL in, windows decoded, the LSL
outlet), so the API's event loop and the decoder do not share one interpreter lock, and a
decoder that crashes or hangs in native code (liblsl, torch) takes the service down with it
no longer: :class:`StreamProcess` restarts it with backoff and says so in the status. The
process sends JSON lines on a pipe of its own (not stdout, which libraries may print to): each
decoded message and preview, which the service fans out to its WebSocket clients
(:class:`~.lsl.Hub`), and its status every :data:`STATUS_EVERY_S` s. It exits when the
service process is gone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from neurorecon.models.common.logging import logger

from .children import launch
from .lsl import Hub
from .settings import ServeSettings, StreamSettings

#: s between the decoder process' status reports
STATUS_EVERY_S = 0.25
#: s before a decoder process that died is restarted: doubled per quick death, up to the last
RESTART_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
#: s a decoder process must have run for its next death to start the delays over
STABLE_S = 60.0


def _json(value: Any) -> Any:
    """numpy scalars and arrays in a status, as JSON values."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


class StreamProcess:
    """The service's handle on the decoder process of one stream session: :meth:`start`,
    :meth:`stop`, :meth:`status` (as :class:`~.lsl.StreamService`'s), messages relayed to
    ``hub``; a process that dies is restarted (``process_restarts`` in the status)."""

    def __init__(self, serve_settings: ServeSettings, settings: StreamSettings, hub: Hub, *,
                 log_dir: Path):
        self.serve_settings, self.settings, self.hub = serve_settings, settings, hub
        self.log_dir = Path(log_dir)
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._status: dict[str, Any] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()  # no process started once stop() has begun
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if not self.settings.source:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._supervise, daemon=True,
                                        name="neurorecon-stream-supervisor")
        self._thread.start()

    def stop(self, *, wait: float = 10.0) -> None:
        """Stop the decoder process (SIGTERM, then SIGKILL after ``wait`` s)."""
        with self._lock:
            self._stop.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=wait)
        self._thread = None
        self._status = {}

    def _spawn(self) -> tuple[subprocess.Popen, int]:
        read_fd, write_fd = os.pipe()
        proc = launch("stream_process", self.serve_settings.model_dump_json(),
                      self.settings.model_dump_json(), str(write_fd),
                      log=self.log_dir / "stream.log", pass_fds=(write_fd,))
        os.close(write_fd)
        logger.info("serve: stream decoder process started (pid %d) for %r", proc.pid,
                    self.settings.source)
        return proc, read_fd

    def _supervise(self) -> None:
        """Run the decoder process, relay what it sends; restart it when it dies."""
        delay = 0
        while True:
            with self._lock:
                if self._stop.is_set():
                    break
                self._proc, read_fd = self._spawn()
            started = time.monotonic()
            with os.fdopen(read_fd, "rb") as lines:
                for line in lines:  # until the process ends
                    self._relay(line)
            code = self._proc.wait()
            if self._stop.is_set():
                break
            self.restarts += 1
            delay = 0 if time.monotonic() - started > STABLE_S else min(
                delay + 1, len(RESTART_DELAYS_S) - 1)
            wait = RESTART_DELAYS_S[delay]
            error = (f"the decoder process exited (code {code}); restarting in {wait:g} s "
                     f"(log: {self.log_dir / 'stream.log'})")
            logger.warning("serve: %s", error)
            self._status = {**self._status, "state": "reconnecting", "error": error}
            if self._stop.wait(wait):
                break

    def _relay(self, line: bytes) -> None:
        try:
            item = json.loads(line)
        except ValueError:
            logger.warning("serve: unreadable line from the stream decoder process")
            return
        if item.get("kind") == "status":
            self._status = item["status"]
        elif item.get("kind") == "message":
            self.hub.publish(item["message"])

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        s = self.settings
        out = {"state": "idle" if not s.source else "connecting", "error": None,
               "source": s.source, "markers": s.markers, "subject": s.subject,
               "model": s.model, "hop": s.hop, **self._status}
        if self._stop.is_set() or not s.source:
            out["state"] = "idle"
        out.update(clients=len(self.hub.clients), client_drops=self.hub.dropped,
                   process_restarts=self.restarts)
        return out


class _PipeHub:
    """What :class:`~.lsl.StreamService` publishes to, in the decoder process: JSON lines on
    the pipe to the service (which holds the WebSocket clients)."""

    def __init__(self, fd: int):
        self.clients: set = set()  # the service's hub counts them
        self.dropped = 0
        self._out = os.fdopen(fd, "wb", buffering=0)
        self._lock = threading.Lock()

    def publish(self, message: dict[str, Any]) -> None:
        self.send({"kind": "message", "message": message})

    def send(self, item: dict[str, Any]) -> None:
        line = json.dumps(item, default=_json).encode() + b"\n"
        with self._lock:
            self._out.write(line)


def main(argv: list[str] | None = None) -> None:
    from neurorecon.models.common.logging import configure_cli_logging
    from neurorecon.pipelines.inference import MegDecoder

    from .bundles import load_bundles
    from .lsl import StreamService

    serve_json, stream_json, fd, parent = (sys.argv[1:] if argv is None else argv)
    configure_cli_logging()
    logging.getLogger("neurorecon").setLevel(logging.INFO)
    settings = ServeSettings.model_validate_json(serve_json)
    decoders = {k: d for k, d in load_bundles(settings.bundles).items()
                if isinstance(d, MegDecoder)}
    pipe = _PipeHub(int(fd))
    service = StreamService(decoders, StreamSettings.model_validate_json(stream_json), pipe)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    service.start()
    try:
        while not stopping.wait(STATUS_EVERY_S):
            if os.getppid() != int(parent):
                logger.warning("stream decoder: the service process is gone; exiting")
                break
            pipe.send({"kind": "status", "status": service.status()})
    except BrokenPipeError:  # the service closed its end
        pass
    finally:
        service.stop(wait=2.0)
    os._exit(0)  # liblsl's threads do not hold the exit


if __name__ == "__main__":  # pragma: no cover
    main()
