"""The HTTP service: FastAPI app factory, routes, API keys, rate limits, upload limits, metrics.

``create_app(settings)`` loads the bundles, the key file and the job table (a bad one stops
start-up with a one-line error naming it); its lifespan starts and supervises the job worker
processes (:mod:`.worker`). Routes never build a filesystem path from request text: job ids
are matched against server-made ids, image numbers are integers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    File,
    Form,
    Header,
    HTTPException,
    Query,
    Request,
    Security,
    UploadFile,
    WebSocket,
    WebSocketDisconnect,
)
from fastapi import Path as PathParam
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, APIKeyQuery
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger
from neurorecon.pipelines.inference import Decoder

from . import jobs, pages
from .bundles import load_bundles
from .keys import KeyRing
from .live import live_page
from .lsl import Hub, StreamService
from .metrics import Metrics
from .schemas import (
    Health,
    JobCreated,
    JobList,
    JobOptions,
    JobResult,
    JobStatus,
    Links,
    ModelInfo,
    ModelList,
    Problem,
    Ready,
    StreamSession,
    StreamStatus,
)
from .settings import ServeSettings, StreamSettings
from .store import JOB_ID, IdempotencyConflict, Job, JobStore

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: the documented error answers: every 4xx body is a ``Problem`` (``{"detail": "<text>"}``),
#: validation errors included (``loc: msg; ...``, not FastAPI's list form)
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "malformed request body (multipart or JSON)"},
    401: {"model": Problem, "description": "missing or unknown API key",
          "headers": {"WWW-Authenticate": {"description": "names the header: X-API-Key",
                                           "schema": {"type": "string"}}}},
    404: {"model": Problem, "description": "no such job for this key"},
    409: {"model": Problem, "description": "the job has not succeeded (yet)"},
    413: {"model": Problem, "description": "request body over serve.max_upload_mb"},
    422: {"model": Problem, "description": "invalid input (the message names it)"},
    429: {"model": Problem, "description": "too many requests for this key",
          "headers": {"Retry-After": {"description": "seconds to wait",
                                      "schema": {"type": "integer"}}}},
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entry documenting these error codes."""
    return {code: ERRORS[code] for code in codes}


def page_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The same for an HTML page: its errors are JSON all the same (FastAPI would file a
    ``model`` under the page's ``text/html``)."""
    problem = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    return {code: {**{k: v for k, v in ERRORS[code].items() if k != "model"},
                   "content": problem} for code in codes}


#: the API key: the ``X-API-Key`` header (pages and thumbnails also take ``?key=``, since
#: browsers cannot set headers); checked by :func:`_owner`, which answers 401 itself
API_KEY = APIKeyHeader(name="X-API-Key", scheme_name="ApiKey", auto_error=False,
                       description="API key (`neurorecon key key.name=...` makes one)")
API_KEY_QUERY = APIKeyQuery(name="key", scheme_name="ApiKeyQuery", auto_error=False,
                            description="the API key as ?key= (pages and gallery thumbnails)")


# --------------------------------------------------------------------------------------------
# state shared by the routes
# --------------------------------------------------------------------------------------------
class Service:
    """What the routes need: settings, decoders, keys, the job store, limits, metrics."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.keys = KeyRing.load(settings.api_keys_file)
        self.decoders: dict[str, Decoder] = load_bundles(settings.bundles)
        self.store = JobStore(settings.data_dir)
        self.hub = Hub(settings.stream.client_queue)
        self.streamer = StreamService(self.decoders, settings.stream, self.hub)
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
        old = self.streamer
        old.stop(wait=0.0)
        self.streamer = StreamService(self.decoders, settings, self.hub)
        self.streamer.start()

    # ------------------------------------------------------------------ workers
    def n_worker_processes(self) -> int:
        return 1 if self.settings.executor == "ray" else self.settings.workers

    def start_worker(self, k: int) -> subprocess.Popen:
        log = open(self.store.root / f"worker-{k}.log", "ab")  # noqa: SIM115 - kept open
        proc = subprocess.Popen(
            [sys.executable, "-m", "neurorecon.serve.worker",
             self.settings.model_dump_json(), f"w{k}-{uuid.uuid4().hex[:6]}", str(os.getpid())],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
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


# --------------------------------------------------------------------------------------------
# dependencies
# --------------------------------------------------------------------------------------------
def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]


def _owner(svc: Service, key: str | None) -> str:
    owner = svc.keys.identify(key)
    if owner is None:
        raise HTTPException(401, "missing or unknown API key: send it in the X-API-Key header",
                            headers={"WWW-Authenticate": "X-API-Key"})
    wait = svc.allow(owner)
    if wait is not None:
        raise HTTPException(429, f"rate limit of {svc.settings.rate_limit_per_minute} requests "
                                 "per minute reached for this key",
                            headers={"Retry-After": str(int(wait) + 1)})
    return owner


def api_owner(svc: ServiceDep,
              x_api_key: Annotated[str | None, Security(API_KEY)] = None) -> str:
    return _owner(svc, x_api_key)


def page_owner(svc: ServiceDep,
               x_api_key: Annotated[str | None, Security(API_KEY)] = None,
               key: Annotated[str | None, Security(API_KEY_QUERY)] = None) -> str:
    return _owner(svc, x_api_key or key)


Owner = Annotated[str, Depends(api_owner)]
JobId = Annotated[str, PathParam(description="job id (32 hex digits)", max_length=64)]


def _job(svc: Service, job_id: str, owner: str) -> Job:
    job = svc.store.get(job_id, owner) if JOB_ID.match(job_id) else None
    if job is None:
        raise HTTPException(404, "no such job for this key")
    return job


def _links(job_id: str) -> Links:
    return Links(self=f"/v1/fmri/jobs/{job_id}", result=f"/v1/fmri/jobs/{job_id}/result",
                 page=f"/jobs/{job_id}")


def _status(job: Job) -> JobStatus:
    return JobStatus(id=job.id, status=job.status, model=job.model, subject=job.subject,
                     input=job.kind, n_trials=len(job.spec["rows"]), attempts=job.attempts,
                     created=job.created, started=job.started, finished=job.finished,
                     error=job.error, progress=job.progress, timings=job.timings,
                     links=_links(job.id))


# --------------------------------------------------------------------------------------------
# routes
# --------------------------------------------------------------------------------------------
ops = APIRouter(tags=["operations"])
api = APIRouter(prefix="/v1", tags=["fMRI jobs"], responses=errors(401, 422, 429))


@ops.get("/health", response_model=Health, summary="liveness (no key)")
def health() -> Health:
    return Health(status="ok")


@ops.get("/ready", response_model=Ready, summary="bundles loaded and a job worker alive",
         responses={503: {"model": Ready}})
def ready(svc: ServiceDep) -> Any:
    alive = svc.store.workers_alive(within_s=5.0)
    body = Ready(ready=bool(svc.decoders) and alive > 0, models=sorted(svc.decoders),
                 workers_alive=alive, queued=svc.store.counts()["queued"])
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@ops.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(svc: ServiceDep) -> Response:
    body, content_type = svc.metrics.render()
    return Response(body, media_type=content_type)


#: the bundle's embedder fields a client sees (:class:`neurorecon.models.bundle.Embedder`)
EMBEDDER_FIELDS = {"name", "weights", "revision", "emb_dim", "n_tokens", "substitute_note"}
#: the bundle's generator fields a client sees (:class:`neurorecon.models.bundle.Generator`)
GENERATOR_FIELDS = {"cls", "note", "resolution", "embedding_scale", "defaults"}


def _model_info(model_id: str, decoder: Decoder) -> ModelInfo:
    cfg = decoder.config
    gen = cfg.generator
    return ModelInfo(
        id=model_id, modality=decoder.modality, subjects=decoder.subjects,
        model_type=cfg.model_type,
        embedder=cfg.embedder.model_dump(include=EMBEDDER_FIELDS),
        generator=None if gen is None else gen.model_dump(include=GENERATOR_FIELDS,
                                                          by_alias=True),
        gallery_images=0 if decoder.gallery is None else len(decoder.gallery),
        metrics=cfg.metrics or None, note=decoder.note)


@api.get("/models", response_model=ModelList, summary="the loaded bundles")
def models(svc: ServiceDep, owner: Owner) -> ModelList:
    return ModelList(models=[_model_info(k, d) for k, d in svc.decoders.items()])


@api.get("/models/{model_id}/gallery/{row}.png", response_class=Response,
         summary="a gallery thumbnail (key as X-API-Key or ?key=)",
         responses=errors(404))
def gallery_thumbnail(svc: ServiceDep, owner: Annotated[str, Depends(page_owner)],
                      model_id: Annotated[str, PathParam(max_length=80)],
                      row: Annotated[int, PathParam(ge=0, le=10**9)]) -> Response:
    decoder = svc.decoders.get(model_id)
    if decoder is None or decoder.gallery is None or row >= len(decoder.gallery):
        raise HTTPException(404, "no such model or gallery image")
    return Response(pages.png_bytes(decoder.gallery.thumbnail(row)), media_type="image/png")


def _check_upload(name: str, upload: UploadFile | None, *, nifti: bool) -> None:
    if upload is None:
        return
    filename = upload.filename or ""
    if nifti and not filename.lower().endswith(NIFTI_SUFFIXES):
        raise DataError(f"{name} must be a NIfTI file named *.nii or *.nii.gz, got "
                        f"{filename!r}")


def _save(upload: UploadFile, path: Path, digest: Any) -> None:
    upload.file.seek(0)
    with open(path, "wb") as out:
        while chunk := upload.file.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)


def _header_tr(path: Path) -> float | None:
    import nibabel as nib

    try:
        img = nib.load(path)
        return float(img.header.get_zooms()[3]) if img.ndim == 4 else None
    except Exception:  # noqa: BLE001 - unreadable files are reported by the full check
        return None


def _options(text: str | None) -> JobOptions:
    if not text:
        return JobOptions()
    try:
        return JobOptions.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(f"options.{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}"
                             for e in exc.errors())
        raise DataError(f"invalid options: {problems}") from None


@api.post("/fmri/jobs", status_code=202, response_model=JobCreated,
          summary="queue an fMRI run (or betas) for decoding",
          responses=errors(400, 413))
def submit_job(
    svc: ServiceDep, owner: Owner,
    subject: Annotated[str, Form(max_length=64, description="subject label known to the "
                                 "bundle (01 or sub-01)")],
    model: Annotated[str | None, Form(max_length=80, description="bundle id (optional when "
                                      "one is loaded)")] = None,
    tr: Annotated[float | None, Form(gt=0, le=60, description="repetition time (s); default: "
                                     "the NIfTI header")] = None,
    options: Annotated[str | None, Form(max_length=100_000, description="JSON: steps, "
                                        "guidance, seed, lowlevel, top_k, trials")] = None,
    bold: Annotated[UploadFile | None, File(description="4D BOLD run (.nii/.nii.gz)")] = None,
    events: Annotated[UploadFile | None, File(description="BIDS events TSV")] = None,
    betas: Annotated[UploadFile | None, File(description="4D single-trial betas")] = None,
    trials: Annotated[UploadFile | None, File(description="trial table TSV (one row per "
                                              "betas volume)")] = None,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobCreated:
    # --- what is asked, checked before anything is written
    if model is None:
        if len(svc.decoders) != 1:
            raise DataError(f"model is required: one of {sorted(svc.decoders)}")
        model = next(iter(svc.decoders))
    decoder = svc.decoders.get(model)
    if decoder is None:
        raise DataError(f"unknown model {model!r}; loaded: {sorted(svc.decoders)}")
    if decoder.modality != "fmri":
        raise DataError(f"model {model!r} decodes {decoder.modality.upper()}, not fMRI")
    label = subject.removeprefix("sub-")
    if label not in decoder.subjects:
        raise DataError(f"unknown subject {subject!r} for model {model!r}; it knows "
                        f"{decoder.subjects}")
    opts = _options(options)
    if bold is not None and betas is None:
        if events is None:
            raise DataError("a bold upload needs its events TSV (field events)")
        if trials is not None:
            raise DataError("trials goes with betas; a bold run takes events")
        kind, files = "bold", {"bold": bold, "events": events}
    elif betas is not None and bold is None:
        if events is not None:
            raise DataError("events goes with bold; betas take a trials TSV")
        kind, files = "betas", {"betas": betas, **({"trials": trials} if trials else {})}
    else:
        raise DataError("send either bold + events, or betas (+ trials)")
    for name, upload in files.items():
        _check_upload(name, upload, nifti=name in ("bold", "betas"))

    # --- inputs on disk, then the same checks the worker's Decoder applies
    job_id, folder = svc.store.new_dir()
    try:
        digest = hashlib.sha256()
        stored = {}
        for name, upload in files.items():
            suffix = (".nii.gz" if (upload.filename or "").lower().endswith(".gz") else ".nii"
                      ) if name in ("bold", "betas") else ".tsv"
            stored[name] = f"{name}{suffix}"
            digest.update(name.encode())
            _save(upload, folder / stored[name], digest)
        filenames = {n: f.filename for n, f in files.items()}
        names = jobs.upload_names(folder, stored, filenames)
        try:
            if kind == "bold":
                tr_value = tr if tr is not None else _header_tr(folder / stored["bold"])
                _, table, tr_value = decoder.check_fmri_run(
                    folder / stored["bold"], folder / stored["events"], subject=label,
                    tr=float("nan") if tr_value is None else tr_value)
                n_rows = len(table)
            else:
                _, data, table = decoder.check_betas(
                    folder / stored["betas"],
                    folder / stored["trials"] if "trials" in stored else None, subject=label)
                n_rows, tr_value = int(data.shape[3]), None
                del data
            rows = jobs.check_rows(table, n_rows, opts.trials,
                                   what="events table" if kind == "bold" else "trials table")
        except DataError as exc:
            raise DataError(jobs.public_message(exc, names)) from None
        if len(rows) > svc.settings.max_trials:
            raise DataError(f"{len(rows)} trials; this service takes at most "
                            f"{svc.settings.max_trials} per job (serve.max_trials)")
        spec = {"kind": kind, "subject": label, "tr": tr_value, "inputs": stored,
                "filenames": filenames, "rows": rows,
                "n_rows": n_rows, "options": opts.model_dump()}
        fingerprint = hashlib.sha256(json.dumps(
            {"inputs": digest.hexdigest(), "model": model,
             "bundle": decoder.config.provenance.created, "subject": label, "tr": tr_value,
             "options": spec["options"]}, sort_keys=True).encode()).hexdigest()
        try:
            job, created = svc.store.submit(
                job_id=job_id, owner=owner, model=model, subject=label, kind=kind, spec=spec,
                fingerprint=fingerprint, idempotency_key=idempotency_key)
        except IdempotencyConflict:
            raise DataError("Idempotency-Key was used before with another payload") from None
    except BaseException:
        shutil.rmtree(folder.parent, ignore_errors=True)
        raise
    if not created:
        shutil.rmtree(folder.parent, ignore_errors=True)
    logger.info("serve: job %s queued for %s (%s, %d trials)", job.id, owner, kind, len(rows))
    return JobCreated(id=job.id, status=job.status, links=_links(job.id))


@api.get("/fmri/jobs", response_model=JobList, summary="this key's jobs (newest first)")
def list_jobs(svc: ServiceDep, owner: Owner,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JobList:
    return JobList(jobs=[_status(j) for j in svc.store.list(owner, limit=limit)])


@api.get("/fmri/jobs/{job_id}", response_model=JobStatus, summary="a job's state",
         responses=errors(404))
def job_status(svc: ServiceDep, owner: Owner, job_id: JobId) -> JobStatus:
    return _status(_job(svc, job_id, owner))


@api.delete("/fmri/jobs/{job_id}", response_model=JobStatus, summary="cancel a job",
            responses=errors(404))
def cancel_job(svc: ServiceDep, owner: Owner, job_id: JobId) -> JobStatus:
    _job(svc, job_id, owner)
    return _status(svc.store.cancel(job_id, owner))


def _succeeded(job: Job) -> None:
    if job.status != "succeeded":
        raise HTTPException(409, f"job is {job.status}" + (f": {job.error}" if job.error
                                                          else "; no result yet"))


def _result(svc: Service, job: Job) -> dict[str, Any]:
    _succeeded(job)
    path = svc.store.job_dir(job.id) / jobs.RESULT / jobs.RESULT_JSON
    return json.loads(path.read_text())


@api.get("/fmri/jobs/{job_id}/result", response_model=JobResult,
         summary="retrieval, reconstructions and (with ground truth) metrics",
         responses=errors(404, 409))
def job_result(svc: ServiceDep, owner: Owner, job_id: JobId) -> JobResult:
    job = _job(svc, job_id, owner)
    raw = _result(svc, job)
    trials = []
    for t in raw["trials"]:
        t = dict(t)
        n = t.pop("image_index")
        t["image"] = None if n is None else f"/v1/fmri/jobs/{job.id}/images/{n}.png"
        t["topk"] = [{"id": h["id"], "score": h["score"], "concept": h["concept"],
                      "thumbnail": f"/v1/models/{job.model}/gallery/{h['gallery_row']}.png"}
                     for h in t["topk"]]
        trials.append(t)
    return JobResult(id=job.id, model=job.model, subject=job.subject, note=raw["note"],
                     trials=trials, metrics=raw["metrics"])


@api.get("/fmri/jobs/{job_id}/images/{n}.png", response_class=Response,
         summary="one reconstruction (PNG)", responses=errors(404, 409))
def job_image(svc: ServiceDep, owner: Owner, job_id: JobId,
              n: Annotated[int, PathParam(ge=0, le=10**7)]) -> Response:
    job = _job(svc, job_id, owner)
    _succeeded(job)
    if n >= (job.n_images or 0):  # the job table knows the count: no result.json read
        raise HTTPException(404, f"no image {n}: this job has {job.n_images or 0}")
    path = svc.store.job_dir(job.id) / jobs.RESULT / jobs.IMAGES / f"{int(n)}.png"
    return Response(path.read_bytes(), media_type="image/png")


page_router = APIRouter(tags=["pages"], responses=page_errors(401, 422, 429))


@page_router.get("/jobs/{job_id}", response_class=HTMLResponse,
                 summary="a job's results page (key as X-API-Key or ?key=)",
                 responses=page_errors(404))
def job_page(svc: ServiceDep, owner: Annotated[str, Depends(page_owner)],
             job_id: JobId) -> HTMLResponse:
    job = _job(svc, job_id, owner)
    raw = _result(svc, job) if job.status == "succeeded" else None
    decoder = svc.decoders.get(job.model)
    return HTMLResponse(pages.job_page(job, raw, decoder,
                                       svc.store.job_dir(job.id) / jobs.RESULT / jobs.IMAGES))


# --------------------------------------------------------------------------------------------
# the real-time MEG decoder
# --------------------------------------------------------------------------------------------
meg = APIRouter(prefix="/v1/meg", tags=["MEG stream"], responses=errors(401, 422, 429))


@meg.get("/status", response_model=StreamStatus, summary="the streaming decoder's state")
def stream_status(svc: ServiceDep, owner: Owner) -> StreamStatus:
    return StreamStatus(**svc.streamer.status())


@meg.get("/session", response_model=StreamSettings, summary="the stream settings in use")
def get_session(svc: ServiceDep, owner: Owner) -> StreamSettings:
    return svc.streamer.settings


@meg.put("/session", response_model=StreamStatus, summary="decode another stream (the "
         "serve.stream settings, for this session)", responses=errors(400, 413))
def put_session(svc: ServiceDep, owner: Owner, settings: StreamSession) -> StreamStatus:
    svc.restart_stream(StreamSettings(**settings.model_dump()))
    return StreamStatus(**svc.streamer.status())


@meg.delete("/session", response_model=StreamStatus, summary="stop decoding")
def delete_session(svc: ServiceDep, owner: Owner) -> StreamStatus:
    svc.restart_stream(svc.streamer.settings.model_copy(update={"source": None}))
    return StreamStatus(**svc.streamer.status())


async def stream_socket(websocket: WebSocket) -> None:
    """``/v1/meg/stream``: decoded messages as JSON. The key comes as ``?key=`` or as the
    second WebSocket subprotocol (``["neurorecon", <key>]``), since browsers cannot set
    headers; the latest message first, then each new one (a slow client skips, newest wins)."""
    svc: Service = websocket.app.state.service
    protocols = [p.strip() for p in websocket.headers.get("sec-websocket-protocol",
                                                          "").split(",") if p.strip()]
    key = websocket.query_params.get("key") or (protocols[1] if len(protocols) > 1 else None)
    owner = svc.keys.identify(key)
    if owner is None:
        await websocket.close(code=1008, reason="missing or unknown API key")
        return
    await websocket.accept(subprotocol="neurorecon" if protocols[:1] == ["neurorecon"]
                           else None)
    queue = svc.hub.subscribe()
    try:
        if svc.hub.latest is not None:
            await websocket.send_json(svc.hub.latest)
        while True:
            await websocket.send_json(await queue.get())
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        svc.hub.unsubscribe(queue)


@page_router.get("/live", response_class=HTMLResponse,
                 summary="the live decoding page (key as ?key=)")
def live(svc: ServiceDep, owner: Annotated[str, Depends(page_owner)]) -> HTMLResponse:
    return HTMLResponse(live_page())


# --------------------------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------------------------
class UploadLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413, from its Content-Length
    before anything is read, or while it streams (chunked) — never read whole into memory."""

    class _TooLarge(BaseException):  # not an Exception: the body parser must not swallow it
        pass

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._TooLarge
            return message

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except self._TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"detail": f"upload larger than serve.max_upload_mb "
                                     f"({self.limit / 2**20:g} MB)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class Timed:
    """ASGI middleware: request latency by method, route template and status (no query
    strings, so keys sent as ``?key=`` never reach a label or a log)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def watched(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            route = scope.get("route")
            self.metrics.observe_request(scope["method"], getattr(route, "path", "unmatched"),
                                         status, time.perf_counter() - t0)


def _allowed(request: Request) -> list[str]:
    """The methods some route of the app answers at this request's path (asked of the
    router per method: included routers nest their routes)."""
    return [method for method in ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL
                   for route in request.app.router.routes)]


def create_app(settings: ServeSettings, *, start_workers: bool = True) -> FastAPI:
    """Build the service (bundles, keys and job table loaded now; workers at start-up)."""
    svc = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = None
        svc.hub.loop = asyncio.get_running_loop()
        svc.streamer.start()
        if start_workers:
            svc.workers = [svc.start_worker(k) for k in range(svc.n_worker_processes())]
            task = asyncio.create_task(svc.supervise())
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            svc.streamer.stop(wait=5.0)
            svc.stop_workers()

    app = FastAPI(title="neurorecon", version="0.1.0", lifespan=lifespan,
                  description="Batch fMRI-to-image decoding with trained neurorecon bundles: "
                              "upload a BOLD run (or betas), get retrieved gallery images, "
                              "reconstructions and, with ground truth, metrics.")
    app.state.service = svc
    app.include_router(ops)
    app.include_router(api)
    app.include_router(meg)
    app.include_router(page_router)
    app.add_api_websocket_route("/v1/meg/stream", stream_socket)

    @app.exception_handler(DataError)
    async def _bad_input(request: Request, exc: DataError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": problems}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 405:  # Allow: every method of the path, not the first route's
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(_allowed(request))}
        return await http_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # logged, never sent
        logger.exception("serve: unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error (logged by the service)"},
                            status_code=500)

    app.add_middleware(UploadLimit, limit=settings.max_upload_bytes)
    app.add_middleware(Timed, metrics=svc.metrics)  # outermost: times the 413s too
    return app
