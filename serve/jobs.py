"""What a job computes: uploaded fMRI -> the bundle's ``Decoder`` -> retrieval, reconstructions
and, with ground truth, metrics; written into the job folder atomically.

The stages are plain functions of a :class:`~neurorecon.pipelines.inference.Decoder`, so the
local worker and the Ray actors (:mod:`.executors`) run the same code.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from neurorecon.models.common.checks import DataError, read_tsv
from neurorecon.models.retrieval import chance_metrics, retrieval_metrics
from neurorecon.pipelines.inference import Decoder

from .schemas import JobOptions, JobSpec

RESULT = "result"
RESULT_JSON = "result.json"
IMAGES = "images"


def input_paths(job_dir: Path, spec: JobSpec) -> dict[str, Path]:
    """The job's stored inputs (names made by the service, never by the client)."""
    return {field: job_dir / "inputs" / name for field, name in spec.inputs.items()}


def upload_names(inputs: Path, stored: dict[str, str], filenames: dict[str, str | None]
                 ) -> dict[Path, str]:
    """Stored input path -> how the client knows it: ``"<field> (<uploaded file name>)"``."""
    return {inputs / name: f"{field} ({filenames.get(field) or name})"
            for field, name in stored.items()}


def public_message(exc: BaseException, names: dict[Path, str]) -> str:
    """An error message for the client: the service's own file paths replaced by the names of
    the uploads they hold (:func:`upload_names`)."""
    msg = str(exc)
    for path, name in names.items():
        msg = msg.replace(str(path), name)
    return msg


def trials_table(job_dir: Path, spec: JobSpec) -> pd.DataFrame:
    paths = input_paths(job_dir, spec)
    path = paths["events"] if spec.kind == "bold" else paths.get("trials")
    if path is None:
        return pd.DataFrame(index=range(spec.n_rows))
    return read_tsv(path, what="trial table")


def decode_inputs(decoder: Decoder, job_dir: Path, spec: JobSpec) -> dict[str, np.ndarray]:
    """Prepare (GLM or masked betas) -> the selected rows -> embeddings of both heads."""
    paths = input_paths(job_dir, spec)
    subject = spec.subject
    if spec.kind == "bold":
        X = decoder.prepare_fmri(paths["bold"], paths["events"], subject=subject, tr=spec.tr)
    else:
        X = decoder.prepare_betas(paths["betas"], paths.get("trials"), subject=subject)
    X = X[np.asarray(spec.rows, int)]
    out = {"X": X, "clip": decoder.encode(X, subject=subject, head="clip")}
    if spec.options.reconstruct:
        out["gen"] = decoder.encode(X, subject=subject, head=decoder.generation_head)
    return out


def generate_batch(decoder: Decoder, *, subject: str, gen: np.ndarray, clip: np.ndarray,
                   X: np.ndarray | None, options: JobOptions, seed: int) -> list[bytes]:
    """One batch of reconstructions as PNG bytes (the stand-in note in a text chunk)."""
    from PIL.PngImagePlugin import PngInfo

    images = decoder.reconstruct(gen, subject=subject, lowlevel=X, retrieval=clip, seed=seed,
                                 steps=options.steps, guidance=options.guidance,
                                 strength=options.strength)
    out = []
    for im in images:
        meta = PngInfo()
        meta.add_text("neurorecon_note", im.info.get("neurorecon_note", ""))
        buf = io.BytesIO()
        im.save(buf, format="PNG", pnginfo=meta)
        out.append(buf.getvalue())
    return out


def lowlevel_enabled(decoder: Decoder, options: JobOptions, subject: str) -> bool:
    want = options.lowlevel
    if want is None:
        gen = decoder.config.generator
        want = bool(gen and gen.defaults.lowlevel)
    return bool(want) and subject in decoder.lowlevel


class Cancelled(Exception):
    """The job was cancelled (or its claim lost) while it ran."""


def run_job(decoder: Decoder, job_dir: Path, spec: JobSpec, *,
            decode: Callable[[], dict[str, np.ndarray]],
            generate: Callable[[list[dict[str, Any]]], Iterator[tuple[int, list[bytes]]]],
            report: Callable[[str, int, int], bool], batch_size: int) -> dict[str, Any]:
    """Run one job; write ``result/`` (``result.json`` + ``images/<n>.png``) atomically.

    ``decode()`` returns :func:`decode_inputs`' arrays; ``generate(batches)`` yields ``(batch
    index, PNG bytes)`` as batches finish (in any order); ``report(stage, done, total)``
    records progress and returns False when the job must stop (cancelled). Returns timings.
    """
    t0 = time.perf_counter()
    subject, options = spec.subject, spec.options
    n = len(spec.rows)
    if not report("prepare", 0, n):
        raise Cancelled
    arrays = decode()
    t_prep = time.perf_counter()
    hits = decoder.retrieve(arrays["clip"], k=min(options.top_k, len(decoder.gallery)))
    for stale in job_dir.glob(".result-*"):  # a killed attempt's unfinished result
        shutil.rmtree(stale, ignore_errors=True)
    result_tmp = Path(tempfile.mkdtemp(prefix=".result-", dir=job_dir))
    try:
        (result_tmp / IMAGES).mkdir()
        n_images = 0
        t_gen = time.perf_counter()
        if options.reconstruct:
            low = lowlevel_enabled(decoder, options, subject)
            seed = int(options.seed or 0)
            batches = [{"start": s, "gen": arrays["gen"][s:s + batch_size],
                        "clip": arrays["clip"][s:s + batch_size],
                        "X": arrays["X"][s:s + batch_size] if low else None,
                        "seed": seed + s} for s in range(0, n, batch_size)]
            if not report("reconstruct", 0, n):
                raise Cancelled
            for b, pngs in generate(batches):
                for i, png in enumerate(pngs):
                    (result_tmp / IMAGES / f"{batches[b]['start'] + i}.png").write_bytes(png)
                n_images += len(pngs)
                if not report("reconstruct", n_images, n):
                    raise Cancelled
        t_rec = time.perf_counter()
        table = trials_table(job_dir, spec).iloc[spec.rows].reset_index(drop=True)
        report("metrics", n_images, n)
        metrics = ground_truth_metrics(decoder, table, arrays["clip"], hits,
                                       result_tmp / IMAGES, options, n_images=n_images)
        timings = {"prepare_s": round(t_prep - t0, 3), "reconstruct_s": round(t_rec - t_gen, 3),
                   "metrics_s": round(time.perf_counter() - t_rec, 3)}
        timings["total_s"] = round(time.perf_counter() - t0, 3)
        if n_images:
            timings["seconds_per_image"] = round((t_rec - t_gen) / n_images, 4)
        result = {"trials": trial_records(table, spec.rows, hits, n_images),
                  "metrics": metrics, "n_images": n_images, "timings": timings,
                  "note": decoder.note}
        (result_tmp / RESULT_JSON).write_text(json.dumps(result, indent=1, default=float))
        _fsync_dir(result_tmp)
        os.replace(result_tmp, job_dir / RESULT)  # the result appears whole or not at all
    finally:
        shutil.rmtree(result_tmp, ignore_errors=True)
    return result


def _fsync_dir(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def trial_records(table: pd.DataFrame, rows: Iterable[int], hits, n_images: int
                  ) -> list[dict[str, Any]]:
    """Per trial: its events row, onset, trial type, stimulus, top-k gallery hits."""
    out = []
    for i, (row, trial_hits) in enumerate(zip(rows, hits, strict=True)):
        rec = {"row": int(row), "topk": [{"id": h["image_id"], "score": round(h["score"], 5),
                                          "concept": h["concept"], "gallery_row": h["row"]}
                                         for h in trial_hits],
               "image_index": i if i < n_images else None}
        for col in ("onset", "trial_type", "stim_file"):
            if col in table and pd.notna(table[col].iloc[i]):
                value = table[col].iloc[i]
                rec[col] = float(value) if col == "onset" else str(value)
        out.append(rec)
    return out


def ground_truth_metrics(decoder: Decoder, table: pd.DataFrame, clip: np.ndarray, hits,
                         image_dir: Path, options: JobOptions, *, n_images: int
                         ) -> dict[str, Any] | None:
    """With a ``stim_file`` column naming gallery images: retrieval among the gallery (with
    chance), and reconstruction metrics against the gallery thumbnails (with the top-1
    retrieved thumbnail as the floor). None without ground truth."""
    if "stim_file" not in table or table["stim_file"].isna().all():
        return None
    gallery = decoder.gallery
    row_of = {image_id: k for k, image_id in enumerate(gallery.index["image_id"])}
    known = np.array([isinstance(s, str) and s in row_of for s in table["stim_file"]])
    out: dict[str, Any] = {"n_trials": len(table), "n_with_gallery_stimulus": int(known.sum())}
    if not known.any():
        out["note"] = "no stim_file of this run is in the bundle's gallery: nothing to score"
        return out
    true = np.array([row_of[s] for s in table["stim_file"][known]])
    out["retrieval"] = {"encoder": retrieval_metrics(clip[known], gallery.embeddings, true),
                        "chance": chance_metrics(len(gallery)),
                        "candidates": "all gallery images"}
    if n_images and known[:n_images].sum() >= 2:
        from neurorecon.pipelines.evaluate.recon_metrics import compare_reconstructions

        rows = np.flatnonzero(known[:n_images])
        recon = [Image.open(image_dir / f"{i}.png").convert("RGB") for i in rows]
        size = recon[0].size
        truth = [gallery.thumbnail(row_of[table["stim_file"].iloc[i]]).resize(size)
                 for i in rows]
        floor = [gallery.thumbnail(hits[i][0]["row"]).resize(size) for i in rows]
        skip = [] if options.full_metrics else ["inception"]
        metrics = compare_reconstructions({"brain": recon, "floor_retrieved": floor}, truth,
                                          skip=skip)
        out["reconstruction"] = {
            **metrics, "truth": f"gallery thumbnails resized to {size[0]} px (the bundle "
                               "keeps no full-size stimuli)"}
    return out


def check_rows(table: pd.DataFrame | None, n_rows: int, trials, *, what: str) -> list[int]:
    """The ``options.trials`` selection -> 0-based rows, checked."""
    if trials == "all":
        return list(range(n_rows))
    if trials == "test":
        if table is None or "trial_type" not in table:
            raise DataError(f"options.trials='test' needs a 'trial_type' column in the {what}")
        rows = np.flatnonzero(table["trial_type"].astype(str).to_numpy() == "test").tolist()
        if not rows:
            raise DataError(f"options.trials='test': no row of the {what} has trial_type test")
        return rows
    bad = [r for r in trials if not 0 <= r < n_rows]
    if bad or not trials:
        raise DataError(f"options.trials: rows {bad[:5] or '[]'} are not rows of the {what} "
                        f"(0..{n_rows - 1})")
    if len(set(trials)) != len(trials):
        raise DataError("options.trials: repeated rows")
    return [int(r) for r in trials]
