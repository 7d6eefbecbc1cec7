"""Benchmark: memory and time of the linear steps of a MEG training run against its trial count.

The focus search (sliding-window ridge cross-validated over the train trials), the read-out's
bin-width search (binned focus, train -> validation trials), the full-window ridge baseline
(train + validation -> test) and the time-resolved ridge (every subject), as
``neurorecon train`` runs them, on a fraction of a dataset's train trials. Each measurement
runs in a fresh process; the figure is that process's peak RSS above its RSS after the data
module is set up (``VmHWM``, reset after the set-up) and the wall time of the three steps.
``--in-memory`` runs the
former implementation for comparison: every trial stacked, then ``RidgeDecoder`` (sklearn's
RidgeCV) per window.

Not a test; run it on a preprocessed and embedded BIDS MEG dataset::

    .venv/bin/python tests/benchmarks/bench_ridge_memory.py --root data/big-7/meg \\
        --fractions 0.2 0.5 1.0 [--in-memory]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import time

import numpy as np


def status_mb(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, MB."""
    with open("/proc/self/status") as fid:
        for line in fid:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as fid:
        fid.write("5")


def measure(root: str, fraction: float, in_memory: bool) -> dict:
    from hydra import compose, initialize_config_module

    from neurorecon.models.retrieval import candidate_rows, time_resolved_retrieval
    from neurorecon.models.ridge import RidgeDecoder
    from neurorecon.pipelines.train.fit import build_datamodule, prepare_caches
    from neurorecon.pipelines.train.focus import choose_focus
    from neurorecon.pipelines.train.readout import choose_readout
    from neurorecon.pipelines.train.ridge import (
        flat_targets,
        ridge_predictions,
        subject_arrays,
        window_ridge,
    )

    with initialize_config_module("neurorecon.configs", version_base=None):
        cfg = compose("train", overrides=["data=bids", f"data.root={root}",
                                          "paths.output_dir=/tmp/bench-ridge-memory"])
    pre, emb = prepare_caches(cfg)
    labels = build_datamodule(cfg, pre, emb).labels
    dm = build_datamodule(cfg, pre, emb, train_fraction={lab: fraction for lab in labels})
    n_trials = len(dm.splits["train"]) + len(dm.splits["val"])
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the set-up's freed heap would hide growth
    base = status_mb("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    test = dm.splits["test"]
    cand_rows, true_idx = candidate_rows(test.target)
    cand = flat_targets(dm)[cand_rows]
    params = dm.recipe["params"]
    if in_memory:  # the former implementation: stacked trials, sklearn RidgeCV per window
        val = dm.splits["val"]
        vstims, vtrue = candidate_rows(val.target)
        for k in range(len(labels)):
            for splits, ev, c, t in ((("train",), "val", flat_targets(dm)[vstims], vtrue),
                                     (("train", "val"), "test", cand, true_idx)):
                fit_X, fit_Y, eval_X, rows = subject_arrays(dm, k, fit_splits=splits,
                                                            eval_split=ev)
                time_resolved_retrieval(
                    lambda a, b, y=fit_Y: RidgeDecoder().fit(a, y).predict(b), fit_X, eval_X,
                    c, t[rows], sfreq=params["sfreq"], tmin=params["tmin"],
                    step=0.1 if ev == "val" else 0.05)
            fit_X, fit_Y, eval_X, _ = subject_arrays(dm, k)
            RidgeDecoder().fit(fit_X, fit_Y).predict(eval_X)
    steps, seconds = {}, {}
    if not in_memory:
        def step(name, run):  # each step's own peak above the set-up RSS, and its time
            reset_peak()
            start = time.perf_counter()
            out = run()
            seconds[name] = round(time.perf_counter() - start, 1)
            steps[name] = round(status_mb("VmHWM") - base, 1)
            return out

        focus = step("focus", lambda: choose_focus(dm))
        step("readout", lambda: choose_readout(dm, span=tuple(focus["samples"]), deep_val=None,
                                               bin_widths=[0.025, 0.05, 0.1]))
        step("ridge", lambda: ridge_predictions(dm))
        step("time_resolved", lambda: [window_ridge(dm, int(k), cand, true_idx)
                                       for k in np.unique(test.subject)])
    peak = max(steps.values()) + base if steps else status_mb("VmHWM")
    return {"fraction": fraction, "trials": n_trials, "seconds": round(time.perf_counter() - t0, 1),
            "peak_above_setup_mb": round(peak - base, 1), "setup_rss_mb": round(base, 1),
            "steps_peak_mb": steps, "steps_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.5, 1.0])
    parser.add_argument("--in-memory", action="store_true")
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.root, args.one, args.in_memory)))
        return
    rows = []
    for fraction in args.fractions:
        cmd = [sys.executable, __file__, "--root", args.root, "--one", str(fraction)]
        out = subprocess.run(cmd + (["--in-memory"] if args.in_memory else []),
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"\n{'in-memory (former)' if args.in_memory else 'streamed'} focus search + ridge "
          "baseline + time-resolved ridge")
    print("| train + val trials | seconds | peak RSS above setup (MB) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['trials']} | {r['seconds']} | {r['peak_above_setup_mb']} |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        per = 1000 * (b["peak_above_setup_mb"] - a["peak_above_setup_mb"]) / (b["trials"]
                                                                             - a["trials"])
        print(f"growth: {per:.0f} MB per 1000 trials; time x{b['seconds'] / a['seconds']:.1f} "
              f"for x{b['trials'] / a['trials']:.1f} trials")
        for name, t in b.get("steps_seconds", {}).items():
            print(f"  {name}: {a['steps_seconds'][name]} -> {t} s "
                  f"(x{t / max(a['steps_seconds'][name], 1e-9):.1f})")


if __name__ == "__main__":
    main()
