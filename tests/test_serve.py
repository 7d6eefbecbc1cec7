"""The batch fMRI-to-image HTTP service: jobs end to end, keys, idempotency, bad input and
abuse (4xx, never a 500), metrics, the job page; the worker runs in a thread of this process
(the kill -9 and Ray tests in test_serve_processes.py run the real command)."""

from __future__ import annotations

import gzip
import io
import json
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient


def make_service(bundle: Path, root: Path, **overrides):
    """Settings, app, the two keys (alice, bob) of a fresh service under ``root``."""
    from neurorecon.serve.keys import create_key
    from neurorecon.serve.settings import load_settings

    keys = root / "keys.txt"
    alice, bob = create_key(keys, "alice"), create_key(keys, "bob")
    settings = load_settings({"bundles": [str(bundle)], "data_dir": str(root / "data"),
                              "api_keys_file": str(keys), "lease_s": 5, "batch_size": 4,
                              **overrides})
    return settings, alice, bob


@pytest.fixture()
def service(fmri_bundle, tmp_path):
    """A running service (TestClient) with a job worker thread; yields (client, keys, store)."""
    from neurorecon.serve.app import create_app
    from neurorecon.serve.worker import Worker

    settings, alice, bob = make_service(fmri_bundle, tmp_path)
    app = create_app(settings, start_workers=False)
    worker = Worker(settings, "test-worker")
    thread = threading.Thread(target=worker.serve_forever, daemon=True)
    thread.start()
    store = app.state.service.store
    t0 = time.time()  # the worker's first heartbeat comes from its own thread: wait for it
    while store.workers_alive(within_s=5.0) == 0 and time.time() - t0 < 60:
        time.sleep(0.05)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, {"alice": alice, "bob": bob}, store, worker
    worker.stopping.set()
    thread.join(timeout=30)


def sample_run(sample_root: Path, subject: str = "01", run: int = 1) -> tuple[Path, Path]:
    func = sample_root / "fmri" / f"sub-{subject}" / "func"
    stem = f"sub-{subject}_task-images_run-{run:02d}"
    return func / f"{stem}_bold.nii.gz", func / f"{stem}_events.tsv"


def post_job(client, key, files: dict[str, tuple[str, bytes]], **form):
    data = {k: (json.dumps(v) if k == "options" and not isinstance(v, str) else v)
            for k, v in form.items()}
    headers = {} if key is None else {"X-API-Key": key}
    headers.update(data.pop("headers", None) or {})
    data = {k: str(v) for k, v in data.items()}
    return client.post("/v1/fmri/jobs", headers=headers, data=data,
                       files={k: (name, body) for k, (name, body) in files.items()})


def run_files(sample_root: Path, subject: str = "01") -> dict[str, tuple[str, bytes]]:
    bold, events = sample_run(sample_root, subject)
    return {"bold": (bold.name, bold.read_bytes()), "events": (events.name, events.read_bytes())}


def wait(client, key, job_id, *, until=("succeeded", "failed", "cancelled"), timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        r = client.get(f"/v1/fmri/jobs/{job_id}", headers={"X-API-Key": key})
        assert r.status_code == 200, r.text
        if r.json()["status"] in until:
            return r.json()
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {r.json()['status']} after {timeout} s")


def nifti_bytes(img) -> bytes:
    buf = io.BytesIO()
    file_map = nib.Nifti1Image.make_file_map({"image": buf, "header": buf})
    img.to_file_map(file_map)
    return gzip.compress(buf.getvalue())


# --------------------------------------------------------------------------------------------
def test_fmri_job_end_to_end_decodes(service, fmri_bundle, sample_root):
    client, keys, store, _ = service
    alice = keys["alice"]
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"], ready.text
    models = client.get("/v1/models", headers={"X-API-Key": alice}).json()["models"]
    assert len(models) == 1 and models[0]["modality"] == "fmri"
    assert models[0]["subjects"] == ["01", "02"] and "stand-in" in models[0]["note"]
    embedder = models[0]["embedder"]  # the fields the bundle holds, not names it lacks
    assert embedder["emb_dim"] > 0 and embedder["name"] and "weights" in embedder

    r = post_job(client, alice, run_files(sample_root), subject="sub-01",
                 options={"top_k": 3, "steps": 2})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "queued" and set(body["links"]) == {"self", "result", "page"}
    status = wait(client, alice, body["id"])
    assert status["status"] == "succeeded", status
    assert status["attempts"] == 1 and status["timings"]["total_s"] > 0

    result = client.get(body["links"]["result"], headers={"X-API-Key": alice}).json()
    events = pd.read_csv(sample_run(sample_root)[1], sep="\t")
    assert len(result["trials"]) == len(events)
    first = result["trials"][0]
    assert first["onset"] == pytest.approx(events["onset"][0])
    assert first["stim_file"] == events["stim_file"][0] and len(first["topk"]) == 3
    img = client.get(first["image"], headers={"X-API-Key": alice})
    assert img.status_code == 200 and img.content[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    png = Image.open(io.BytesIO(img.content))
    assert "stand-in" in png.info["neurorecon_note"]
    thumb = client.get(first["topk"][0]["thumbnail"], headers={"X-API-Key": alice})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"

    # what the bundle decodes offline (test_decoding checks that bundles decode), and better
    # than chance among the whole gallery
    from neurorecon.pipelines.inference import Decoder

    decoder = Decoder.from_pretrained(fmri_bundle)
    offline = decoder.retrieve(decoder.encode(decoder.prepare_fmri(
        *sample_run(sample_root), subject="01"), subject="01"), k=3)
    assert [[h["id"] for h in t["topk"]] for t in result["trials"]] == [
        [h["image_id"] for h in hits] for hits in offline]
    np.testing.assert_allclose([h["score"] for h in first["topk"]],
                               [h["score"] for h in offline[0]], atol=1e-4)
    ret = result["metrics"]["retrieval"]
    assert ret["encoder"]["n_queries"] == len(events)
    assert ret["encoder"]["top1"] > 2 * ret["chance"]["top1"], ret
    assert ret["encoder"]["median_rank"] < ret["chance"]["median_rank"], ret
    rec = result["metrics"]["reconstruction"]
    assert rec["brain"]["pixcorr"] is not None and "floor_retrieved" in rec

    page = client.get(body["links"]["page"], params={"key": alice})
    assert page.status_code == 200 and page.text.count("<img") > len(events)
    assert [j["id"] for j in client.get("/v1/fmri/jobs",
                                        headers={"X-API-Key": alice}).json()["jobs"]] == [
        body["id"]]

    # another key sees nothing of it
    bob = {"X-API-Key": keys["bob"]}
    for url in (body["links"]["self"], body["links"]["result"], first["image"]):
        assert client.get(url, headers=bob).status_code == 404
    assert client.get(body["links"]["page"], params={"key": keys["bob"]}).status_code == 404
    assert client.delete(body["links"]["self"], headers=bob).status_code == 404
    assert client.get("/v1/fmri/jobs", headers=bob).json()["jobs"] == []

    metrics = client.get("/metrics").text
    for name in ("neurorecon_http_request_duration_seconds_bucket", 'neurorecon_jobs{state='
                 '"succeeded"} 1.0', "neurorecon_queue_depth", "neurorecon_job_duration_"
                 "seconds_count 1.0", "neurorecon_images_per_second"):
        assert name in metrics, name
    assert alice not in metrics


def test_betas_job_and_trial_selection(service, fmri_bundle, sample_root):
    """A betas upload, options.trials as 'test' and as rows, retrieval only."""
    from neurorecon.pipelines.inference import Decoder

    client, keys, _, _ = service
    alice = keys["alice"]
    bold, events = sample_run(sample_root)
    table = pd.read_csv(events, sep="\t")
    mask = Decoder.from_pretrained(fmri_bundle).mask("01")
    rng = np.random.default_rng(0)
    betas = nib.Nifti1Image(rng.standard_normal((*mask.shape, 5)).astype(np.float32),
                            mask.affine)
    trials = table.iloc[:5].to_csv(sep="\t", index=False).encode()
    r = post_job(client, alice, {"betas": ("b.nii.gz", nifti_bytes(betas)),
                                 "trials": ("t.tsv", trials)},
                 subject="01", options={"trials": [0, 2, 4], "reconstruct": False})
    assert r.status_code == 202, r.text
    assert wait(client, alice, r.json()["id"])["status"] == "succeeded"
    res = client.get(r.json()["links"]["result"], headers={"X-API-Key": alice}).json()
    assert [t["row"] for t in res["trials"]] == [0, 2, 4]
    assert all(t["image"] is None for t in res["trials"])

    r = post_job(client, alice, run_files(sample_root), subject="01",
                 options={"trials": "test", "reconstruct": False})
    assert r.status_code == 202, r.text
    wait(client, alice, r.json()["id"])
    res = client.get(r.json()["links"]["result"], headers={"X-API-Key": alice}).json()
    assert [t["row"] for t in res["trials"]] == list(np.flatnonzero(
        table["trial_type"] == "test"))


def test_a_generated_client_submits_and_reads_a_job(service, sample_root, tmp_path):
    """A client generated from the service's OpenAPI document (openapi-python-client, as an
    outside user would) authenticates with the declared API-key scheme, uploads a BOLD run and
    its events as files, reads the job's status and result as typed models; without the key,
    the 401 parses as the documented Problem."""
    import importlib
    import os
    import subprocess
    import sys

    client, keys, _, _ = service
    schema = tmp_path / "openapi.json"
    schema.write_text(json.dumps(client.get("/openapi.json").json()))
    bindir = Path(sys.executable).parent  # the generator and the ruff it formats with
    subprocess.run([str(bindir / "openapi-python-client"), "generate", "--path", str(schema),
                    "--output-path", str(tmp_path / "nr_client"), "--meta", "none"],
                   check=True, capture_output=True,
                   env={**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"})
    sys.path.insert(0, str(tmp_path))
    try:
        gen = importlib.import_module("nr_client")
        models = importlib.import_module("nr_client.models")
        types = importlib.import_module("nr_client.types")
        calls = {name: importlib.import_module(f"nr_client.api.f_mri_jobs.{name}") for name in (
            "models_v1_models_get", "submit_job_v1_fmri_jobs_post",
            "job_status_v1_fmri_jobs_job_id_get", "job_result_v1_fmri_jobs_job_id_result_get")}
        import httpx

        def into_the_app(request: httpx.Request) -> httpx.Response:  # the bytes, unchanged
            r = client.request(request.method, request.url.raw_path.decode(),
                               headers=dict(request.headers), content=request.read())
            return httpx.Response(r.status_code, headers=r.headers, content=r.content)

        transport = {"transport": httpx.MockTransport(into_the_app)}
        authed = gen.AuthenticatedClient(base_url="http://testserver", token=keys["alice"],
                                         prefix="", auth_header_name="X-API-Key",
                                         httpx_args=transport)
        listed = calls["models_v1_models_get"].sync(client=authed)
        assert isinstance(listed, models.ModelList) and listed.models[0].modality == "fmri"

        bold, events = sample_run(sample_root)
        with bold.open("rb") as b, events.open("rb") as e:
            created = calls["submit_job_v1_fmri_jobs_post"].sync(client=authed, body=(
                models.BodySubmitJobV1FmriJobsPost(
                    subject="sub-01", options=json.dumps({"top_k": 3, "steps": 2}),
                    bold=types.File(payload=b, file_name=bold.name),
                    events=types.File(payload=e, file_name=events.name))))
        assert isinstance(created, models.JobCreated), created
        t0 = time.time()
        while time.time() - t0 < 120:
            status = calls["job_status_v1_fmri_jobs_job_id_get"].sync(created.id, client=authed)
            assert isinstance(status, models.JobStatus), status
            if status.status.value in ("succeeded", "failed"):
                break
            time.sleep(0.2)
        assert status.status.value == "succeeded", status.error
        result = calls["job_result_v1_fmri_jobs_job_id_result_get"].sync(created.id,
                                                                          client=authed)
        assert isinstance(result, models.JobResult)
        assert len(result.trials) == len(pd.read_csv(events, sep="\t"))
        assert all(len(trial.topk) == 3 for trial in result.trials)

        anonymous = gen.Client(base_url="http://testserver", httpx_args=transport)
        refused = calls["models_v1_models_get"].sync_detailed(client=anonymous)
        assert refused.status_code == 401 and isinstance(refused.parsed, models.Problem)
        assert "key" in refused.parsed.detail.lower()
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "nr_client" or m.startswith("nr_client.")]:
            del sys.modules[name]


def test_idempotency_key(service, sample_root):
    client, keys, store, _ = service
    files = run_files(sample_root)
    first = post_job(client, keys["alice"], files, subject="01", options={"seed": 1},
                     headers={"Idempotency-Key": "run-1"})
    again = post_job(client, keys["alice"], files, subject="01", options={"seed": 1},
                     headers={"Idempotency-Key": "run-1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = post_job(client, keys["alice"], files, subject="01", options={"seed": 2},
                     headers={"Idempotency-Key": "run-1"})
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["detail"]
    # the same key from another API key is another job
    bob = post_job(client, keys["bob"], files, subject="01", options={"seed": 1},
                   headers={"Idempotency-Key": "run-1"})
    assert bob.status_code == 202 and bob.json()["id"] != first.json()["id"]
    assert len(list((store.root / "jobs").iterdir())) == 2


def test_heartbeat_outlives_a_busy_table(service):
    """A heartbeat that fails (the table busy past SQLite's timeout) is retried, not lost: the
    worker stays alive on /ready instead of vanishing while it keeps computing."""
    import sqlite3

    client, _, store, worker = service
    beat, failures = worker.store.beat, []

    def flaky(*args):
        if len(failures) < 2:
            failures.append(1)
            raise sqlite3.OperationalError("database is locked")
        beat(*args)

    worker.store.beat = flaky
    store._db.execute("DELETE FROM workers")
    t0 = time.time()
    while store.workers_alive(within_s=5.0) == 0 and time.time() - t0 < 20:
        time.sleep(0.1)
    assert len(failures) == 2
    assert client.get("/ready").json()["workers_alive"] == 1


def test_cancel_a_queued_job(service, sample_root):
    client, keys, _, worker = service
    worker.stopping.set()  # nothing claims it
    time.sleep(0.5)
    r = post_job(client, keys["alice"], run_files(sample_root), subject="01")
    job = client.delete(r.json()["links"]["self"], headers={"X-API-Key": keys["alice"]})
    assert job.status_code == 200 and job.json()["status"] == "cancelled"
    res = client.get(r.json()["links"]["result"], headers={"X-API-Key": keys["alice"]})
    assert res.status_code == 409 and "cancelled" in res.json()["detail"]


# --------------------------------------------------------------------------------------------
# bad input: a 4xx naming the upload and the problem; nothing queued, nothing left on disk
# --------------------------------------------------------------------------------------------
def _bad_cases(sample_root: Path, mask):
    bold, events = sample_run(sample_root)
    bold_b, events_b = bold.read_bytes(), events.read_bytes()
    img = nib.load(bold)
    data = np.asarray(img.dataobj, np.float32)
    table = pd.read_csv(events, sep="\t")
    nan = data.copy()
    nan[tuple(np.argwhere(np.asarray(mask.dataobj) > 0)[0])] = np.nan
    zero_tr = nib.Nifti1Image(data, img.affine)
    zero_tr.header.set_zooms((*img.header.get_zooms()[:3], 0.0))
    other_grid = nib.Nifti1Image(data[:-2], img.affine)
    late = table.assign(onset=table["onset"] + 10_000)
    ev = ("events.tsv", events_b)
    return {
        "corrupt gzip": ({"bold": ("b.nii.gz", bold_b[: len(bold_b) // 3]), "events": ev},
                         {}, "truncated or corrupt"),
        "not gzip": ({"bold": ("b.nii.gz", b"plain text" * 50), "events": ev}, {},
                     "cannot read"),
        "3D image": ({"bold": ("b.nii.gz", nifti_bytes(nib.Nifti1Image(data[..., 0],
                                                                       img.affine))),
                      "events": ev}, {}, "must be 4D"),
        "other grid": ({"bold": ("b.nii.gz", nifti_bytes(other_grid)), "events": ev}, {},
                       "another voxel grid"),
        "zero TR": ({"bold": ("b.nii.gz", nifti_bytes(zero_tr)), "events": ev}, {},
                    "repetition time"),
        "NaNs": ({"bold": ("b.nii.gz", nifti_bytes(nib.Nifti1Image(nan, img.affine))),
                  "events": ev}, {}, "non-finite"),
        "events beyond the run": ({"bold": ("b.nii.gz", bold_b), "events": (
            "e.tsv", late.to_csv(sep="\t", index=False).encode())}, {}, "end after the run"),
        "TSV without onset": ({"bold": ("b.nii.gz", bold_b), "events": (
            "e.tsv", table.drop(columns="onset").to_csv(sep="\t", index=False).encode())},
            {}, "missing column(s) ['onset']"),
        "not a NIfTI name": ({"bold": ("b.txt", bold_b), "events": ev}, {}, "*.nii.gz"),
        "bold without events": ({"bold": ("b.nii.gz", bold_b)}, {}, "events"),
        "nothing": ({}, {}, "either bold + events"),
        "unknown subject": ({"bold": ("b.nii.gz", bold_b), "events": ev},
                            {"subject": "07"}, "unknown subject '07'"),
        "unknown model": ({"bold": ("b.nii.gz", bold_b), "events": ev},
                          {"model": "meg-0000"}, "unknown model 'meg-0000'"),
        "steps out of range": ({"bold": ("b.nii.gz", bold_b), "events": ev},
                               {"options": {"steps": 10_000}}, "options.steps"),
        "strength out of range": ({"bold": ("b.nii.gz", bold_b), "events": ev},
                                  {"options": {"strength": 1.5}}, "options.strength"),
        "unknown option": ({"bold": ("b.nii.gz", bold_b), "events": ev},
                           {"options": {"stepz": 3}}, "options.stepz"),
        "options not JSON": ({"bold": ("b.nii.gz", bold_b), "events": ev},
                             {"options": "{steps"}, "invalid options"),
        "trial rows out of range": ({"bold": ("b.nii.gz", bold_b), "events": ev},
                                    {"options": {"trials": [0, 999]}}, "999"),
        "negative tr": ({"bold": ("b.nii.gz", bold_b), "events": ev}, {"tr": -1}, "tr"),
    }


def test_bad_inputs_get_a_clear_4xx(service, fmri_bundle, sample_root):
    from neurorecon.pipelines.inference import Decoder

    client, keys, store, _ = service
    mask = Decoder.from_pretrained(fmri_bundle).mask("01")
    for name, (files, form, expect) in _bad_cases(sample_root, mask).items():
        r = post_job(client, keys["alice"], files, **{"subject": "01", **form})
        assert r.status_code == 422, (name, r.status_code, r.text)
        detail = r.json()["detail"]
        assert expect in detail, (name, detail)
        assert "Traceback" not in detail and str(store.root) not in detail, (name, detail)
        if name in ("corrupt gzip", "3D image", "other grid", "NaNs"):
            assert "bold (b.nii.gz)" in detail, (name, detail)
    other = post_job(client, keys["alice"], _bad_cases(sample_root, mask)["other grid"][0],
                     subject="01").json()["detail"]
    assert other.count("shape") >= 2, other  # both grids named
    assert list((store.root / "jobs").iterdir()) == []
    assert client.get("/v1/fmri/jobs", headers={"X-API-Key": keys["alice"]}).json() == {
        "jobs": []}


def test_keys_ids_and_limits(fmri_bundle, sample_root, tmp_path):
    from neurorecon.serve.app import create_app

    big = run_files(sample_root)
    size = sum(len(body) for _, body in big.values())
    settings, alice, _ = make_service(fmri_bundle, tmp_path, max_upload_mb=size / 2 / 2**20,
                                      rate_limit_per_minute=8)
    app = create_app(settings, start_workers=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"X-API-Key": "nr_wrong"}).status_code == 401
        h = {"X-API-Key": alice}
        for bad in ("..", "..%2F..%2Fetc%2Fpasswd", "%2E%2E", "0" * 32, "a" * 64):
            r = client.get(f"/v1/fmri/jobs/{bad}", headers=h)
            assert r.status_code in (404, 422), (bad, r.status_code)
        assert client.get("/v1/fmri/jobs/x/images/-1.png", headers=h).status_code in (404, 422)
        # over serve.max_upload_mb: 413 (declared length, and a chunked body)
        r = post_job(client, alice, big, subject="01")
        assert r.status_code == 413 and "max_upload_mb" in r.json()["detail"]

        def chunks():
            for _ in range(size // 65536 + 2):
                yield b"x" * 65536

        r = client.post("/v1/fmri/jobs", headers={**h, "content-type":
                                                  "multipart/form-data; boundary=zz"},
                        content=chunks())
        assert r.status_code == 413
        statuses = [client.get("/v1/models", headers=h).status_code for _ in range(10)]
        assert 429 in statuses, statuses
        r = client.get("/v1/models", headers=h)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert list((Path(settings.data_dir) / "jobs").iterdir()) == []


def test_start_up_errors_name_the_problem(fmri_bundle, tmp_path):
    from neurorecon.models.common.checks import DataError
    from neurorecon.serve.app import create_app
    from neurorecon.serve.keys import KeyRing
    from neurorecon.serve.settings import load_settings

    with pytest.raises(DataError, match="no API key file"):
        load_settings({"bundles": [str(fmri_bundle)]})
    with pytest.raises(DataError, match="serve.port"):
        load_settings({"bundles": [str(fmri_bundle)], "port": 99999,
                       "api_keys_file": "k.txt"})
    settings, _, _ = make_service(fmri_bundle, tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(DataError, match=f"cannot load bundle {broken}"):
        create_app(settings.model_copy(update={"bundles": [str(broken)]}))
    keys = tmp_path / "bad_keys.txt"
    keys.write_text("alice c15bb54e\n")
    with pytest.raises(DataError, match="line 1"):
        KeyRing.load(keys)


def test_key_file_holds_only_hashes(tmp_path):
    from neurorecon.serve.keys import KeyRing, create_key

    path = tmp_path / "keys.txt"
    key = create_key(path, "lab-1")
    text = path.read_text()
    assert key not in text and text.startswith("lab-1 sha256:")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    ring = KeyRing.load(path)
    assert ring.identify(key) == "lab-1" and ring.identify(key + "x") is None
    from neurorecon.models.common.checks import DataError

    with pytest.raises(DataError, match="exists already"):
        create_key(path, "lab-1")


def test_openapi_fuzz_has_no_server_errors(fmri_bundle, tmp_path):
    """schemathesis over the OpenAPI schema, authenticated: never a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    from neurorecon.serve.app import create_app

    svc_settings, alice, _ = make_service(fmri_bundle, tmp_path, rate_limit_per_minute=10**6)
    app = create_app(svc_settings, start_workers=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    cases = {"n": 0}
    failures = []

    def checker(op):
        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            cases["n"] += 1
            case.headers = {**(case.headers or {}), "X-API-Key": alice}
            response = case.call()
            documented = op.label == "GET /ready" and response.status_code == 503  # no worker
            if response.status_code >= 500 and not documented:
                failures.append((op.label, response.status_code, response.text[:200]))

        return check

    with TestClient(app):  # lifespan
        for operation in schema.get_all_operations():
            checker(operation.ok())()
    print(f"schemathesis: {cases['n']} cases")
    assert cases["n"] > 100
    assert not failures, failures[:5]



#: checks that do not apply to one operation, and why (schemathesis configuration)
SCHEMATHESIS_EXCEPTIONS = [
    # 503 is /ready's documented answer while no job worker is alive (none runs here)
    {"include-name": "GET /ready", "checks": {"not_a_server_error": {"enabled": False}}},
    # a schema-valid upload is random bytes: what makes it a BOLD run (a NIfTI of the
    # bundle's mask shape, events naming gallery images, a subject the bundle knows) is
    # checked on the content, and answered 422 with the reason (schemathesis's default
    # expected statuses, plus 422)
    {"include-name": "POST /v1/fmri/jobs",
     "checks": {"positive_data_acceptance": {"expected-statuses": [
         "2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]}}},
]


def schemathesis_failures(app, key: str, *, max_examples: int = 10,
                          seed: int = 1) -> dict[str, list[str]]:
    """Run schemathesis over ``app`` as its CLI would (``st run --checks all``, every phase,
    authenticated with ``key``; one round of the fuzzing and stateful phases, as without
    ``--max-time``); the distinct failures per operation."""
    from schemathesis.config import SchemathesisConfig
    from schemathesis.engine import events, from_schema
    from schemathesis.openapi import from_asgi

    config = SchemathesisConfig.from_dict({
        "seed": seed, "headers": {"X-API-Key": key},
        "checks": {"enabled": True}, "operations": SCHEMATHESIS_EXCEPTIONS,
        "generation": {"max-examples": max_examples, "database": "none"}})
    schema = from_asgi("/openapi.json", app, config=config)
    found: dict[str, set[str]] = {}
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            for nodes in event.recorder.checks.values():
                for node in nodes:
                    if node.failure_info is not None:
                        failure = node.failure_info.failure
                        text = f"{node.name}: {failure.title} | {failure.message[:200]}"
                        found.setdefault(failure.operation or event.recorder.label,
                                         set()).add(text)
        elif isinstance(event, events.NonFatalError | events.FatalError):
            error = event.value if isinstance(event, events.NonFatalError) else event.exception
            found.setdefault("(schemathesis)", set()).add(repr(error))
    return {op: sorted(titles) for op, titles in sorted(found.items())}


def test_openapi_schema_and_service_agree_under_every_check(fmri_bundle, tmp_path):
    """schemathesis with every check and phase (status codes, content types, headers, bodies
    against the documented models, negative data rejected, auth enforced, 405 Allow, ...)
    finds nothing: the schema is what an outside client (or a generated one) can rely on."""
    from neurorecon.serve.app import create_app

    svc_settings, alice, _ = make_service(fmri_bundle, tmp_path, rate_limit_per_minute=10**6)
    app = create_app(svc_settings, start_workers=False)
    schema = app.openapi()  # what client generators read: the key as a security scheme
    scheme = schema["components"]["securitySchemes"]["ApiKey"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "X-API-Key")
    assert schema["paths"]["/v1/fmri/jobs"]["get"]["security"] == [{"ApiKey": []}]
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # 422s are Problems
    t0 = time.monotonic()
    with TestClient(app) as client:  # lifespan
        answer = client.options(f"/v1/fmri/jobs/{'0' * 32}", headers={"X-API-Key": alice})
        assert answer.status_code == 405 and answer.headers["allow"] == "DELETE, GET"
        failures = schemathesis_failures(app, alice)
    print(f"schemathesis (all checks): {time.monotonic() - t0:.0f} s")
    assert not failures, json.dumps(failures, indent=1)
