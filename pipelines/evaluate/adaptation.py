"""New-subject adaptation (MindBridge-style): a shared fMRI model, a new subject's adapter only.

The shared model is trained on every subject but one. For each fraction of the held-out
subject's training trials, two models are trained and scored by retrieval on that subject's
test set: (a) *adapter*: the shared model with a new input adapter for the subject, everything
else frozen; (b) *scratch*: a fresh single-subject model of the same architecture.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger
from neurorecon.models.retrieval import candidate_rows, chance_metrics, retrieval_metrics

from ..inference import predict_split
from ..train.fit import build_datamodule, build_module, fit, fit_subspaces
from ..train.ridge import flat_targets
from .figures import plot_adaptation_curve

FRACTIONS = (0.1, 0.25, 1.0)


def _score(lit, dm) -> dict[str, Any]:
    uniq, true_index = candidate_rows(dm.splits["test"].target)
    return retrieval_metrics(predict_split(lit.net, dm, "test"), flat_targets(dm)[uniq], true_index)


def adaptation_curve(cfg: DictConfig, *, preproc_dir: Path, embeddings_dir: Path,
                     out_dir: Path, fractions=FRACTIONS) -> dict[str, Any]:
    """Train and score adapter-only vs from-scratch models for the last subject."""
    from lightning import seed_everything

    # seeded here: what ran before (reconstruction, a cold generator cache) must not change it
    seed_everything(int(cfg.seed), workers=True, verbose=False)  # the seed is in the config
    out_dir = Path(out_dir) / "adaptation"
    full = build_datamodule(cfg, preproc_dir, embeddings_dir)
    labels = full.labels
    if len(labels) < 2:
        raise DataError("new-subject adaptation needs at least 2 subjects", path=preproc_dir)
    new, others = labels[-1], labels[:-1]
    logger.info("adaptation: shared model on sub-%s, new subject sub-%s", others, new)
    shared_dm = build_datamodule(cfg, preproc_dir, embeddings_dir, subjects=others)
    shared = build_module(cfg, shared_dm)
    fit(cfg, shared, shared_dm, out_dir=out_dir / "shared", quiet=True)
    n_voxels = full.subjects[new].n_voxels
    curves: dict[str, list[float]] = {"adapter (shared frozen)": [], "from scratch": []}
    top1: dict[str, list[float]] = {k: [] for k in curves}
    for frac in fractions:
        dm = build_datamodule(cfg, preproc_dir, embeddings_dir, subjects=[*others, new],
                              fit_subjects=[new], train_fraction={new: frac})
        net = copy.deepcopy(shared.net)
        net.add_subject(new, n_voxels)
        fit_subspaces(net, dm, labels=[new])
        net.freeze_shared(new)
        adapted = build_module(cfg, dm, net=net)
        fit(cfg, adapted, dm, out_dir=out_dir / f"adapter-{frac:g}", quiet=True)
        scratch_dm = build_datamodule(cfg, preproc_dir, embeddings_dir, subjects=[new],
                                      train_fraction={new: frac})
        scratch = build_module(cfg, scratch_dm)
        fit(cfg, scratch, scratch_dm, out_dir=out_dir / f"scratch-{frac:g}", quiet=True)
        for name, (lit, d) in {"adapter (shared frozen)": (adapted, dm),
                               "from scratch": (scratch, scratch_dm)}.items():
            m = _score(lit, d)
            curves[name].append(m["top5"])
            top1[name].append(m["top1"])
        logger.info("adaptation %g%%: adapter top5 %.3f, scratch top5 %.3f", 100 * frac,
                    curves["adapter (shared frozen)"][-1], curves["from scratch"][-1])
    n_cand = len(np.unique(scratch_dm.splits["test"].target))
    chance = chance_metrics(n_cand)
    plot_adaptation_curve(list(fractions), curves, chance["top5"],
                          Path(out_dir).parent / "adaptation.png",
                          title=f"New subject sub-{new}: retrieval vs. fraction of its training "
                          "trials", note=full.embedder_spec.get("substitute_note"))
    return {"new_subject": new, "shared_subjects": others, "fractions": list(fractions),
            "top5": curves, "top1": top1, "chance": {"top1": chance["top1"],
                                                      "top5": chance["top5"]}}
