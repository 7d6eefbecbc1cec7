"""New-subject adaptation curve (MindBridge, MindEye2): a model pretrained on the other
subjects and adapted to a new one, against one trained from scratch on the same trials.

The shared model is trained on every subject but the last with the run's recipe (MEG temporal
focus and read-out included). For each fraction of the held-out subject's training trials and
each seed (the seed draws the subset, the validation split and the initialisation), three
decoders see the same trials and are scored on the subject's test set: *adapted* (the shared
model with the subject's own parts trained, the shared layers frozen: :mod:`..train.adaptation`,
exactly as ``neurorecon adapt``), *from scratch* (a fresh single-subject model with the run's
recipe: its own focus search and read-out) and *ridge* (the linear baseline).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, open_dict

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger
from neurorecon.models.retrieval import candidate_rows, chance_metrics, retrieval_metrics

from ..inference import predict_split
from ..train.adaptation import adapt_subjects
from ..train.fit import build_datamodule, build_module, fit, resolve_focus
from ..train.readout import attach_readout, choose_meg_readout
from ..train.ridge import flat_targets, ridge_predictions
from .figures import plot_adaptation_curve

FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)
MODELS = ("adapted (shared frozen)", "from scratch", "ridge")


def _score(pred: np.ndarray, dm) -> dict[str, float]:
    uniq, true_index = candidate_rows(dm.splits["test"].target)
    return retrieval_metrics(pred, flat_targets(dm)[uniq], true_index)


def _train(cfg: DictConfig, dm, *, out_dir: Path):
    """A decoder trained on ``dm`` alone with the run's recipe (focus, read-out)."""
    focus = resolve_focus(cfg, dm)
    lit = build_module(cfg, dm, focus=focus)
    fit(cfg, lit, dm, out_dir=out_dir, quiet=True)
    readout = choose_meg_readout(cfg, lit.net, dm, focus)
    if readout is not None:
        attach_readout(lit.net, dm, readout, alphas=cfg.evaluate.get("ridge_alphas"))
    return lit.net


def adaptation_curve(cfg: DictConfig, *, preproc_dir: Path, embeddings_dir: Path,
                     out_dir: Path) -> dict[str, Any]:
    """Adapted vs from-scratch vs ridge for the last subject, by fraction of its training
    trials (``evaluate.adaptation_fractions``) and seed (``evaluate.adaptation_seeds``, default
    the run's seed): means, sd over seeds, trial counts; ``adaptation.png``."""
    from lightning import seed_everything

    fractions = [float(f) for f in (cfg.evaluate.get("adaptation_fractions") or FRACTIONS)]
    seeds = [int(s) for s in (cfg.evaluate.get("adaptation_seeds") or [cfg.seed])]
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise DataError(f"evaluate.adaptation_fractions={fractions}: fractions in (0, 1]")
    # seeded here: what ran before (reconstruction, a cold generator cache) must not change it
    seed_everything(int(cfg.seed), workers=True, verbose=False)  # the seed is in the config
    out_dir = Path(out_dir) / "adaptation"
    labels = build_datamodule(cfg, preproc_dir, embeddings_dir).labels
    if len(labels) < 2:
        raise DataError("new-subject adaptation needs at least 2 subjects", path=preproc_dir)
    new, others = labels[-1], labels[:-1]
    logger.info("adaptation: shared model on sub-%s, new subject sub-%s; fractions %s, seeds "
                "%s", ", sub-".join(others), new, fractions, seeds)
    shared_dm = build_datamodule(cfg, preproc_dir, embeddings_dir, subjects=others)
    shared = _train(cfg, shared_dm, out_dir=out_dir / "shared")
    top5 = {m: np.zeros((len(seeds), len(fractions))) for m in MODELS}
    top1 = {m: np.zeros((len(seeds), len(fractions))) for m in MODELS}
    n_train = np.zeros(len(fractions), int)
    for si, seed in enumerate(seeds):
        job = cfg.copy()
        with open_dict(job):
            job.seed = seed
        for fi, frac in enumerate(fractions):
            seed_everything(seed, workers=True, verbose=False)
            dm = build_datamodule(job, preproc_dir, embeddings_dir, subjects=[new],
                                  train_fraction={new: frac})
            n_train[fi] = len(dm.splits["train"]) + len(dm.splits["val"])
            here = out_dir / f"seed-{seed}" / f"{frac:g}"
            net = copy.deepcopy(shared)
            index, _ = adapt_subjects(job, net, dm, out_dir=here / "adapted", quiet=True)
            preds = {MODELS[0]: predict_split(net, dm, "test", subject_index=index),
                     MODELS[1]: predict_split(_train(job, dm, out_dir=here / "scratch"), dm,
                                              "test"),
                     MODELS[2]: ridge_predictions(dm, alphas=cfg.evaluate.get("ridge_alphas"))}
            for name, pred in preds.items():
                m = _score(pred, dm)
                top5[name][si, fi], top1[name][si, fi] = m["top5"], m["top1"]
            logger.info("adaptation seed %d, %g%% (%d trials): top-5 adapted %.3f, scratch "
                        "%.3f, ridge %.3f", seed, 100 * frac, n_train[fi],
                        *(top5[name][si, fi] for name in MODELS))
    chance = chance_metrics(len(np.unique(dm.splits["test"].target)))
    mean = {m: top5[m].mean(0) for m in MODELS}
    plot_adaptation_curve(fractions, mean, chance["top5"], Path(out_dir).parent /
                          "adaptation.png",
                          spread={m: top5[m].std(0) for m in MODELS} if len(seeds) > 1 else None,
                          title=f"New subject sub-{new}: top-5 vs. fraction of its training "
                          f"trials (mean{' ± sd' if len(seeds) > 1 else ''} over "
                          f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''})",
                          note=shared_dm.embedder_spec.get("substitute_note"))

    def rounded(a: np.ndarray) -> list[float]:
        return [round(float(v), 4) for v in a]

    return {"new_subject": new, "shared_subjects": others, "fractions": fractions,
            "seeds": seeds, "n_train_trials": n_train.tolist(),
            "top5": {m: rounded(mean[m]) for m in MODELS},
            "top5_sd": {m: rounded(top5[m].std(0)) for m in MODELS},
            "top1": {m: rounded(top1[m].mean(0)) for m in MODELS},
            "chance": {"top1": chance["top1"], "top5": chance["top5"]}}
