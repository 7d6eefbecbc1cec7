"""``neurorecon train`` and ``neurorecon run``: every stage of one training run.

preprocess + embed (cached) -> training (:mod:`.train.fit`) -> evaluation against ridge and
chance (:mod:`.evaluate.report`) -> the trained decoder (:mod:`.export`) -> reconstruction
through it (:mod:`.evaluate.reconstruction`) -> its bundle. ``train(cfg)`` is the plain
function tests call; ``run(cfg)`` is the Hydra entry point the CLI looks up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger

from .config_checks import check_config
from .evaluate.adaptation import adaptation_curve
from .evaluate.reconstruction import reconstruct, run_captions, validation_choices
from .evaluate.report import evaluate
from .evaluate.stage import TestTrials
from .evaluate.summary import write_report
from .export import build_decoder, save_bundle
from .preprocess.run import artifact_projectors, hrf_delays, skipped_runs
from .reconstruct.generation import generator_rows, stimulus_images
from .train.fit import (
    build_datamodule,
    build_module,
    ensemble_selected,
    ensembling,
    fit,
    prepare_caches,
    refit,
    refitting,
    resolve_focus,
    update_checkpoint,
)
from .train.readout import ARRAYS, attach_readout, choose_meg_readout
from .train.ridge import flat_targets
from .train.time_resolved import deep_time_resolved


def train(cfg: DictConfig) -> dict[str, Any]:
    """Preprocess, embed, train and evaluate; return the metrics (also in metrics.json)."""
    from lightning import seed_everything

    out_dir = Path(cfg.paths.output_dir)
    preproc_dir, emb_dir = prepare_caches(cfg)
    # seeded after the caches: computing them (cold) or reading them (warm) must not change
    # the random state that training starts from
    seed_everything(int(cfg.seed), workers=True, verbose=False)  # the seed is in the config
    dm = build_datamodule(cfg, preproc_dir, emb_dir)
    focus = resolve_focus(cfg, dm)
    lit = build_module(cfg, dm, focus=focus)
    trainer, info = fit(cfg, lit, dm, out_dir=out_dir)
    if focus is not None:
        info["focus"] = focus
    if trainer.global_rank != 0:
        return {}
    readout = choose_meg_readout(cfg, lit.net, dm, focus)
    deep_curve = None
    if cfg.evaluate.get("time_resolved_deep") and dm.modality == "meg":
        deep_curve = deep_time_resolved(cfg, dm, out_dir=out_dir,
                                        step=float(cfg.evaluate.get("time_resolved_deep_step",
                                                                    0.1)))
    reconstructing = bool(cfg.get("reconstruct") and cfg.reconstruct.enabled)
    stim_root = Path(cfg.data.root) / cfg.data.stim_dir
    # chosen before the refit: the validation-selected model has not seen the validation trials
    images = stimulus_images(dm, stim_root) if reconstructing else None
    choices = (validation_choices(cfg, lit.net, dm, stim_images=images) if reconstructing
               else None)
    generator_fit = generator_rows(dm)  # the train images (the refit's data module has no val)
    if refitting(cfg, dm.modality) and trainer.world_size > 1:
        logger.warning("refit on train + validation trials is skipped in multi-process "
                       "training (%d processes); the validation-selected model is used",
                       trainer.world_size)
    elif refitting(cfg, dm.modality):
        selected = lit.net
        refitted = refit(cfg, info, dm, out_dir=out_dir, focus=focus)
        if refitted is not None:
            lit, dm = refitted
            if ensembling(cfg, dm.modality):
                ensemble_selected(lit, selected, info)
    if readout is not None:
        attach_readout(lit.net, dm, readout, alphas=cfg.evaluate.get("ridge_alphas"))
        info["readout"] = {k: v for k, v in readout.items() if k not in ARRAYS}
    if readout is not None or "ensemble" in info:  # what the checkpoint's model now holds
        update_checkpoint(lit, info)
    metrics = evaluate(lit.net, dm, out_dir=out_dir,
                       stim_root=stim_root,
                       ridge=bool(cfg.evaluate.ridge),
                       time_resolved=bool(cfg.evaluate.time_resolved),
                       ridge_alphas=cfg.evaluate.get("ridge_alphas"), focus=focus,
                       deep_curve=deep_curve)
    metrics["training"] = info
    metrics["data"] = {"skipped_runs": skipped_runs(cfg.data),
                       "artifacts": artifact_projectors(dm.recipe),
                       **({"hrf_delay": hrf_delays(dm.recipe)} if dm.modality == "fmri" else {})}
    exporting = (cfg.get("export") or {}).get("bundle", True)
    chosen = {"rerank": choices["lowlevel_rerank"]["value"],
              "strength": choices["strength"]["value"]} if choices else {}
    decoder = (build_decoder(lit.net, dm, cfg=cfg, metrics=metrics, focus=focus, images=images,
                             generator_fit=generator_fit, **chosen)
               if reconstructing or exporting else None)
    if reconstructing:  # through the decoder the bundle holds
        metrics["reconstruction"] = reconstruct(
            decoder, TestTrials.of_datamodule(dm), cfg=cfg, out_dir=out_dir, stim_root=stim_root,
            true_embeddings=flat_targets(dm)[dm.splits["test"].target], choices=choices,
            captions=run_captions(cfg, dm, decoder))
    if cfg.evaluate.get("adaptation") and len(dm.labels) < 2:
        logger.warning("evaluate.adaptation: skipped, the dataset has one subject (a new "
                       "subject is adapted from a model trained on the others)")
    elif cfg.evaluate.get("adaptation"):
        metrics["adaptation"] = adaptation_curve(cfg, preproc_dir=preproc_dir,
                                                 embeddings_dir=emb_dir, out_dir=out_dir)
    if exporting:
        # the run's own bundle: a rerun into the same directory replaces it, like metrics.json
        bundle = save_bundle(decoder, out_dir / "bundle", overwrite=True)
        metrics["bundle"] = {"path": "bundle", "bytes": bundle["bytes"]}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    report = write_report(out_dir, metrics)
    figures = ", ".join(sorted(p.name for p in out_dir.glob("*.png")))
    logger.info("done: %s (figures %s%s)", report, figures,
                "; decoder bundle/" if (out_dir / "bundle").is_dir() else "")
    return metrics


def over_seeds(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean ± sd over seeds of every retrieval score (encoder, ridge; both candidate sets)."""
    import numpy as np

    out: dict[str, Any] = {}
    first = next(iter(runs.values()))
    for block in ("retrieval", "retrieval_all_images"):
        out[block] = {}
        for decoder in first[block]:
            if decoder == "chance":
                continue
            out[block][decoder] = {}
            for key in ("top1", "top5", "median_rank", "rel_median_rank"):
                values = [float(m[block][decoder][key]) for m in runs.values()]
                out[block][decoder][key] = {"mean": float(np.mean(values)),
                                            "sd": float(np.std(values, ddof=1)),
                                            "values": values}
    peaks = [m["time_resolved"]["peak"]["top5"] for m in runs.values()
             if (m.get("time_resolved") or {}).get("peak")]
    if peaks:
        out["time_resolved_peak_top5"] = {"mean": float(np.mean(peaks)),
                                          "sd": float(np.std(peaks, ddof=1)), "values": peaks}
    seconds = [m["training"]["train_seconds"] for m in runs.values()]
    out["train_seconds"] = {"mean": float(np.mean(seconds)), "values": seconds}
    return out


def train_seeds(cfg: DictConfig, seeds: list[int]) -> dict[str, Any]:
    """Train once per seed (each in ``<run dir>/seed-<n>/``) and report the spread.

    The run directory's ``metrics.json`` is the first seed's (figures, reconstruction) with
    every retrieval score replaced by its mean over seeds, and ``over_seeds`` holding mean,
    sd and the per-seed values.
    """
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise DataError(f"seeds={list(seeds)}: give two or more distinct seeds",
                        hint="e.g. seeds=[0,1,2]; a single run takes seed=<n>")
    out_dir = Path(cfg.paths.output_dir)
    runs = {}
    for seed in seeds:
        job = OmegaConf.merge(cfg, {"seed": int(seed), "seeds": None,
                                    "paths": {"output_dir": str(out_dir / f"seed-{seed}")}})
        logger.info("seed %d of %s", seed, list(seeds))
        runs[int(seed)] = train(job)
    if not all(runs.values()):  # not rank zero
        return {}
    metrics = dict(runs[int(seeds[0])])
    spread = over_seeds(runs)
    for block in ("retrieval", "retrieval_all_images"):
        metrics[block] = {
            dec: {k: spread[block][dec][k]["mean"] if k in spread[block].get(dec, {}) else v
                  for k, v in m.items()} for dec, m in metrics[block].items()}
    metrics["seeds"] = [int(s) for s in seeds]
    metrics["over_seeds"] = spread
    metrics["per_seed_dirs"] = {str(s): f"seed-{s}" for s in seeds}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    logger.info("over %d seeds: encoder top-5 %.3f ± %.3f, ridge %.3f ± %.3f", len(seeds),
                spread["retrieval"]["encoder"]["top5"]["mean"],
                spread["retrieval"]["encoder"]["top5"]["sd"],
                spread["retrieval"].get("ridge", {}).get("top5", {}).get("mean", float("nan")),
                spread["retrieval"].get("ridge", {}).get("top5", {}).get("sd", float("nan")))
    logger.info("report: %s", write_report(out_dir, metrics))
    return metrics


def run(cfg: DictConfig) -> dict[str, Any]:
    """Stage entry point for ``neurorecon train`` and ``neurorecon run``."""
    check_config(cfg)
    seeds = cfg.get("seeds")
    if seeds:
        return train_seeds(cfg, list(seeds))
    return train(cfg)
