"""The job table: claims with leases and attempts, cancellation, release, retention."""

from __future__ import annotations

import time

import pytest

from neurorecon.serve.schemas import JobOptions, JobSpec
from neurorecon.serve.store import IdempotencyConflict, JobStore


def _spec(rows: list[int]) -> JobSpec:
    return JobSpec(kind="bold", subject="01", tr=2.0, inputs={"bold": "bold.nii.gz"},
                   filenames={"bold": "run.nii.gz"}, rows=rows, n_rows=len(rows),
                   options=JobOptions())


def _submit(store: JobStore, owner: str = "alice", **kw):
    job_id, folder = store.new_dir()
    (folder / "bold.nii.gz").write_bytes(b"x")
    return store.submit(job_id=job_id, owner=owner, model="m",
                        spec=_spec([0, 1]), fingerprint=kw.pop("fingerprint", "f"), **kw)[0]


def test_expired_leases_are_requeued_then_failed(tmp_path):
    store = JobStore(tmp_path)
    job = _submit(store)
    for attempt in (1, 2):
        claimed = store.claim("w1", lease_s=0.05, max_attempts=2)
        assert claimed.id == job.id and claimed.attempts == attempt
        assert store.claim("w2", lease_s=0.05, max_attempts=2) is None  # still leased
        time.sleep(0.1)  # the worker "dies": no renewals
    assert store.claim("w2", lease_s=0.05, max_attempts=2) is None
    failed = store.get(job.id)
    assert failed.status == "failed" and "lost 2 times" in failed.error


def test_renewal_keeps_the_claim_and_cancel_stops_it(tmp_path):
    store = JobStore(tmp_path)
    job = _submit(store)
    store.claim("w1", lease_s=0.2, max_attempts=3)
    for _ in range(4):
        time.sleep(0.1)
        assert store.renew(job.id, "w1", lease_s=0.2, progress={"stage": "x", "done": 1,
                                                                "total": 2})
    assert store.claim("w2", lease_s=0.2, max_attempts=3) is None
    assert store.get(job.id).progress == {"stage": "x", "done": 1, "total": 2}
    assert store.cancel(job.id, "bob") is None  # not bob's
    assert store.cancel(job.id, "alice").status == "cancelled"
    assert not store.renew(job.id, "w1", lease_s=0.2)  # the worker learns it must stop
    assert not store.succeed(job.id, "w1", timings={}, n_images=0)
    assert store.get(job.id).status == "cancelled"


def test_release_requeues_without_counting_the_attempt(tmp_path):
    store = JobStore(tmp_path)
    job = _submit(store)
    store.claim("w1", lease_s=60, max_attempts=3)
    store.release(job.id, "w1")
    again = store.claim("w2", lease_s=60, max_attempts=3)
    assert again.id == job.id and again.attempts == 1


def test_idempotency_and_retention(tmp_path):
    store = JobStore(tmp_path)
    a = _submit(store, idempotency_key="k1")
    job_id, _ = store.new_dir()
    same, created = store.submit(job_id=job_id, owner="alice", model="m",
                                 spec=_spec([0]), fingerprint="f",
                                 idempotency_key="k1")
    assert same.id == a.id and not created
    with pytest.raises(IdempotencyConflict):
        store.submit(job_id=job_id, owner="alice", model="m",
                     spec=_spec([0]), fingerprint="other", idempotency_key="k1")
    store.claim("w", lease_s=60, max_attempts=3)
    assert store.succeed(a.id, "w", timings={"reconstruct_s": 1.0}, n_images=2)
    running = _submit(store)
    assert store.purge(retention_days=1) == 0  # too recent
    store._db.execute("UPDATE jobs SET finished=finished-2*86400 WHERE id=?", (a.id,))
    assert store.purge(retention_days=1) == 1
    assert store.get(a.id) is None and not store.job_dir(a.id).exists()
    assert store.get(running.id).status == "queued" and store.job_dir(running.id).exists()
    with pytest.raises(ValueError):
        store.job_dir("../../etc")
