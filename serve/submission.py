"""A job submission, checked before it is queued: the bundle, subject and uploads are
checked, the uploads stored under names made here, then given the same checks the worker's
``Decoder`` applies (messages name the uploads, never the service's paths); the result is a
typed :class:`~.schemas.JobSpec` in the job table (deduplicated by ``Idempotency-Key``). A
failed submission leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pydantic import ValidationError

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger

from . import jobs
from .schemas import JobOptions, JobSpec
from .service import Service
from .store import IdempotencyConflict, Job

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class Upload(Protocol):
    """An uploaded file (a FastAPI ``UploadFile``): the client's name and the contents."""

    filename: str | None
    file: BinaryIO


def submit_job(svc: Service, owner: str, *, subject: str, model: str | None, tr: float | None,
               options: str | None, uploads: dict[str, Upload],
               idempotency_key: str | None) -> Job:
    """Queue ``owner``'s job (or return the job an earlier request with the same
    ``idempotency_key`` and payload made). ``uploads``: ``bold`` + ``events``, or ``betas``
    (+ ``trials``); ``options``: the JSON of :class:`~.schemas.JobOptions`.

    Raises :class:`DataError` (a 422 with its message) for anything that cannot run.
    """
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
    bold, events, betas, trials = (uploads.get(k) for k in ("bold", "events", "betas", "trials"))
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
        spec = JobSpec(kind=kind, subject=label, tr=tr_value, inputs=stored, filenames=filenames,
                       rows=rows, n_rows=n_rows, options=opts)
        fingerprint = hashlib.sha256(json.dumps(
            {"inputs": digest.hexdigest(), "model": model,
             "bundle": decoder.config.provenance.created, "subject": label, "tr": tr_value,
             "options": opts.model_dump()}, sort_keys=True).encode()).hexdigest()
        try:
            job, created = svc.store.submit(
                job_id=job_id, owner=owner, model=model, spec=spec, fingerprint=fingerprint,
                idempotency_key=idempotency_key)
        except IdempotencyConflict:
            raise DataError("Idempotency-Key was used before with another payload") from None
    except BaseException:
        shutil.rmtree(folder.parent, ignore_errors=True)
        raise
    if not created:
        shutil.rmtree(folder.parent, ignore_errors=True)
    logger.info("serve: job %s queued for %s (%s, %d trials)", job.id, owner, kind, len(rows))
    return job


def _check_upload(name: str, upload: Upload | None, *, nifti: bool) -> None:
    if upload is None:
        return
    filename = upload.filename or ""
    if nifti and not filename.lower().endswith(NIFTI_SUFFIXES):
        raise DataError(f"{name} must be a NIfTI file named *.nii or *.nii.gz, got "
                        f"{filename!r}")


def _save(upload: Upload, path: Path, digest: Any) -> None:
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
