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


def encoder_kwargs(dm) -> dict[str, Any]:
    """Data-derived constructor arguments of the encoder for this data module."""
    tokens = {"n_tokens": dm.n_tokens} if dm.n_tokens else {}
    if dm.modality == "meg":
        n_times = {info.n_times for info in dm.subjects.values()}
        if len(n_times) != 1:
            raise DataError(f"subjects have different epoch lengths {sorted(n_times)}",
                            hint="preprocess all subjects with one recipe")
        return {"n_times": n_times.pop(), "sfreq": float(dm.recipe["params"]["sfreq"]),
                "n_subjects": len(dm.subjects), "n_outputs": dm.emb_dim, **tokens}
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


def build_module(cfg: DictConfig, dm, *, net=None):
    """Instantiate encoder (unless given), loss and optimizer into the LitModule."""
    from hydra.utils import instantiate

    from .module import ContrastiveLitModule

    if net is None:
        net = instantiate(cfg.encoder[dm.modality], **encoder_kwargs(dm))
    lit = ContrastiveLitModule(
        net=net, loss=instantiate(cfg.loss), optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None)
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
    if best:
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        lit.load_state_dict(state)
    return trainer, {"train_seconds": round(seconds, 2), "epochs": trainer.current_epoch,
                     "best_checkpoint": best or None}


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
    lit = build_module(cfg, dm)
    trainer, info = fit(cfg, lit, dm, out_dir=out_dir)
    if trainer.global_rank != 0:
        return {}
    metrics = evaluate(lit, dm, out_dir=out_dir,
                       stim_root=Path(cfg.data.root) / cfg.data.stim_dir,
                       ridge=bool(cfg.evaluate.ridge),
                       time_resolved=bool(cfg.evaluate.time_resolved),
                       ridge_alphas=cfg.evaluate.get("ridge_alphas"))
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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Stage entry point for ``neurorecon train`` and ``neurorecon run``."""
    return train(cfg)
