"""Benchmark: MEG or fMRI decoding with the defaults on draws of the randomized family (a table).

For each draw ``K`` of ``neurorecon sample sample=random sample.seed=K`` (sensor system, rate,
latencies, SNR, subjects, trials... drawn from wide ranges), ``neurorecon train`` runs with
the defaults over ``--seeds`` training seeds; one row per draw gives the deep encoder's top-5
among the test images (mean ± sd over seeds), the full-window ridge and the best sliding
250 ms-window ridge of the same run (its time-resolved curve pooled over subjects, the window
picked on the test set: an optimistic baseline), then the count of draws where the encoder
reaches the best window. The encoder's two parts are reported alone too: the deep network
(what the encoder was before the linear read-out) and the read-out, with the deep share of
the mix chosen on validation per seed. A default is judged on this table, never on one draw.

``--modality fmri`` draws the family's fMRI instead (``sample.fmri.enabled=true``: voxel size,
TR, timing, SNR, HRF delay, noise drawn per draw; no time course, so no window column), and
``--reconstruct`` runs the reconstruction stage too (per seed) and adds its two-way
identification (AlexNet-2 / AlexNet-5 / Inception) of the brain reconstructions, the retrieval
floor and the generator's ceiling, with the img2img strength chosen on validation.

Not a test (no assertions); run it::

    .venv/bin/python tests/benchmarks/bench_decoding.py --draws 8 --seeds 3 \\
        [--first 0] [--max-subjects 2] [--max-train-trials 600] [--out bench-decoding] \\
        [--sample sample.random.concept_stages=[3,3]] [--modality fmri] [--reconstruct] \\
        [-- extra train overrides, e.g. focus.meg=null]

``--max-subjects`` / ``--max-train-trials`` narrow the family's ranges (for a quicker pass on
2 cores), ``--sample`` sets any other (repeatable); the table says so. Datasets and runs stay
under ``--out`` (reused when rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NR = [sys.executable, "-m", "neurorecon.pipelines.cli"]


def _run(args: list[str], log: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "a") as fid:
        proc = subprocess.run([*NR, *args], stdout=fid, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): neurorecon {' '.join(args)}; see {log}")


def ranges(args) -> list[str]:
    """Overrides that narrow the family's ranges (empty: the full family)."""
    out = []
    if args.max_subjects:
        out.append(f"sample.random.n_subjects=[1,{args.max_subjects}]")
    if args.max_train_trials:
        out.append(f"sample.random.train_trials=[200,{args.max_train_trials}]")
    return out + list(args.sample)


def draw(k: int, args, out: Path) -> tuple[Path, dict]:
    root = out / "data" / f"draw-{k}"
    fmri = (["sample.fmri.enabled=true", "sample.meg.enabled=false"]
            if args.modality == "fmri" else [])
    _run(["sample", "sample=random", f"sample.seed={k}", f"sample.out_dir={root}", *fmri,
          *ranges(args)], out / f"draw-{k}.log")
    return root / args.modality, json.loads((root / "sample_config.json").read_text())


def train(k: int, root: Path, params: dict, args, out: Path) -> dict:
    run_dir = out / "runs" / f"draw-{k}"
    metrics = run_dir / "metrics.json"
    if not metrics.is_file() or args.retrain:
        seeds = ",".join(str(s) for s in range(args.seeds))
        # test images shown once: nothing to average (the default refuses such a test split)
        single = ([f"preprocess.{args.modality}.average_test_repeats=false"]
                  if params["draw"]["stimuli"]["n_test_repeats"] == 1 else [])
        _run(["train", "data=bids", f"data.root={root}", f"data.modality={args.modality}",
              f"seeds=[{seeds}]", f"paths.output_dir={run_dir}",
              f"paths.cache_dir={out / 'cache'}",
              f"reconstruct.enabled={str(args.reconstruct).lower()}", "export.bundle=false",
              *single, *args.overrides], out / f"draw-{k}.log")
    return json.loads(metrics.read_text())


def row(k: int, params: dict, m: dict, run_dir: Path) -> dict:
    spread = m.get("over_seeds") or {}
    deep = spread.get("retrieval", {}).get("encoder", {}).get("top5")
    deep_vals = deep["values"] if deep else [m["retrieval"]["encoder"]["top5"]]
    peak = (m.get("time_resolved") or {}).get("peak", {})
    stim = params["draw"]["stimuli"]
    if "fmri" in params["draw"]:
        f = params["draw"]["fmri"]
        physics = {"system": "/".join(f"{v:g}" for v in f["voxel_sizes"]) + " mm",
                   "sfreq": f["tr"], "snr": f["snr"], "hrf_onset": f["hrf_onset"],
                   "subjects": f["n_subjects"]}
    else:
        meg = params["draw"]["meg"]
        physics = {"system": meg["system"], "sfreq": meg["sfreq"], "snr": meg["snr"],
                   "concept_peak": meg["concept_peak"], "stages": meg.get("concept_stages", 1),
                   "subjects": meg["n_subjects"]}
    seconds = (spread.get("train_seconds") or {}).get("values") or [
        m["training"]["train_seconds"]]
    parts = {name: (spread.get("retrieval", {}).get(name, {}).get("top5") or {}).get("mean",
                    m["retrieval"].get(name, {}).get("top5"))
             for name in ("deep", "linear_readout")}
    return {
        "deep_part": parts["deep"], "linear_readout": parts["linear_readout"],
        "mix": [((json.loads(p.read_text()).get("training") or {}).get("readout") or {}
                 ).get("mix") for p in sorted(run_dir.glob("seed-*/metrics.json"))],
        "draw": k, **physics,
        "train_trials": stim["n_concepts"] * stim["n_train_exemplars"],
        "test": f"{stim['n_concepts'] * stim['n_test_exemplars']}x{stim['n_test_repeats']}",
        "deep": float(np.mean(deep_vals)), "deep_sd": float(np.std(deep_vals, ddof=1))
        if len(deep_vals) > 1 else 0.0, "deep_values": deep_vals,
        "ridge": m["retrieval"]["ridge"]["top5"], "window": peak.get("top5"),
        "window_time": peak.get("time"), "chance": m["retrieval"]["chance"]["top5"],
        "train_s": float(np.mean(seconds)), "focus": (m.get("training") or {}).get("focus"),
        "reconstruction": reconstruction_rows(run_dir, seeds=len(deep_vals)),
        "hrf_chosen": [d["hrf_onset"] for d in ((m.get("data") or {}).get("hrf_delay")
                                                or {}).values()],
    }


RECON_SETS = {"brain": "brain", "floor": "floor_retrieved", "ceiling": "ceiling"}
RECON_METRICS = ("alexnet2", "alexnet5", "inception")


def reconstruction_rows(run_dir: Path, *, seeds: int) -> dict | None:
    """Mean over seeds of each image set's two-way identification, and the strengths chosen."""
    paths = (sorted(run_dir.glob("seed-*/reconstruction.json")) if seeds > 1
             else [run_dir / "reconstruction.json"])
    recs = [json.loads(p.read_text()) for p in paths if p.is_file()]
    if not recs:
        return None
    return {"n": len(recs), "strength": [r["strength"] for r in recs],
            **{name: [float(np.mean([r["metrics"][key][m] for r in recs]))
                      for m in RECON_METRICS] for name, key in RECON_SETS.items()}}


def _title(rows: list[dict], args) -> None:
    narrowed = ranges(args)
    print(f"\n{'fMRI' if args.modality == 'fmri' else 'MEG'} decoding on draws of sample=random "
          f"({len(rows)} draws, {args.seeds} seeds"
          + (f"; ranges narrowed: {' '.join(narrowed)}" if narrowed else "") + ")")
    if args.overrides:
        print("train overrides:", " ".join(args.overrides))


def print_fmri_table(rows: list[dict], args) -> None:
    _title(rows, args)
    recon = any(r["reconstruction"] for r in rows)
    print("| draw | voxels | TR (s) | HRF delay (s): drawn, chosen | subj | train/subj | test | "
          "snr | encoder top-5 (mean ± sd) | ridge | chance | train s/seed |"
          + (" strength | brain A2/A5/Inc | floor | ceiling |" if recon else ""))
    print("|" + "---|" * (16 if recon else 12))
    for r in rows:
        chosen = ", ".join(f"{v:+g}" for v in r.get("hrf_chosen") or []) or "—"
        line = (f"| {r['draw']} | {r['system']} | {r['sfreq']:g} | {r['hrf_onset']:+.1f}, "
                f"{chosen} | "
                f"{r['subjects']} | {r['train_trials']} | {r['test']} | {r['snr']:.2f} | "
                f"{r['deep']:.3f} ± {r['deep_sd']:.3f} | {r['ridge']:.3f} | "
                f"{r['chance']:.3f} | {r['train_s']:.0f} |")
        if recon:
            rec = r["reconstruction"] or {}
            three = lambda v: "—" if v is None else " / ".join(f"{x:.3f}" for x in v)  # noqa: E731
            line += (f" {', '.join(f'{v:g}' for v in rec.get('strength', []))} | "
                     + " | ".join(three(rec.get(k)) for k in RECON_SETS) + " |")
        print(line)
    print(f"\nmean top-5: encoder {np.mean([r['deep'] for r in rows]):.3f}, ridge "
          f"{np.mean([r['ridge'] for r in rows]):.3f}; encoder >= ridge on "
          f"{sum(r['deep'] >= r['ridge'] for r in rows)}/{len(rows)}; max seed sd "
          f"{max(r['deep_sd'] for r in rows):.3f}")
    scored = [r["reconstruction"] for r in rows if r["reconstruction"]]
    if scored:
        for other in ("floor", "ceiling"):
            wins = sum(all(b >= f for b, f in zip(rec["brain" if other == "floor" else other],
                                                  rec["floor"], strict=True))
                       for rec in scored)
            print(f"{'brain' if other == 'floor' else 'ceiling'} >= floor on AlexNet-2, "
                  f"AlexNet-5 and Inception: {wins}/{len(scored)} draws")


def print_table(rows: list[dict], args) -> None:
    _title(rows, args)
    print("| draw | system | Hz | subj | train/subj | test | snr | concept peak (stages) | encoder "
          "top-5 (mean ± sd) | deep part alone | read-out alone | full-window ridge | best "
          "250 ms window (s) | chance | encoder ≥ window | deep share | train s/seed |")
    print("|" + "---|" * 17)
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    wins = 0
    for r in rows:
        win = r["window"] is not None and r["deep"] >= r["window"]
        wins += win
        print(f"| {r['draw']} | {r['system']} | {r['sfreq']:g} | {r['subjects']} | "
              f"{r['train_trials']} | {r['test']} | {r['snr']:.2f} | {r['concept_peak']:.2f} "
              f"({r['stages']}) | "
              f"{r['deep']:.3f} ± {r['deep_sd']:.3f} | {fmt(r.get('deep_part'))} | "
              f"{fmt(r.get('linear_readout'))} | {r['ridge']:.3f} | "
              f"{r['window']:.3f} ({r['window_time']:.2f}) | {r['chance']:.3f} | "
              f"{'yes' if win else 'no'} | {', '.join(f'{v:g}' for v in r['mix'] if v is not None)}"
              f" | {r['train_s']:.0f} |")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("deep", "ridge", "window")}
    print(f"\nmean top-5: deep {mean['deep']:.3f}, full-window ridge {mean['ridge']:.3f}, "
          f"best window {mean['window']:.3f}; deep >= best window on {wins}/{len(rows)} draws; "
          f"deep >= full-window ridge on {sum(r['deep'] >= r['ridge'] for r in rows)}/"
          f"{len(rows)}; max seed sd {max(r['deep_sd'] for r in rows):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--first", type=int, default=0, help="first draw (seed of the family)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-subjects", type=int, default=None)
    parser.add_argument("--max-train-trials", type=int, default=None)
    parser.add_argument("--sample", action="append", default=[], metavar="KEY=VALUE",
                        help="another sample override (repeatable), e.g. "
                             "sample.random.concept_stages=[3,3]")
    parser.add_argument("--out", type=Path, default=Path("bench-decoding"))
    parser.add_argument("--modality", choices=("meg", "fmri"), default="meg")
    parser.add_argument("--reconstruct", action="store_true",
                        help="run the reconstruction stage too and add its scores")
    parser.add_argument("--retrain", action="store_true", help="retrain even if a run exists")
    parser.add_argument("--table-only", action="store_true",
                        help="print the table of the runs already under --out")
    parser.add_argument("overrides", nargs="*", help="extra overrides for neurorecon train")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.table_only:
        for k in range(args.first, args.first + args.draws):
            metrics = args.out / "runs" / f"draw-{k}" / "metrics.json"
            config = args.out / "data" / f"draw-{k}" / "sample_config.json"
            if metrics.is_file():
                rows.append(row(k, json.loads(config.read_text()),
                                json.loads(metrics.read_text()), metrics.parent))
        (print_fmri_table if args.modality == "fmri" else print_table)(rows, args)
        return
    for k in range(args.first, args.first + args.draws):
        t0 = time.perf_counter()
        root, params = draw(k, args, args.out)
        t1 = time.perf_counter()
        rows.append(row(k, params, train(k, root, params, args, args.out),
                        args.out / "runs" / f"draw-{k}"))
        window = rows[-1]["window"]
        print(f"draw {k}: data {t1 - t0:.0f} s, train + evaluate {time.perf_counter() - t1:.0f} s;"
              f" deep {rows[-1]['deep']:.3f} ridge {rows[-1]['ridge']:.3f}"
              + ("" if window is None else f" window {window:.3f}"), flush=True)
        (args.out / "rows.json").write_text(json.dumps(rows, indent=2))
    (print_fmri_table if args.modality == "fmri" else print_table)(rows, args)


if __name__ == "__main__":
    main()
