"""fMRI decoding jobs (``/v1/fmri/jobs``) and their results page (``/jobs/{id}``).

Routes never build a filesystem path from request text: job ids are matched against
server-made ids, image numbers are integers.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, HTTPException, Query, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, Response

from .. import jobs, pages, submission
from ..schemas import JobCreated, JobList, JobResult, JobStatus, Links
from ..service import Service
from ..store import JOB_ID, Job
from .deps import Owner, PageOwner, ServiceDep, errors, page_errors

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
                     input=job.kind, n_trials=len(job.spec.rows), attempts=job.attempts,
                     created=job.created, started=job.started, finished=job.finished,
                     error=job.error, progress=job.progress, timings=job.timings,
                     links=_links(job.id))


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
    uploads = {name: f for name, f in (("bold", bold), ("events", events), ("betas", betas),
                                        ("trials", trials)) if f is not None}
    job = submission.submit_job(svc, owner, subject=subject, model=model, tr=tr, options=options,
                                uploads=uploads, idempotency_key=idempotency_key)
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
