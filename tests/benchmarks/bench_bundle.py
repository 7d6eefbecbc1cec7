"""Benchmark: a trained-decoder bundle on CPU (prints figures).

For a bundle directory (``<run dir>/bundle``): its size per part, ``Decoder.from_pretrained``
time (in a fresh process: the import of the inference module, then the load), and decode
times through the bundle on the dataset it was trained on -- MEG: one streamed window
(``meg_window`` + ``encode`` + ``retrieve``) and one whole recording (``prepare_meg``); fMRI:
one BOLD run (``prepare_fmri`` GLM + ``encode``). Target (issue 8): ``from_pretrained`` < 2 s.

Not a test (no ``test_`` names, no assertions); run it::

    .venv/bin/python tests/benchmarks/bench_bundle.py runs/run/<time>/bundle \\
        --data data/sample/meg [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() \
        else path.stat().st_size


def sizes(bundle: Path) -> dict[str, float]:
    """MB per top-level entry of the bundle, and in total."""
    out = {p.name: round(_size(p) / 1e6, 3) for p in sorted(bundle.iterdir())}
    out["total"] = round(_size(bundle) / 1e6, 3)
    return out


def load_times(bundle: Path, *, repeats: int = 3) -> dict[str, float]:
    """Fresh-process timings: import of the inference module, then from_pretrained (median)."""
    code = ("import time; t0 = time.perf_counter()\n"
            "from neurorecon.pipelines.inference import Decoder\n"
            "t1 = time.perf_counter()\n"
            f"Decoder.from_pretrained({str(bundle)!r})\n"
            "t2 = time.perf_counter(); print(t1 - t0, t2 - t1)")
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        runs.append([float(v) for v in out.stdout.split()[-2:]])
    imp, load = np.median(np.asarray(runs), axis=0)
    return {"import_s": round(float(imp), 3), "from_pretrained_s": round(float(load), 3)}


def _timed(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.percentile(times, 99))


def meg_times(decoder, data_root: Path, repeats: int) -> dict[str, float]:
    from neurorecon.pipelines.data.events import EventSpec, read_events
    from neurorecon.pipelines.data.studies import find_recordings
    from neurorecon.pipelines.preprocess.meg import read_raw

    rec = next(r for r in find_recordings(data_root, modality="meg")
               if r.subject in decoder.subjects)
    events = read_events(rec.events_path, bids_root=data_root, spec=EventSpec())
    raw = read_raw(rec)
    t0 = time.perf_counter()
    decoder.prepare_meg(raw, subject=rec.subject, events=events)
    recording_s = time.perf_counter() - t0
    info = decoder.config.subjects[rec.subject]
    window = np.random.default_rng(0).standard_normal(
        (len(info.ch_names), info.n_times)) * 1e-12
    out = {"recording_prepare_s": round(recording_s, 3), "n_events": int(len(events)),
           "recording_minutes": round(raw.times[-1] / 60, 2)}

    def one_window():
        x = decoder.meg_window(window, subject=rec.subject)
        decoder.retrieve(decoder.encode(x, subject=rec.subject), k=5)

    one_window()
    med, p99 = _timed(one_window, repeats)
    out.update(window_ms_median=round(1e3 * med, 2), window_ms_p99=round(1e3 * p99, 2))
    if decoder.meg_params.phase == "causal":
        stream = decoder.streaming_filter(rec.subject, sfreq=raw.info["sfreq"])
        chunk = np.zeros((len(info.ch_names), int(raw.info["sfreq"] // 10)))
        med, _ = _timed(lambda: stream.process(chunk), repeats)
        out["filter_100ms_chunk_ms"] = round(1e3 * med, 3)
    return out


def fmri_times(decoder, data_root: Path) -> dict[str, float]:
    from neurorecon.pipelines.data.events import EventSpec, read_events
    from neurorecon.pipelines.data.studies import find_recordings

    rec = next(r for r in find_recordings(data_root, modality="fmri")
               if r.subject in decoder.subjects)
    events = read_events(rec.events_path, bids_root=data_root, spec=EventSpec())
    t0 = time.perf_counter()
    X = decoder.prepare_fmri(rec.fpath, events, subject=rec.subject)
    glm = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoder.retrieve(decoder.encode(X, subject=rec.subject), k=5)
    return {"run_glm_s": round(glm, 3), "run_encode_retrieve_ms": round(
        1e3 * (time.perf_counter() - t0), 2), "n_trials": int(len(X)),
        "n_voxels": int(X.shape[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", type=Path, required=True,
                        help="BIDS root of the dataset the bundle was trained on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from neurorecon.pipelines.inference import Decoder

    decoder = Decoder.from_pretrained(args.bundle)
    result = {"bundle": str(args.bundle), "modality": decoder.modality,
              "threads": args.threads, "size_mb": sizes(args.bundle),
              **load_times(args.bundle)}
    if decoder.modality == "meg":
        result["decode"] = meg_times(decoder, args.data, args.repeats)
    else:
        result["decode"] = fmri_times(decoder, args.data)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
