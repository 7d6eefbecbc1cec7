"""New-subject adaptation curve (MindBridge, MindEye2): a model pretrained on the other
subjects and adapted to a new one, against one trained from scratch on the same trials.

The shared model is trained on every subject but the new one with the run's recipe (MEG
temporal focus and read-out included); the new one is the last subject, or each in turn
(leave-one-subject-out). For each fraction of its training trials and each seed (the seed draws
the subset, the validation split and the initialisation), decoders that see the same trials
are scored on its test set: the ways of :mod:`..train.adaptation` (exactly as ``neurorecon
adapt``): *shared frozen* (the subject's own parts trained), *fine-tuned copy* (every layer of
a copy trained on its trials), *from scratch* (a fresh single-subject model with the run's
recipe: its own focus search and read-out) and *three ways averaged* (their models
averaged, ``adapt.way=ensemble``); *best on validation*, the one of those that
``adapt.way=auto`` keeps (scored per trial on the subject's validation trials: the first of
the averaged, fine-tuned, frozen, scratch within one standard error of the best); and
*ridge* (the linear baseline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, open_dict

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger
from neurorecon.models.retrieval import candidate_rows, chance_metrics, retrieval_metrics

from ..inference import predict_split
from ..train.adaptation import ENSEMBLED, adapt_subjects, choose_way, ensemble_of, train_alone
from ..train.fit import build_datamodule
from ..train.region_prior import new_subject_prior
from ..train.ridge import flat_targets, ridge_predictions
from .figures import plot_adaptation_curve

FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)
MODELS = ("adapted (shared frozen)", "adapted (fine-tuned copy)", "from scratch",
          "adapted (three ways averaged)", "adapted (best on validation)", "ridge")
#: the adaptation way behind each trained row (:mod:`..train.adaptation`)
WAY_OF = dict(zip(MODELS[:4], (*ENSEMBLED, "ensemble"), strict=True))
BEST, RIDGE = MODELS[4:]


def _score(pred: np.ndarray, dm) -> dict[str, float]:
    uniq, true_index = candidate_rows(dm.splits["test"].target)
    return retrieval_metrics(pred, flat_targets(dm)[uniq], true_index)


def adaptation_curve(cfg: DictConfig, *, preproc_dir: Path, embeddings_dir: Path,
                     out_dir: Path) -> dict[str, Any]:
    """Adapted vs from-scratch vs ridge for new subjects (``evaluate.adaptation_new``:
    ``last``, or ``all`` for leave-one-subject-out, each subject in turn new to a model
    trained on the others), by fraction of their training trials
    (``evaluate.adaptation_fractions``) and seed (``evaluate.adaptation_seeds``, default the
    run's seed): means and sd over (new subject, seed) pairs, each pair's own
    (``per_run_top5``), trial counts, the shared models' top-5 on their own subjects' test
    rows (``shared_top5``: what a new subject starts from); ``adaptation.png``."""
    from lightning import seed_everything

    fractions = [float(f) for f in (cfg.evaluate.get("adaptation_fractions") or FRACTIONS)]
    seeds = [int(s) for s in (cfg.evaluate.get("adaptation_seeds") or [cfg.seed])]
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise DataError(f"evaluate.adaptation_fractions={fractions}: fractions in (0, 1]")
    which = str(cfg.evaluate.get("adaptation_new") or "last")  # checked: config_checks
    # seeded here: what ran before (reconstruction, a cold generator cache) must not change it
    seed_everything(int(cfg.seed), workers=True, verbose=False)  # the seed is in the config
    out_dir = Path(out_dir) / "adaptation"
    whole = build_datamodule(cfg, preproc_dir, embeddings_dir)
    labels = whole.labels
    if len(labels) < 2:
        raise DataError("new-subject adaptation needs at least 2 subjects", path=preproc_dir)
    new_subjects = labels if which == "all" else labels[-1:]
    logger.info("adaptation: new subject(s) sub-%s, each against a model trained on the "
                "others; fractions %s, seeds %s", ", sub-".join(new_subjects), fractions, seeds)
    runs = [(new, seed) for new in new_subjects for seed in seeds]
    top5 = {m: np.zeros((len(runs), len(fractions))) for m in MODELS}
    top1 = {m: np.zeros((len(runs), len(fractions))) for m in MODELS}
    n_train = np.zeros((len(runs), len(fractions)), int)
    chosen = np.empty((len(runs), len(fractions)), object)  # the way the validation kept
    ri, priors, shared_top5 = 0, {}, {}
    for new in new_subjects:
        seed_everything(int(cfg.seed), workers=True, verbose=False)
        shared_dm = build_datamodule(cfg, preproc_dir, embeddings_dir,
                                     subjects=[s for s in labels if s != new])
        shared, _ = train_alone(cfg, shared_dm, out_dir=out_dir / f"shared-{new}")
        trained = shared_dm.mean_trained_trials()
        # what the new subject starts from: the shared model on its own subjects' test rows
        shared_top5[new] = round(_score(predict_split(shared, shared_dm, "test"),
                                        shared_dm)["top5"], 4)
        prior = (new_subject_prior(cfg, dict.fromkeys(shared_dm.labels, shared),
                                   {s: shared_dm.data.subjects[s].mask_img
                                    for s in shared_dm.labels})
                 if shared_dm.modality == "fmri" else None)
        priors[new] = None if prior is None else prior.subjects
        for seed in seeds:
            job = cfg.copy()
            with open_dict(job):
                job.seed = seed
            for fi, frac in enumerate(fractions):
                seed_everything(seed, workers=True, verbose=False)
                dm = build_datamodule(job, preproc_dir, embeddings_dir, subjects=[new],
                                      train_fraction={new: frac})
                n_train[ri, fi] = len(dm.splits["train"]) + len(dm.splits["val"])
                here = out_dir / f"sub-{new}" / f"seed-{seed}" / f"{frac:g}"
                tried = {way: adapt_subjects(job, shared, dm, out_dir=here / way, quiet=True,
                                             way=way, prior=prior) for way in ENSEMBLED}
                tried["ensemble"] = ensemble_of(dm, tried, shared_trials=trained)
                by_way = {way: predict_split(model, dm, "test", subject_index=index)
                          for way, (model, index, _) in tried.items()}
                val = {way: info.get("val_rows") for way, (_, _, info) in tried.items()}
                chosen[ri, fi] = kept = choose_way(val)["value"]
                preds = {name: by_way[WAY_OF[name]] for name in MODELS if name in WAY_OF}
                preds[BEST] = by_way[kept]
                preds[RIDGE] = ridge_predictions(dm, alphas=cfg.evaluate.get("ridge_alphas"))
                for name, pred in preds.items():
                    m = _score(pred, dm)
                    top5[name][ri, fi], top1[name][ri, fi] = m["top5"], m["top1"]
                logger.info("adaptation sub-%s seed %d, %g%% (%d trials): top-5 %s; best on "
                            "validation: %s", new, seed, 100 * frac, n_train[ri, fi], ", ".join(
                                f"{WAY_OF.get(name, name)} {top5[name][ri, fi]:.3f}"
                                for name in MODELS), kept)
            ri += 1
    ways = [WAY_OF[m] for m in MODELS if m in WAY_OF]
    chance = chance_metrics(len(np.unique(dm.splits["test"].target)))
    mean = {m: top5[m].mean(0) for m in MODELS}
    pairs = f"{len(runs)} (subject, seed) pair{'s' if len(runs) > 1 else ''}"
    plot_adaptation_curve(fractions, mean, chance["top5"], Path(out_dir).parent /
                          "adaptation.png",
                          spread={m: top5[m].std(0) for m in MODELS} if len(runs) > 1 else None,
                          title=f"New subject{'s' if len(new_subjects) > 1 else ''} "
                          f"sub-{', sub-'.join(new_subjects)}: top-5 vs. fraction of the "
                          f"training trials (mean{' ± sd' if len(runs) > 1 else ''} over "
                          f"{pairs})", note=dm.embedder_spec.get("substitute_note"),
                          selections=[BEST])

    def rounded(a: np.ndarray) -> list[float]:
        return [round(float(v), 4) for v in a]

    return {"new_subject": new_subjects[-1], "new_subjects": new_subjects,
            "shared_subjects": [s for s in labels if s != new_subjects[-1]],
            "fractions": fractions, "seeds": seeds,
            "n_train_trials": np.round(n_train.mean(0)).astype(int).tolist(),
            "top5": {m: rounded(mean[m]) for m in MODELS},
            "top5_sd": {m: rounded(top5[m].std(0)) for m in MODELS},
            "top1": {m: rounded(top1[m].mean(0)) for m in MODELS},
            "per_subject_top5": {new: {m: rounded(top5[m][[i for i, r in enumerate(runs)
                                                           if r[0] == new]].mean(0))
                                       for m in MODELS} for new in new_subjects},
            "per_run_top5": {f"{new}/seed-{seed}": {m: rounded(top5[m][i]) for m in MODELS}
                             for i, (new, seed) in enumerate(runs)},
            "shared_top5": shared_top5,
            "best_on_validation": {f"{frac:g}": {way: int((chosen[:, fi] == way).sum())
                                                 for way in ways}
                                   for fi, frac in enumerate(fractions)},
            "region_prior": priors,
            "chance": {"top1": chance["top1"], "top5": chance["top5"]}}
