"""Benchmark: the refitted model alone, the validation-selected model alone, and their average
(``ensemble.<modality>``), on the test trials of finished runs (a table).

Each ``RUN`` is a run directory, with ``seed-<n>/`` folders (``neurorecon run … seeds=[…]``,
``bench_decoding.py``'s ``runs/draw-K``) or of one seed. For each seed, the refitted model
and the one it was refitted from are taken from ``checkpoints/``: from the ensemble in
``refit.ckpt`` (``ensemble.<modality>=true``) or from ``refit.ckpt`` and the checkpoint
beside it (``ensemble.<modality>=false``, or runs made before it; the refit's MEG read-out,
fitted on train + validation trials, is put into the selected model too, as the ensemble
does), and scored as ``evaluate`` scores the encoder: top-5 among the test images, mean ± sd
over seeds.
Nothing is trained. A run whose raw data were deleted is read from the preprocessing cache
made from them.

Not a test (no assertions); run it::

    .venv/bin/python tests/benchmarks/bench_ensemble.py bench-full/runs/draw-{0..7}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

NAMES = ("refit", "selected", "ensemble")


def _preproc_dir(cfg) -> Path:
    from neurorecon.pipelines.preprocess.run import preprocess_data

    root = Path(cfg.data.root)
    if root.is_dir():
        return preprocess_data(cfg.data, cfg.preprocess, cache_dir=cfg.paths.cache_dir)[0].path
    made = [p.parent for p in Path(cfg.paths.cache_dir, "preproc").glob("*/manifest.json")
            if json.loads(p.read_text())["params"].get("root") == str(root.resolve())]
    if len(made) != 1:
        raise SystemExit(f"{root}: raw data gone and {len(made)} cache entries made from it")
    return made[0]


def _models(ckpt_dir: Path):
    """(refitted, selected) encoders of a run's checkpoints."""
    from neurorecon.models.ensemble import EncoderEnsemble
    from neurorecon.pipelines.train.checkpoint import load_checkpoint, selected_before_refit

    refit, _ = load_checkpoint(ckpt_dir / "refit.ckpt")
    if isinstance(refit, EncoderEnsemble):
        return refit.members[0], refit.members[1]
    selected, _ = load_checkpoint(selected_before_refit(ckpt_dir / "refit.ckpt"))
    if getattr(refit, "readout_bins", None):  # the refit's read-out, as the ensemble shares it
        bins = [list(b) for b in refit.readout_bins]
        selected.add_readout(bins=bins, n_chans=refit.readout_weight.shape[2] // len(bins))
        selected.load_state_dict({**selected.state_dict(),
                                  **{k: v for k, v in refit.state_dict().items()
                                     if k.startswith("readout_")}})
    return refit, selected


def score_seed(seed_dir: Path) -> dict[str, float]:
    """Top-5 among the test images of the refitted, selected and ensembled encoders."""
    from omegaconf import OmegaConf

    from neurorecon.models.ensemble import EncoderEnsemble
    from neurorecon.models.retrieval import candidate_rows, retrieval_metrics
    from neurorecon.pipelines.inference import predict_split
    from neurorecon.pipelines.train.fit import build_datamodule
    from neurorecon.pipelines.train.ridge import flat_targets

    cfg = OmegaConf.load(seed_dir / "config.yaml")
    emb_dir = Path(json.loads((seed_dir / "embed_summary.json").read_text())["cache"])
    dm = build_datamodule(cfg, _preproc_dir(cfg), emb_dir).with_validation_in_train()
    refit, selected = _models(seed_dir / "checkpoints")
    nets = dict(zip(NAMES, (refit, selected, EncoderEnsemble([refit, selected]).eval()),
                    strict=True))
    rows, true = candidate_rows(dm.splits["test"].target)
    candidates = flat_targets(dm)[rows]
    return {name: float(retrieval_metrics(predict_split(net, dm, "test"), candidates,
                                          true)["top5"]) for name, net in nets.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="run directories with seed-<n>/")
    args = ap.parse_args()
    print("| run | seeds | refit alone | selected alone | ensemble |")
    print("|---|---|---|---|---|")
    table = []
    for run in args.runs:
        seeds = (sorted(run.glob("seed-*/checkpoints/refit.ckpt"))
                 or sorted(run.glob("checkpoints/refit.ckpt")))  # a run of one seed
        per = [score_seed(p.parent.parent) for p in seeds]
        cells = []
        for name in NAMES:
            v = np.array([s[name] for s in per])
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}")
        table.append(per)
        print(f"| {run} | {len(per)} | " + " | ".join(cells) + " |", flush=True)
    for name in NAMES:
        means = [np.mean([s[name] for s in per]) for per in table if per]
        sds = [np.std([s[name] for s in per], ddof=1) for per in table if len(per) > 1]
        print(f"{name}: mean top-5 {np.mean(means):.3f}, largest seed sd "
              f"{max(sds, default=0):.3f}")


if __name__ == "__main__":
    main()
