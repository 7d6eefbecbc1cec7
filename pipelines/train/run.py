"""``neurorecon train`` and ``neurorecon run``: caches -> Lightning training -> evaluation.

``train(cfg)`` is the plain function tests call; the Hydra entry points are ``run`` functions
looked up by the CLI. The encoder, loss, optimizer, trainer, callbacks and loggers all come
from the config with ``hydra.utils.instantiate``; data-derived sizes (subjects, channels,
voxels, time samples, embedding dimension) come from the data module after ``setup()``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..common.checks import DataError
from ..common.logging import logger


def prepare_caches(cfg: DictConfig) -> tuple[Path, Path]:
    """Run (or reuse) the preprocess and embed stages; return both cache entry paths."""
    from ..embed.run import run as run_embed
    from ..preprocess.run import preprocess_data

    entry, reused = preprocess_data(cfg.data, cfg.preprocess, cache_dir=cfg.paths.cache_dir)
    logger.info("preprocess cache: %s%s", entry.path, " (reused)" if reused else "")
    summary = run_embed(cfg)
    return entry.path, Path(summary["cache"])


def encoder_kwargs(dm, *, focus: dict[str, Any] | None = None) -> dict[str, Any]:
    """Data-derived constructor arguments of the encoder for this data module.

    ``focus`` (MEG): the temporal focus from :func:`resolve_focus`.
    """
    tokens = {"n_tokens": dm.n_tokens} if dm.n_tokens else {}
    if dm.modality == "meg":
        n_times = {info.n_times for info in dm.subjects.values()}
        if len(n_times) != 1:
            raise DataError(f"subjects have different epoch lengths {sorted(n_times)}",
                            hint="preprocess all subjects with one recipe")
        extra = {"focus": list(focus["samples"])} if focus else {}
        return {"n_times": n_times.pop(), "sfreq": float(dm.recipe["params"]["sfreq"]),
                "n_subjects": len(dm.subjects), "n_outputs": dm.emb_dim, **tokens, **extra}
    return {"subjects": {lab: info.n_voxels for lab, info in dm.subjects.items()},
            "n_outputs": dm.emb_dim, **tokens}


def build_datamodule(cfg: DictConfig, preproc_dir: Path, embeddings_dir: Path, **overrides):
    from .datamodule import BrainDataModule

    kwargs = dict(OmegaConf.to_container(cfg.datamodule, resolve=True))
    kwargs.update(overrides)
    dm = BrainDataModule(preproc_dir=preproc_dir, embeddings_dir=embeddings_dir,
                         seed=int(cfg.seed), **kwargs)
    dm.setup()
    return dm


def resolve_focus(cfg: DictConfig, dm) -> dict[str, Any] | None:
    """The MEG encoder's temporal focus from ``cfg.focus.meg`` (None: the whole epoch).

    ``auto`` picks it on validation trials (:func:`.focus.choose_focus`); ``[tmin, tmax]``
    (s from image onset) sets it; ``null`` keeps the whole epoch.
    """
    spec = (cfg.get("focus") or {}).get(dm.modality) if dm.modality == "meg" else None
    if spec is None:
        return None
    if spec == "auto":
        from .focus import choose_focus

        return choose_focus(dm, alphas=cfg.evaluate.get("ridge_alphas"))
    params = dm.recipe["params"]
    sfreq, tmin = float(params["sfreq"]), float(params["tmin"])
    n_times = int(next(iter(dm.subjects.values())).n_times)
    lo, hi = (float(v) for v in spec)
    start, stop = max(0, int(round((lo - tmin) * sfreq))), min(n_times,
                                                                int(round((hi - tmin) * sfreq)))
    if stop - start < 2:
        raise DataError(f"focus.meg={[lo, hi]} leaves {max(stop - start, 0)} samples of the "
                        f"epoch [{tmin}, {tmin + n_times / sfreq:.3f}] s",
                        hint="give focus.meg=[tmin, tmax] inside the epoch, auto or null")
    return {"tmin": tmin + start / sfreq, "tmax": tmin + stop / sfreq, "samples": [start, stop],
            "reason": "configured"}


def fit_subspaces(net, dm, labels=None) -> None:
    """Fit the fMRI encoder's subspace adapters on each subject's *train* rows only."""
    import numpy as np

    if not hasattr(net, "fit_subspace"):
        return
    X, subj, _ = dm.split_arrays("train")
    for k, label in enumerate(dm.labels):
        if labels is not None and label not in labels:
            continue
        rows = [x for x, s in zip(X, subj, strict=True) if s == k]
        if rows:
            kept = net.fit_subspace(label, np.stack(rows))
            if kept is not None:
                logger.info("fMRI sub-%s: subspace adapter on %d principal axes of %d train "
                            "trials", label, kept, len(rows))


def build_module(cfg: DictConfig, dm, *, net=None, focus: dict[str, Any] | None = None):
    """Instantiate encoder (unless given), loss and optimizer into the LitModule.

    ``objective.<modality>`` may override the loss's ``lambda_clip`` and the optimizer's
    ``weight_decay`` for that modality (null: the groups' values).
    """
    from hydra.utils import instantiate

    from .module import ContrastiveLitModule

    if net is None:
        net = instantiate(cfg.encoder[dm.modality], **encoder_kwargs(dm, focus=focus))
        fit_subspaces(net, dm)
    objective = OmegaConf.to_container(cfg.objective[dm.modality], resolve=True)
    loss_kw = {k: v for k in ("lambda_clip",) if (v := objective.pop(k, None)) is not None}
    opt_kw = {k: v for k in ("weight_decay",) if (v := objective.pop(k, None)) is not None}
    lit = ContrastiveLitModule(
        net=net, loss=instantiate(cfg.loss, **loss_kw),
        optimizer=instantiate(cfg.optimizer, **opt_kw),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None, **objective)
    lit.candidates = dm.embeddings
    lit.description = {
        "model_type": type(net).__name__,
        "model_config": net.get_config() if hasattr(net, "get_config") else None,
        "data": dm.describe(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    return lit


def fit(cfg: DictConfig, lit, dm, *, out_dir: Path, quiet: bool = False):
    """Train with the configured Trainer; reload the best checkpoint (by validation).

    Checkpoints and logs go under ``out_dir`` (the run directory, or a sub-folder of it for
    the extra trainings of the adaptation curve).
    """
    import torch
    from hydra.utils import instantiate

    callbacks = []
    for c in (cfg.get("callbacks") or {}).values():
        extra = {"dirpath": str(out_dir / "checkpoints")} if "dirpath" in c else {}
        callbacks.append(instantiate(c, **extra))
    loggers = [instantiate(c, save_dir=str(out_dir)) for c in (cfg.get("logger") or {}).values()]
    extra = {"enable_progress_bar": False, "enable_model_summary": False} if quiet else {}
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                          default_root_dir=str(out_dir), **extra)
    t0 = time.perf_counter()
    trainer.fit(lit, datamodule=dm)
    seconds = time.perf_counter() - t0
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    best_epoch = None
    if best:
        ckpt = torch.load(best, map_location="cpu", weights_only=False)
        lit.load_state_dict(ckpt["state_dict"])
        best_epoch = int(ckpt["epoch"])
    return trainer, {"train_seconds": round(seconds, 2), "epochs": trainer.current_epoch,
                     "best_checkpoint": best or None, "best_epoch": best_epoch}


def refit(cfg: DictConfig, info: dict[str, Any], *, preproc_dir: Path,
          emb_dir: Path, out_dir: Path, focus: dict[str, Any] | None):
    """Retrain on train + validation trials for the epoch count validation selected.

    Validation (held-out train stimuli) picks the number of epochs; a fresh model then trains
    that long on *all* train trials, as the ridge baseline is fitted on all of them. The test
    set is never seen. Returns the new LitModule and data module.
    """
    from hydra.utils import instantiate
    from lightning import seed_everything

    best = info.get("best_checkpoint")
    if not best:
        return None
    epochs = info["best_epoch"] + 1
    seed_everything(int(cfg.seed), workers=True)
    dm = build_datamodule(cfg, preproc_dir, emb_dir, val_fraction=0.0)
    lit = build_module(cfg, dm, focus=focus)
    trainer = instantiate(cfg.trainer, max_epochs=epochs, min_epochs=epochs, callbacks=[],
                          logger=False, limit_val_batches=0, enable_checkpointing=False,
                          default_root_dir=str(out_dir))
    t0 = time.perf_counter()
    trainer.fit(lit, datamodule=dm)
    path = out_dir / "checkpoints" / "refit.ckpt"
    trainer.save_checkpoint(path)
    info.update(selected_checkpoint=best, best_checkpoint=str(path), refit_epochs=epochs,
                refit_seconds=round(time.perf_counter() - t0, 2))
    logger.info("refit on train + validation trials: %d epochs (chosen on validation) in "
                "%.1f s -> %s", epochs, info["refit_seconds"], path)
    return lit, dm


def train(cfg: DictConfig) -> dict[str, Any]:
    """Preprocess, embed, train and evaluate; return the metrics (also in metrics.json)."""
    from lightning import seed_everything

    from ..evaluate.report import evaluate
    from ..evaluate.summary import write_report

    out_dir = Path(cfg.paths.output_dir)
    preproc_dir, emb_dir = prepare_caches(cfg)
    # seeded after the caches: computing them (cold) or reading them (warm) must not change
    # the random state that training starts from
    seed_everything(int(cfg.seed), workers=True)
    dm = build_datamodule(cfg, preproc_dir, emb_dir)
    focus = resolve_focus(cfg, dm)
    lit = build_module(cfg, dm, focus=focus)
    trainer, info = fit(cfg, lit, dm, out_dir=out_dir)
    if focus is not None:
        info["focus"] = focus
    if trainer.global_rank != 0:
        return {}
    if (cfg.get("refit") or {}).get(dm.modality) and trainer.world_size > 1:
        logger.warning("refit on train + validation trials is skipped in multi-process "
                       "training (%d processes); the validation-selected model is used",
                       trainer.world_size)
    elif (cfg.get("refit") or {}).get(dm.modality):
        refitted = refit(cfg, info, preproc_dir=preproc_dir, emb_dir=emb_dir,
                         out_dir=out_dir, focus=focus)
        if refitted is not None:
            lit, dm = refitted
    metrics = evaluate(lit, dm, out_dir=out_dir,
                       stim_root=Path(cfg.data.root) / cfg.data.stim_dir,
                       ridge=bool(cfg.evaluate.ridge),
                       time_resolved=bool(cfg.evaluate.time_resolved),
                       ridge_alphas=cfg.evaluate.get("ridge_alphas"), focus=focus)
    metrics["training"] = info
    if cfg.get("reconstruct") and cfg.reconstruct.enabled:
        from ..reconstruct.run import reconstruct

        metrics["reconstruction"] = reconstruct(
            lit, dm, cfg=cfg, out_dir=out_dir, stim_root=Path(cfg.data.root) / cfg.data.stim_dir)
    if cfg.evaluate.get("adaptation") and dm.modality == "fmri":
        from .adaptation import adaptation_curve

        metrics["adaptation"] = adaptation_curve(cfg, preproc_dir=preproc_dir,
                                                 embeddings_dir=emb_dir, out_dir=out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    logger.info("report: %s", write_report(out_dir, metrics))
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
    from ..evaluate.summary import write_report

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
    seeds = cfg.get("seeds")
    if seeds:
        return train_seeds(cfg, list(seeds))
    return train(cfg)
