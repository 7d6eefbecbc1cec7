"""Benchmark: time and peak memory per stage as the dataset grows (prints a table).

For each scale N the sample dataset is generated at N x its size with runs of equal length
(one subject; N x the train images and test repeats, in N MEG runs or 2N fMRI runs), then
each stage runs as its own ``neurorecon`` process: ``sample``, ``preprocess`` (once per
``--jobs`` value, each into a fresh cache), ``embed`` and ``train`` (``--epochs`` epochs; the
training proper: no ridge baselines, refit, reconstruction or bundle). Printed per stage:
wall seconds, the kernel's peak RSS of the stage's main process, the sampled peak of its private
(anonymous) memory and the sampled peak RSS of its whole process tree (workers included).
Memory should be flat in N and time linear; ``preprocess`` with 2 jobs should be ~2x faster.

Not a test; run it on an otherwise idle machine::

    .venv/bin/python tests/benchmarks/bench_scale.py --scales 1 2 4 8 [--modality meg fmri]
        [--jobs 1 2] [--epochs 2] [--workdir /tmp/nr-scale] [--json out.json]

``--old-code DIR`` runs the stages from another checkout (a before/after comparison): DIR
holds ``neurorecon/{configs,pipelines,models,serve}`` links to that checkout's folders.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

#: one unit of scale: train images per concept, and test repeats (16 concepts, 1 test image)
TRAIN_PER_N, REPEATS_PER_N = 8, 2


def sample_overrides(modality: str, n: int) -> list[str]:
    """``neurorecon sample`` overrides for one subject of ``modality`` at scale ``n``."""
    other = "fmri" if modality == "meg" else "meg"
    runs = n if modality == "meg" else 2 * n
    return [f"sample.stimuli.n_train_exemplars={TRAIN_PER_N * n}",
            f"sample.stimuli.n_test_repeats={REPEATS_PER_N * n}",
            f"sample.{modality}.n_subjects=1", f"sample.{modality}.n_runs={runs}",
            f"sample.{other}.enabled=false"]


class Watch:
    """Sample the private memory and RSS of a process tree every ``every`` s (peaks kept)."""

    def __init__(self, pid: int, every: float = 0.05):
        self.root = psutil.Process(pid)
        self.every, self.peak_anon, self.peak_tree = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                tree = 0
                for p in procs:
                    try:
                        mem = p.memory_full_info()
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    tree += mem.rss
                    if p.pid == self.root.pid:  # private = RSS minus file-backed pages
                        self.peak_anon = max(self.peak_anon, mem.uss)
                self.peak_tree = max(self.peak_tree, tree)
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_stage(cmd: list[str], *, env: dict[str, str], log: Path) -> dict[str, float]:
    """Run one stage; return its seconds and memory peaks (MB). Raises on failure."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        watch = Watch(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        watch.stop()
    seconds = time.perf_counter() - t0
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"stage failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return {"s": round(seconds, 1), "rss_mb": round(usage.ru_maxrss / 1024),
            "private_mb": round(watch.peak_anon / 2**20), "tree_mb": round(watch.peak_tree / 2**20)}


def recording_seconds(root: Path) -> float:
    """Total duration of the recordings under a BIDS root (MEG sidecars, fMRI headers)."""
    total = sum(json.loads(p.read_text())["RecordingDuration"] for p in root.rglob("*_meg.json"))
    if not total:
        import nibabel as nib

        for p in root.rglob("*_bold.nii.gz"):
            tr = json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text())
            total += nib.load(p).shape[3] * tr["RepetitionTime"]
    return float(total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--modality", nargs="+", default=["meg"], choices=["meg", "fmri"])
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2],
                    help="preprocess.n_jobs values to time (each into a fresh cache)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/nr-scale"))
    ap.add_argument("--old-code", type=Path, default=None,
                    help="run another checkout (no preprocess.n_jobs there: --jobs 1)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    nr = [sys.executable, "-m", "neurorecon.serve.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if args.old_code:
        env["PYTHONPATH"] = str(args.old_code.resolve())
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    for modality in args.modality:
        for n in args.scales:
            data = work / f"{modality}-x{n}"
            common = [f"paths.root_dir={work}", f"hydra.run.dir={work}/logs/{modality}-x{n}"]
            row = {"modality": modality, "N": n}
            row["sample"] = run_stage(
                [*nr, "sample", *common, f"sample.out_dir={data}",
                 *sample_overrides(modality, n)], env=env, log=work / f"{modality}-x{n}-sample.log")
            data_args = [f"data=sample_{modality}", f"data.root={data}/{modality}"]
            for jobs in args.jobs:
                extra = [] if args.old_code else [f"preprocess.n_jobs={jobs}"]
                cache = work / f"cache-{modality}-x{n}-j{jobs}"
                row[f"preprocess_j{jobs}"] = run_stage(
                    [*nr, "preprocess", *common, *data_args, f"paths.cache_dir={cache}", *extra],
                    env=env, log=work / f"{modality}-x{n}-preprocess-j{jobs}.log")
            cache = f"paths.cache_dir={work}/cache-{modality}-x{n}-j{args.jobs[0]}"
            row["embed"] = run_stage([*nr, "embed", *common, *data_args, cache], env=env,
                                     log=work / f"{modality}-x{n}-embed.log")
            row["train"] = run_stage(
                [*nr, "train", *common, *data_args, cache, f"trainer.max_epochs={args.epochs}",
                 f"trainer.min_epochs={args.epochs}", f"refit.{modality}=false",
                 *(["focus.meg=null"] if modality == "meg" else []),
                 "evaluate.ridge=false", "evaluate.time_resolved=false",
                 "export.bundle=false", "reconstruct.enabled=false",
                 "callbacks.early_stopping.patience=100"],
                env=env, log=work / f"{modality}-x{n}-train.log")
            row["recording_s"] = round(recording_seconds(data / modality))
            shutil.rmtree(data)  # keep the disk use of large N bounded
            rows.append(row)
            print_rows(rows, args.jobs)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def print_rows(rows: list[dict], jobs: list[int]) -> None:
    stages = ["sample", *[f"preprocess_j{j}" for j in jobs], "embed", "train"]
    print("\n| modality | N | " + " | ".join(
        f"{s} s / RSS / private / tree MB" for s in stages) + " |")
    print("|---|---|" + "---|" * len(stages))
    for r in rows:
        cells = [f"{r[s]['s']} / {r[s]['rss_mb']} / {r[s]['private_mb']} / {r[s]['tree_mb']}"
                 for s in stages]
        print(f"| {r['modality']} | {r['N']} | " + " | ".join(cells) + " |")
    for r in rows:
        first = r[f"preprocess_j{jobs[0]}"]["s"]
        line = (f"{r['modality']} N={r['N']}: {r['recording_s']:.0f} s of recording; preprocess "
                + ", ".join(f"{j} job(s) {r['recording_s'] / r[f'preprocess_j{j}']['s']:.1f}x "
                            "real time" for j in jobs))
        if len(jobs) > 1:
            line += f"; speed-up {first / r[f'preprocess_j{jobs[-1]}']['s']:.2f}x"
        print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
