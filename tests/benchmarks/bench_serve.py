"""Benchmark: the batch fMRI service end to end on CPU (prints figures).

For one BOLD run of a BIDS fMRI dataset and a trained fMRI bundle, for each executor setting
(local worker; Ray with 1 and 2 actors): the time from the upload to the result JSON, seconds
per image and images/s of the reconstruct stage (from the job's timings), and the latency of
``GET /v1/fmri/jobs/{id}`` (p50/p99), polled at ~20 Hz while the job computes.

Not a test; run it::

    .venv/bin/python tests/benchmarks/bench_serve.py runs/run/<time>/bundle \\
        --data data/sample/fmri [--subject 01] [--run 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from neurorecon.serve.client import Client, LocalService
from neurorecon.serve.keys import create_key

SETTINGS = {"local x1": {"executor": "local", "workers": 1},
            "ray x1": {"executor": "ray", "workers": 1},
            "ray x2": {"executor": "ray", "workers": 2}}


def one(bundle: Path, bold: Path, events: Path, subject: str, setting: dict, *,
        batch_size: int, options: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        key = create_key(root / "keys.txt", "bench")
        t_start = time.perf_counter()
        with LocalService({"bundles": [str(bundle)], "data_dir": str(root / "data"),
                           "api_keys_file": str(root / "keys.txt"), "batch_size": batch_size,
                           "rate_limit_per_minute": 10**6, **setting},
                          cwd=root, log=root / "serve.log") as service:
            startup = time.perf_counter() - t_start
            client = Client(service.url, key)
            t0 = time.perf_counter()
            job_id = client.submit(bold=bold, events=events, subject=subject, options=options)
            latencies, done = [], threading.Event()

            def poll():
                poller = Client(service.url, key)
                while not done.is_set():
                    t = time.perf_counter()
                    if poller.status(job_id)["status"] == "running":
                        latencies.append(time.perf_counter() - t)
                    time.sleep(0.05)

            thread = threading.Thread(target=poll, daemon=True)
            thread.start()
            job = client.wait(job_id, poll=0.1)
            result = client.result(job_id)
            e2e = time.perf_counter() - t0
            done.set()
            thread.join()
        assert job["status"] == "succeeded", job
        t = job["timings"]
        n = len([r for r in result["trials"] if r["image"]])
        lat = np.asarray(latencies) * 1e3
        return {"startup_s": round(startup, 2), "upload_to_result_s": round(e2e, 2),
                "prepare_s": t["prepare_s"], "reconstruct_s": t["reconstruct_s"],
                "metrics_s": t["metrics_s"], "images": n,
                "seconds_per_image": round(t["reconstruct_s"] / max(n, 1), 4),
                "images_per_s": round(n / t["reconstruct_s"], 2) if t["reconstruct_s"] else None,
                "status_p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
                "status_p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
                "status_calls": int(len(lat))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="BIDS fMRI root")
    ap.add_argument("--subject", default="01")
    ap.add_argument("--run", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    func = args.data / f"sub-{args.subject}" / "func"
    stem = f"sub-{args.subject}_task-images_run-{args.run:02d}"
    bold, events = func / f"{stem}_bold.nii.gz", func / f"{stem}_events.tsv"
    options = {} if args.steps is None else {"steps": args.steps}
    out = {}
    for name in args.settings:
        out[name] = one(args.bundle, bold, events, args.subject, SETTINGS[name],
                        batch_size=args.batch_size, options=options)
        print(name, json.dumps(out[name]), flush=True)
    cols = ["upload_to_result_s", "prepare_s", "reconstruct_s", "metrics_s", "images",
            "seconds_per_image", "images_per_s", "status_p50_ms", "status_p99_ms"]
    print("\n| setting | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for name, row in out.items():
        print(f"| {name} | " + " | ".join(str(row[c]) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
