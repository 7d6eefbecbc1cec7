"""The job worker: a process of its own (not the API's), so status calls stay fast while a job
computes. ``python -m neurorecon.serve.worker <settings json> <worker id> <parent pid>``; the
app starts and supervises it.

It claims the oldest queued job with a lease it renews while it works; killed mid-job (even by
``kill -9``), it leaves a claim whose lease runs out, and the next claim re-queues the job (up
to ``serve.max_attempts``). A job whose result folder exists is marked done, never recomputed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
import traceback
from pathlib import Path

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger

from . import jobs
from .bundles import load_bundles
from .settings import ServeSettings
from .store import Job, JobStore

PURGE_EVERY_S = 600.0


class Worker:
    def __init__(self, settings: ServeSettings, worker_id: str, parent_pid: int | None = None):
        self.settings = settings
        self.id = worker_id
        self.parent_pid = parent_pid
        self.store = JobStore(settings.data_dir)
        # the local executor generates here: its generators load now, not in the first job
        self.decoders = load_bundles(settings.bundles,
                                     generators=settings.executor == "local")
        if settings.executor == "ray":
            from .executors import RayExecutor

            self.executor = RayExecutor(settings.bundles, workers=settings.workers,
                                        address=settings.ray_address)
        else:
            from .executors import LocalExecutor

            self.executor = LocalExecutor(self.decoders)
        self.current: str | None = None
        self.stopping = threading.Event()

    # ------------------------------------------------------------------ loop
    def serve_forever(self) -> None:
        threading.Thread(target=self._heartbeat, daemon=True).start()
        last_purge = 0.0
        logger.info("worker %s: ready (%s executor, %d bundle(s))", self.id,
                    self.settings.executor, len(self.decoders))
        while not self.stopping.is_set():
            if time.time() - last_purge > PURGE_EVERY_S:
                n = self.store.purge(self.settings.retention_days)
                if n:
                    logger.info("worker %s: deleted %d expired job(s)", self.id, n)
                last_purge = time.time()
            job = self.store.claim(self.id, lease_s=self.settings.lease_s,
                                   max_attempts=self.settings.max_attempts)
            if job is None:
                self.stopping.wait(0.2)
                continue
            self.process(job)

    def _heartbeat(self) -> None:
        while not self.stopping.is_set():
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                logger.warning("worker %s: the service process is gone; exiting", self.id)
                os._exit(0)  # its claim's lease runs out; a restarted service re-queues it
            try:
                self.store.beat(self.id, os.getpid())
                if self.current is not None:
                    self.store.renew(self.current, self.id, lease_s=self.settings.lease_s)
            except sqlite3.Error as err:  # a busy table must not end the heartbeat for good
                logger.warning("worker %s: heartbeat not written (%s); retrying", self.id, err)
            self.stopping.wait(min(1.0, self.settings.lease_s / 3))

    # ------------------------------------------------------------------ one job
    def _names(self, job: Job) -> dict[Path, str]:
        return jobs.upload_names(self.store.job_dir(job.id) / "inputs", job.spec.inputs,
                                 job.spec.filenames)

    def process(self, job: Job) -> None:
        job_dir = self.store.job_dir(job.id)
        done = job_dir / jobs.RESULT / jobs.RESULT_JSON
        if done.is_file():  # finished before a crash: never recompute
            result = json.loads(done.read_text())
            self.store.succeed(job.id, self.id, timings=result["timings"],
                               n_images=result["n_images"])
            logger.info("worker %s: job %s had its result already", self.id, job.id)
            return
        decoder = self.decoders.get(job.model)
        if decoder is None:
            self.store.fail(job.id, self.id, f"model {job.model!r} is not loaded by this "
                                             f"service (loaded: {sorted(self.decoders)})")
            return
        self.current = job.id
        t0 = time.perf_counter()
        logger.info("worker %s: job %s (attempt %d, %d trials)", self.id, job.id,
                    job.attempts, len(job.spec.rows))

        def report(stage: str, done_: int, total: int) -> bool:
            return self.store.renew(job.id, self.id, lease_s=self.settings.lease_s,
                                    progress={"stage": stage, "done": done_, "total": total})

        try:
            result = jobs.run_job(
                decoder, job_dir, job.spec,
                decode=lambda: self.executor.decode(job.model, job_dir, job.spec),
                generate=lambda batches: self.executor.generate(job.model, job.spec, batches),
                report=report, batch_size=self.settings.batch_size)
        except jobs.Cancelled:
            logger.info("worker %s: job %s cancelled", self.id, job.id)
        except DataError as exc:
            self.store.fail(job.id, self.id, jobs.public_message(exc, self._names(job)))
        except Exception as exc:  # noqa: BLE001 - a job's failure must not end the worker
            logger.error("worker %s: job %s failed:\n%s", self.id, job.id,
                         traceback.format_exc())
            self.store.fail(job.id, self.id, "internal error while decoding: "
                            + jobs.public_message(exc, self._names(job)))
        else:
            self.store.succeed(job.id, self.id, timings=result["timings"],
                               n_images=result["n_images"])
            logger.info("worker %s: job %s done in %.1f s (%d images)", self.id, job.id,
                        time.perf_counter() - t0, result["n_images"])
        finally:
            self.current = None


def main(argv: list[str] | None = None) -> None:
    from neurorecon.models.common.logging import configure_cli_logging

    settings_json, worker_id, parent = (sys.argv[1:] if argv is None else argv)
    configure_cli_logging()
    logging.getLogger("neurorecon").setLevel(logging.INFO)
    settings = ServeSettings.model_validate_json(settings_json)
    worker = Worker(settings, worker_id, int(parent))

    def stop(*_):
        worker.stopping.set()
        if worker.current is None:
            sys.exit(0)
        worker.store.release(worker.current, worker.id)  # mid-job: queued again at once
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    worker.serve_forever()


if __name__ == "__main__":  # pragma: no cover
    main()
