"""``neurorecon adapt bundle=<dir> data=bids data.root=<BIDS> [data.subjects=[...]]``: new
participants added to a trained decoder.

A lab's everyday case (MindEye2, MindBridge): a decoder trained on earlier participants and
one calibration session of a new one. The new subjects' recordings are preprocessed with the
bundle's own recipe (its training config, :attr:`Provenance.config`) and their stimuli
embedded with its embedder; their own parts are trained with the shared layers frozen
(:mod:`.train.adaptation`, which the run's adaptation curve uses too). The adapted bundle holds
the old subjects, unchanged, and the new ones, the old gallery and generator, and a low-level
ridge per new subject. It is scored on the new subjects' test trials through the
:class:`~.inference.Decoder`, as ``neurorecon evaluate`` does, with a ridge fitted on the same
trials beside.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from neurorecon.models.bundle import BundleConfig
from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger

from .inference import Decoder


def job_config(decoder: Decoder, cfg: DictConfig) -> DictConfig:
    """The bundle's training config with this command's ``data``, ``paths`` and ``seed``, and
    the ``adapt.max_epochs`` / ``adapt.lr`` / ``adapt.region_prior`` overrides of its trainer,
    optimizer and ``region_prior.fmri``."""
    trained = decoder.config.provenance.config
    if not trained:
        raise DataError("the bundle records no training config (provenance.config), so its "
                        "recipe cannot be applied to new data", path=decoder.root,
                        hint="re-export it with this version of neurorecon")
    from .export import localized

    job = OmegaConf.create(localized(trained, OmegaConf.to_container(cfg.paths, resolve=True)))
    with open_dict(job):
        job.data, job.paths, job.seed = cfg.data, cfg.paths, int(cfg.seed)
        if cfg.adapt.get("max_epochs") is not None:
            job.trainer.max_epochs = int(cfg.adapt.max_epochs)
        if cfg.adapt.get("lr") is not None:
            job.optimizer.lr = float(cfg.adapt.lr)
        if cfg.adapt.get("region_prior") is not None:
            job.region_prior = {**(job.get("region_prior") or {}),
                                "fmri": bool(cfg.adapt.region_prior)}
    return job


def check_fits(decoder: Decoder, dm, *, root: Path) -> None:
    """The new data module was prepared as the bundle's training data was, for new subjects."""
    if dm.modality != decoder.modality:
        raise DataError(f"data does not fit the decoder: modality {dm.modality!r}, the decoder "
                        f"is for {decoder.modality!r}", path=root)
    trained = decoder.config.preprocessing.get("params", {})
    differ = sorted(k for k in set(trained) | set(dm.recipe.get("params", {}))
                    if trained.get(k) != dm.recipe["params"].get(k))
    if differ:
        raise DataError(f"the new data was preprocessed with other parameters ({differ}) "
                        "than the bundle's recipe", path=root,
                        hint="leave preprocessing to adapt: it applies the bundle's own")
    weights = dm.embedder_spec.get("weights")
    if weights != decoder.config.embedder.weights:
        raise DataError(f"the stimuli were embedded with other weights ({weights}) than the "
                        f"decoder was trained on ({decoder.config.embedder.weights})", path=root)
    known = sorted(set(dm.labels) & set(decoder.subjects))
    if known:
        raise DataError(f"sub-{', sub-'.join(known)} already in the decoder (trained on "
                        f"sub-{', sub-'.join(decoder.subjects)}): adapt adds new participants",
                        path=root, hint="select the new subjects with data.subjects=[...], or "
                        "give a new participant a label of their own in the BIDS dataset")


#: the ways that give the new subjects a model of their own, described
OWN_MODEL = {"finetune": "every layer, in a model of their own (fine-tuned copy)",
             "scratch": "a model of their own, trained on their trials alone (from scratch)",
             "ensemble": "a model of their own: the frozen, fine-tuned and scratch ways' "
                         "models averaged"}


def adapt(cfg: DictConfig) -> dict[str, Any]:
    """Adapt ``cfg.bundle`` to the subjects of ``cfg.data``; write the adapted bundle and its
    scores on their test trials (metrics.json, report.md)."""
    from lightning import seed_everything

    from .evaluate.stage import evaluate_bundle
    from .evaluate.summary import write_report
    from .export import fmri_subject_files, lowlevel_maps, subject_entries
    from .reconstruct.generation import stimulus_images
    from .train.adaptation import WAYS, adapt_subjects, adaptation_way
    from .train.fit import build_datamodule, prepare_caches
    from .train.region_prior import new_subject_prior
    from .train.ridge import ridge_predictions

    if OmegaConf.is_missing(cfg, "bundle") or not cfg.bundle:
        raise DataError("needs bundle=<a trained bundle directory>")
    out_dir = Path(cfg.paths.output_dir)
    out = Path(cfg.adapt.out) if cfg.adapt.get("out") else out_dir / "bundle"
    if out.resolve() == Path(cfg.bundle).resolve() and not cfg.adapt.overwrite:
        raise DataError("adapt.out is the input bundle", path=out,
                        hint="write the adapted bundle elsewhere, or set adapt.overwrite=true")
    decoder = Decoder.from_pretrained(cfg.bundle)
    job = job_config(decoder, cfg)
    way = str(cfg.adapt.get("way") or adaptation_way(job, decoder.modality))
    if way not in WAYS:
        raise DataError(f"adapt.way={way!r}: one of {list(WAYS)}")
    root = Path(cfg.data.root)
    t0 = time.perf_counter()
    preproc_dir, emb_dir = prepare_caches(job)
    seed_everything(int(job.seed), workers=True, verbose=False)  # the seed is in the config
    dm = build_datamodule(job, preproc_dir, emb_dir)
    check_fits(decoder, dm, root=root)
    t_train = time.perf_counter()
    prior = (new_subject_prior(job, {s: decoder.subject_nets.get(s) or decoder.net
                                     for s in decoder.masks}, decoder.masks)
             if dm.modality == "fmri" else None)
    # what the bundle's own model was trained on, per subject (its weight in an ensemble)
    trained = [entry.n_trials for entry in decoder.config.subjects.values()
               if entry.model is None and entry.n_trials]
    model, index, info = adapt_subjects(job, decoder.net, dm, out_dir=out_dir, way=way,
                                        prior=prior,
                                        shared_trials=float(np.mean(trained)) if trained else None)
    logger.info("adapt: sub-%s added to the decoder of sub-%s (%s; indices %s)",
                ", sub-".join(dm.labels), ", sub-".join(decoder.subjects), way,
                list(index.values()))
    train_seconds = time.perf_counter() - t_train
    old = decoder.config.model_dump(by_alias=True)
    entries = subject_entries(dm, index=index)
    net, subject_nets = model, dict(decoder.subject_nets)
    kept = info["way"]  # adapt.way=auto: the way the validation trials chose
    if kept in OWN_MODEL:  # their own model beside the bundle's, which stays as it was
        net = decoder.net
        own = {"model_type": type(model).__name__, "model_config": model.get_config(),
               "weights": f"subjects/sub-{'-'.join(dm.labels)}.safetensors"}
        entries = {label: {**entry, "model": own} for label, entry in entries.items()}
        subject_nets.update(dict.fromkeys(dm.labels, model))
    record = {"subjects": list(dm.labels), "dataset": "/".join(root.parts[-2:]),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "way": kept,
              **({"chosen": way, "val_rank_score": info.get("tried"),
                  "way_choice": info.get("way_choice")} if way == "auto" else {}),
              "train_seconds": round(train_seconds, 2), "epochs": info.get("epochs"),
              "best_epoch": info.get("best_epoch"), "val_select": info.get("val_select"),
              "refit_epochs": info.get("refit_epochs"),
              "region_prior": info.get("region_prior"),
              **({"members": info["members"]} if "members" in info else {}),
              "readout_alpha": info.get("readout_alpha"),
              "readout_mix": info.get("readout_mix")}
    config = BundleConfig.model_validate({
        **old, "model_config": net.get_config(), "subjects": {**old["subjects"], **entries},
        "provenance": {**old["provenance"],
                       "adaptations": [*old["provenance"].get("adaptations", []), record]}})
    masks, stats = fmri_subject_files(dm)
    lowlevel = dict(decoder.lowlevel)
    if lowlevel:
        lowlevel.update(lowlevel_maps(dm, stimulus_images(dm, root / cfg.data.stim_dir)))
    adapted = Decoder(net=net, config=config, masks={**decoder.masks, **masks},
                      gallery=decoder.gallery, lowlevel=lowlevel,
                      generator_dir=decoder.generator_dir,
                      voxel_stats={**decoder.voxel_stats, **stats}, subject_nets=subject_nets)
    path = adapted.save_pretrained(out, overwrite=bool(cfg.adapt.overwrite))
    logger.info("adapt: %s trained in %.1f s; adapted bundle %s", ", ".join(
        "sub-" + s for s in dm.labels), train_seconds, path)
    # scored as `neurorecon evaluate` scores a bundle: the new subjects' recordings through it
    eval_cfg = OmegaConf.create({"data": OmegaConf.to_container(cfg.data, resolve=True),
                                 "paths": OmegaConf.to_container(cfg.paths, resolve=True),
                                 "embed": OmegaConf.to_container(job.embed, resolve=True),
                                 "device": "cpu"})
    eval_cfg.data.subjects = list(dm.labels)
    metrics = evaluate_bundle(eval_cfg, path)
    ridge = ridge_predictions(dm, alphas=job.evaluate.get("ridge_alphas"))
    metrics["adapt"] = {
        **record, "from_bundle": str(cfg.bundle), "bundle_subjects": list(decoder.subjects),
        "trainable": OWN_MODEL.get(kept) or ("subject layer, read-out (ridge) and deep share, "
                                             "the shared layers frozen" if dm.modality == "meg"
                                             else "input adapter, the shared layers frozen"),
        "seconds": round(time.perf_counter() - t0, 2),
        "ridge_same_trials": _ridge_scores(dm, ridge)}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(out_dir, metrics)
    return metrics


def _ridge_scores(dm, pred: np.ndarray) -> dict[str, float]:
    """Retrieval of a ridge fitted on the new subjects' train + val trials (their test rows
    among their test images), beside the adapted decoder's."""
    from neurorecon.models.retrieval import candidate_rows, retrieval_metrics

    from .train.ridge import flat_targets

    uniq, true_index = candidate_rows(dm.splits["test"].target)
    scores = retrieval_metrics(pred, flat_targets(dm)[uniq], true_index)
    return {k: round(float(scores[k]), 4) for k in ("top1", "top5")}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Stage entry point (Hydra root config ``adapt.yaml``)."""
    return adapt(cfg)
