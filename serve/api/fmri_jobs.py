"""fMRI decoding jobs (``/v1/fmri/jobs``) and their results page (``/jobs/{id}``).

Routes never build a filesystem path from request text: job ids are matched against
server-made ids, image numbers are integers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, HTTPException, Query, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger

from .. import jobs, pages
from ..schemas import JobCreated, JobList, JobOptions, JobResult, JobStatus, Links
from ..service import Service
from ..store import JOB_ID, IdempotencyConflict, Job
from .deps import Owner, PageOwner, ServiceDep, errors, page_errors

NIFTI_SUFFIXES = (".nii", ".nii.gz")

router = APIRouter(prefix="/v1", tags=["fMRI jobs"], responses=errors(401, 422, 429))
page = APIRouter(tags=["pages"], responses=page_errors(401, 422, 429))


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


@router.post("/fmri/jobs", status_code=202, response_model=JobCreated,
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


@router.get("/fmri/jobs", response_model=JobList, summary="this key's jobs (newest first)")
def list_jobs(svc: ServiceDep, owner: Owner,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JobList:
    return JobList(jobs=[_status(j) for j in svc.store.list(owner, limit=limit)])


@router.get("/fmri/jobs/{job_id}", response_model=JobStatus, summary="a job's state",
            responses=errors(404))
def job_status(svc: ServiceDep, owner: Owner, job_id: JobId) -> JobStatus:
    return _status(_job(svc, job_id, owner))


@router.delete("/fmri/jobs/{job_id}", response_model=JobStatus, summary="cancel a job",
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


@router.get("/fmri/jobs/{job_id}/result", response_model=JobResult,
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


@router.get("/fmri/jobs/{job_id}/images/{n}.png", response_class=Response,
            summary="one reconstruction (PNG)", responses=errors(404, 409))
def job_image(svc: ServiceDep, owner: Owner, job_id: JobId,
              n: Annotated[int, PathParam(ge=0, le=10**7)]) -> Response:
    job = _job(svc, job_id, owner)
    _succeeded(job)
    if n >= (job.n_images or 0):  # the job table knows the count: no result.json read
        raise HTTPException(404, f"no image {n}: this job has {job.n_images or 0}")
    path = svc.store.job_dir(job.id) / jobs.RESULT / jobs.IMAGES / f"{int(n)}.png"
    return Response(path.read_bytes(), media_type="image/png")


@page.get("/jobs/{job_id}", response_class=HTMLResponse,
          summary="a job's results page (key as X-API-Key or ?key=)",
          responses=page_errors(404))
def job_page(svc: ServiceDep, owner: PageOwner,
             job_id: JobId) -> HTMLResponse:
    job = _job(svc, job_id, owner)
    raw = _result(svc, job) if job.status == "succeeded" else None
    decoder = svc.decoders.get(job.model)
    return HTMLResponse(pages.job_page(job, raw, decoder,
                                       svc.store.job_dir(job.id) / jobs.RESULT / jobs.IMAGES))
