"""A small Python client of the service, and a launcher for a local ``neurorecon serve``.

>>> from neurorecon.serve.client import Client
>>> c = Client("http://127.0.0.1:8000", key)
>>> job = c.submit(bold="run-1_bold.nii.gz", events="run-1_events.tsv", subject="01")
>>> c.wait(job)["status"], c.result(job)["metrics"]
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

FINISHED = ("succeeded", "failed", "cancelled")


class ServiceError(RuntimeError):
    """The service answered with an error (status code and its detail)."""

    def __init__(self, response: httpx.Response):
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        self.status_code = response.status_code
        super().__init__(f"{response.status_code}: {detail}")


class Client:
    def __init__(self, url: str, key: str, *, timeout: float = 60.0):
        self.http = httpx.Client(base_url=url, timeout=timeout, headers={"X-API-Key": key})

    def _ok(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise ServiceError(response)
        return response

    def submit(self, *, subject: str, bold=None, events=None, betas=None, trials=None,
               model: str | None = None, tr: float | None = None,
               options: dict[str, Any] | None = None,
               idempotency_key: str | None = None) -> str:
        """Upload a run (``bold`` + ``events``) or ``betas`` (+ ``trials``); the job id."""
        files = {name: (Path(p).name, Path(p).read_bytes()) for name, p in
                 {"bold": bold, "events": events, "betas": betas, "trials": trials}.items()
                 if p is not None}
        data = {"subject": subject, **({"model": model} if model else {}),
                **({"tr": str(tr)} if tr is not None else {}),
                **({"options": json.dumps(options)} if options else {})}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        r = self._ok(self.http.post("/v1/fmri/jobs", data=data, files=files, headers=headers))
        return r.json()["id"]

    def status(self, job_id: str) -> dict[str, Any]:
        return self._ok(self.http.get(f"/v1/fmri/jobs/{job_id}")).json()

    def wait(self, job_id: str, *, timeout: float = 600, poll: float = 0.25) -> dict[str, Any]:
        """Poll until the job is finished; its last status."""
        t0 = time.monotonic()
        while True:
            job = self.status(job_id)
            if job["status"] in FINISHED:
                return job
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    def result(self, job_id: str) -> dict[str, Any]:
        return self._ok(self.http.get(f"/v1/fmri/jobs/{job_id}/result")).json()

    def get(self, url: str) -> bytes:
        """An image or thumbnail URL of a result."""
        return self._ok(self.http.get(url)).content


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalService:
    """``neurorecon serve serve.<key>=<value> ...`` in a subprocess on a free loopback port;
    :attr:`url` once ready. ``kill()`` sends SIGKILL (what a crash does)."""

    def __init__(self, settings: dict[str, Any], *, cwd: str | Path, log: str | Path,
                 ready_timeout: float = 180):
        self.port = int(settings.get("port") or free_port())
        args = [f"serve.{k}={_override(v)}" for k, v in {**settings, "port": self.port}.items()
                if v is not None]
        exe = Path(sys.executable).with_name("neurorecon")
        self.log_path = Path(log)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([str(exe), "serve", *args], cwd=cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        t0 = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while time.monotonic() - t0 < ready_timeout:
                try:
                    if http.get("/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if self.proc.poll() is not None:
                    break
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the service did not become ready:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    def __enter__(self) -> LocalService:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _override(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)
