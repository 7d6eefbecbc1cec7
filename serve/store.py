"""Persistent jobs: a SQLite table (WAL) under ``serve.data_dir`` and one folder per job.

A job is ``queued`` until a worker claims it (``running``, with a lease the worker renews and
an attempt count); a claim whose lease ran out (the worker was killed) is re-queued, or failed
after ``max_attempts`` claims. Results are written into ``jobs/<id>/result`` atomically (a
temporary sibling renamed), so a job whose result exists is finished and never recomputed.
Job ids are server-made hex strings; no path is ever built from request text.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .schemas import STATES, JobSpec

FINISHED = ("succeeded", "failed", "cancelled")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    model TEXT NOT NULL,
    subject TEXT NOT NULL,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    idempotency_key TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL,
    worker TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    progress TEXT,
    timings TEXT,
    n_images INTEGER,
    UNIQUE (owner, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, created);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    pid INTEGER,
    beat REAL NOT NULL
);
"""


class IdempotencyConflict(Exception):
    """The idempotency key was used before with another payload."""


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    model: str
    subject: str
    kind: str
    spec: JobSpec
    fingerprint: str
    status: str
    attempts: int
    created: float
    started: float | None
    finished: float | None
    error: str | None
    progress: dict[str, Any] | None
    timings: dict[str, Any] | None
    n_images: int | None
    worker: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(id=row["id"], owner=row["owner"], model=row["model"], subject=row["subject"],
                   kind=row["kind"], spec=JobSpec.model_validate_json(row["spec"]),
                   fingerprint=row["fingerprint"], status=row["status"],
                   attempts=row["attempts"], created=row["created"], started=row["started"],
                   finished=row["finished"], error=row["error"],
                   progress=json.loads(row["progress"]) if row["progress"] else None,
                   timings=json.loads(row["timings"]) if row["timings"] else None,
                   n_images=row["n_images"], worker=row["worker"])


class JobStore:
    """The job table and job folders under ``root`` (one connection per thread)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        self.path = self.root / "jobs.sqlite"
        self._local = threading.local()
        self._db.executescript(_SCHEMA)  # idempotent; executescript manages its transaction

    # ------------------------------------------------------------------ plumbing
    @property
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self):
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def job_dir(self, job_id: str) -> Path:
        if not JOB_ID.match(job_id):  # ids are made here; anything else is refused
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / "jobs" / job_id

    def new_dir(self) -> tuple[str, Path]:
        """A fresh job id and its (empty) inputs folder."""
        job_id = uuid.uuid4().hex
        folder = self.job_dir(job_id) / "inputs"
        folder.mkdir(parents=True)
        return job_id, folder

    # ------------------------------------------------------------------ API side
    def submit(self, *, job_id: str, owner: str, model: str, spec: JobSpec, fingerprint: str,
               idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Queue a job; return ``(job, created)``. The same idempotency key with the same
        fingerprint returns the first job (``created`` False); with another, raises
        :class:`IdempotencyConflict`."""
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE owner=? AND idempotency_key=?",
                                 (owner, idempotency_key)).fetchone()
                if row is not None:
                    if row["fingerprint"] != fingerprint:
                        raise IdempotencyConflict(idempotency_key)
                    return Job.from_row(row), False
            db.execute(
                "INSERT INTO jobs (id, owner, model, subject, kind, spec, fingerprint, "
                "idempotency_key, status, created, progress) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (job_id, owner, model, spec.subject, spec.kind, spec.model_dump_json(), fingerprint,
                 idempotency_key, "queued", time.time(),
                 json.dumps({"stage": "queued", "done": 0, "total": 0})))
            return Job.from_row(db.execute("SELECT * FROM jobs WHERE id=?",
                                           (job_id,)).fetchone()), True

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        """A job (only when ``owner`` owns it, if given)."""
        if not JOB_ID.match(job_id):
            return None
        row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        return Job.from_row(row)

    def list(self, owner: str, *, limit: int = 100, status: str | None = None) -> list[Job]:
        query, args = "SELECT * FROM jobs WHERE owner=?", [owner]
        if status is not None:
            query, args = query + " AND status=?", [*args, status]
        rows = self._db.execute(query + " ORDER BY created DESC LIMIT ?",
                                (*args, limit)).fetchall()
        return [Job.from_row(r) for r in rows]

    def cancel(self, job_id: str, owner: str) -> Job | None:
        """Cancel a queued or running job (a running one stops at its next batch)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET status='cancelled', finished=?, lease_until=NULL "
                       "WHERE id=? AND owner=? AND status IN ('queued','running')",
                       (time.time(), job_id, owner))
        return self.get(job_id, owner)

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT status, COUNT(*) n FROM jobs GROUP BY status")
        out = dict.fromkeys(STATES, 0)
        out.update({r["status"]: r["n"] for r in rows})
        return out

    def finished_stats(self, since: float) -> list[tuple[float, int, float]]:
        """``(job seconds, images, generation seconds)`` of jobs succeeded since ``since``."""
        rows = self._db.execute(
            "SELECT started, finished, n_images, timings FROM jobs WHERE status='succeeded' "
            "AND finished>=?", (since,)).fetchall()
        return [(r["finished"] - r["started"], r["n_images"] or 0,
                 float(json.loads(r["timings"] or "{}").get("reconstruct_s", 0.0)))
                for r in rows if r["started"] is not None]

    def workers_alive(self, within_s: float) -> int:
        row = self._db.execute("SELECT COUNT(*) n FROM workers WHERE beat>=?",
                               (time.time() - within_s,)).fetchone()
        return int(row["n"])

    # ------------------------------------------------------------------ worker side
    def beat(self, worker: str, pid: int) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO workers (id, pid, beat) VALUES (?,?,?) ON CONFLICT(id) "
                       "DO UPDATE SET beat=excluded.beat, pid=excluded.pid",
                       (worker, pid, time.time()))

    def claim(self, worker: str, *, lease_s: float, max_attempts: int) -> Job | None:
        """Re-queue (or fail) expired claims, then claim the oldest queued job."""
        now = time.time()
        with self._tx() as db:
            for row in db.execute("SELECT id, attempts FROM jobs WHERE status='running' AND "
                                  "lease_until<?", (now,)).fetchall():
                if row["attempts"] >= max_attempts:
                    db.execute("UPDATE jobs SET status='failed', finished=?, lease_until=NULL, "
                               "error=? WHERE id=?",
                               (now, f"the worker running this job was lost {row['attempts']}"
                                     " times (its lease expired); giving up", row["id"]))
                else:
                    db.execute("UPDATE jobs SET status='queued', lease_until=NULL, worker=NULL "
                               "WHERE id=?", (row["id"],))
            row = db.execute("SELECT id FROM jobs WHERE status='queued' ORDER BY created "
                             "LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status='running', attempts=attempts+1, worker=?, "
                       "lease_until=?, started=COALESCE(started, ?) WHERE id=?",
                       (worker, now + lease_s, now, row["id"]))
            return Job.from_row(db.execute("SELECT * FROM jobs WHERE id=?",
                                           (row["id"],)).fetchone())

    def renew(self, job_id: str, worker: str, *, lease_s: float,
              progress: dict[str, Any] | None = None) -> bool:
        """Extend this worker's lease (and record progress); False when the job is no longer
        this worker's running job (cancelled, or re-queued after the lease expired)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET lease_until=?, progress=COALESCE(?, progress) WHERE id=? AND "
                "worker=? AND status='running'",
                (time.time() + lease_s, None if progress is None else json.dumps(progress),
                 job_id, worker))
            return cur.rowcount == 1

    def succeed(self, job_id: str, worker: str, *, timings: dict[str, Any],
                n_images: int) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status='succeeded', finished=?, lease_until=NULL, timings=?, "
                "n_images=?, error=NULL, progress=? WHERE id=? AND status='running' AND "
                "(worker=? OR ? IS NULL)",
                (time.time(), json.dumps(timings), n_images,
                 json.dumps({"stage": "done", "done": n_images, "total": n_images}),
                 job_id, worker, worker))
            return cur.rowcount == 1

    def fail(self, job_id: str, worker: str, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET status='failed', finished=?, lease_until=NULL, error=? "
                       "WHERE id=? AND status='running' AND worker=?",
                       (time.time(), error, job_id, worker))

    def release(self, job_id: str, worker: str) -> None:
        """Give a claim back (the worker is stopping): queued again, this attempt not counted."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET status='queued', lease_until=NULL, worker=NULL, "
                       "attempts=MAX(attempts-1, 0) WHERE id=? AND worker=? AND "
                       "status='running'", (job_id, worker))

    def purge(self, retention_days: float) -> int:
        """Delete finished jobs older than the retention period, and their folders."""
        cutoff = time.time() - retention_days * 86400
        with self._tx() as db:
            ids = [r["id"] for r in db.execute(
                "SELECT id FROM jobs WHERE status IN ('succeeded','failed','cancelled') AND "
                "finished<?", (cutoff,)).fetchall()]
            db.executemany("DELETE FROM jobs WHERE id=?", [(i,) for i in ids])
            db.execute("DELETE FROM workers WHERE beat<?", (cutoff,))
        for job_id in ids:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return len(ids)
