"""Training of one encoder: caches -> data module -> encoder -> Lightning fit (-> refit).

The orchestration of a whole run (evaluation, reconstruction, bundle) is
:mod:`neurorecon.pipelines.run`. The encoder, loss, optimizer, trainer, callbacks and
loggers all come from the config with ``hydra.utils.instantiate``; data-derived sizes
(subjects, channels, voxels, time samples, embedding dimension) come from the data module
after ``setup()``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import interactive, logger


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


def fit_subspaces(net, dm, labels=None, *, prior=None, weigh: bool = True) -> None:
    """Fit the fMRI encoder's subspace adapters on each subject's *train* rows only, each
    subject's voxels weighted (``weigh``) by their relevance measured on those rows and, for
    new subjects of a trained model, by the region ``prior``
    (:func:`~.region_prior.voxel_scale`). The relevance is kept with the adapter: a later
    new subject's region prior."""
    from .region_prior import voxel_relevance, voxel_scale
    from .ridge import flat_targets

    if not hasattr(net, "fit_subspace"):
        return
    split, targets = dm.splits["train"], flat_targets(dm)
    for k, label in enumerate(dm.labels):
        if labels is not None and label not in labels or not net.has_subspace(label):
            continue
        rows = dm.subject_row_blocks("train", k)  # streamed from the cache, read per pass
        if not len(rows):
            continue
        relevance = voxel_relevance(rows, targets[split.target[split.subject == k]])
        scale = (voxel_scale(relevance, dm.data.subjects[label].mask_img, prior=prior,
                             n_trials=len(rows)) if weigh else None)
        kept = net.fit_subspace(label, rows, scale=scale)
        net.set_voxel_relevance(label, relevance)
        by = "" if prior is None else " and the region prior of sub-" + ", sub-".join(
            prior.subjects)
        logger.info("fMRI sub-%s: subspace adapter on %d principal axes of %d train trials%s",
                    label, kept, len(rows), "" if scale is None else
                    f", voxels weighted by their relevance{by} ({(scale > 0).mean():.0%} of "
                    "them above 0)")


def build_module(cfg: DictConfig, dm, *, net=None, focus: dict[str, Any] | None = None):
    """Instantiate encoder (unless given), loss and optimizer into the LitModule.

    ``objective.<modality>`` may override the loss's ``lambda_clip`` and the optimizer's
    ``weight_decay`` for that modality (null: the groups' values).
    """
    from hydra.utils import instantiate

    from .module import ContrastiveLitModule
    from .region_prior import voxel_weighting

    if net is None:
        net = instantiate(cfg.encoder[dm.modality], **encoder_kwargs(dm, focus=focus))
        fit_subspaces(net, dm, weigh=voxel_weighting(cfg))
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
        if c is None:  # a callback switched off (e.g. callbacks.weight_averaging=null)
            continue
        extra = {"dirpath": str(out_dir / "checkpoints")} if "dirpath" in c else {}
        callbacks.append(instantiate(c, **extra))
    loggers = [instantiate(c, save_dir=str(out_dir)) for c in (cfg.get("logger") or {}).values()]
    extra = {"enable_progress_bar": False, "enable_model_summary": False} if quiet else {}
    if not interactive():  # a log file gets the epoch summaries, not carriage-return bars
        extra["enable_progress_bar"] = False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                          default_root_dir=str(out_dir), **extra)
    # an epoch shorter than the logging interval would log no training step (Lightning warns):
    # log at least once an epoch, each process stepping through its share of the batches
    per_process = -(-len(dm.train_dataloader()) // max(trainer.world_size, 1))
    if 0 < per_process < trainer.log_every_n_steps:
        trainer.log_every_n_steps = per_process
    t0 = time.perf_counter()
    trainer.fit(lit, datamodule=dm)
    seconds = time.perf_counter() - t0
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    best_epoch = None
    if best:
        ckpt = torch.load(best, map_location="cpu", weights_only=False)
        lit.load_state_dict(ckpt["state_dict"])
        best_epoch = int(ckpt["epoch"])
    if not quiet:  # the device here, not Lightning's "GPU available" lines
        logger.info("train: %d epochs in %.1f s on %s; best epoch %s on validation",
                    trainer.current_epoch, seconds, _device(trainer), best_epoch)
    return trainer, {"train_seconds": round(seconds, 2), "epochs": trainer.current_epoch,
                     "best_checkpoint": best or None, "best_epoch": best_epoch,
                     "val_select": [round(v, 4) for v in lit.select_history]}


#: epochs averaged (centred) when the refit's epoch count is read off the validation curve
SMOOTH_EPOCHS = 5


def refit_epochs(info: dict[str, Any]) -> int:
    """Epochs for the refit: the peak of the validation curve averaged over ``SMOOTH_EPOCHS``
    neighbouring epochs (a single epoch's peak on a few hundred validation trials is often
    noise: one seed stopped at 7 epochs where the others' plateau ran past 15), else the best
    checkpoint's epoch."""
    history = np.asarray(info.get("val_select") or [], float)
    if len(history) < SMOOTH_EPOCHS:
        return info["best_epoch"] + 1
    half = SMOOTH_EPOCHS // 2
    smooth = [history[max(0, i - half): i + half + 1].mean() for i in range(len(history))]
    return int(np.argmax(smooth)) + 1


def _device(trainer) -> str:
    """Where ``trainer`` ran, e.g. ``cpu``, ``cuda`` or ``2 x cuda`` (processes)."""
    kind = trainer.strategy.root_device.type
    return f"{trainer.world_size} x {kind}" if trainer.world_size > 1 else kind


def refitting(cfg: DictConfig, modality: str) -> bool:
    """``refit.<modality>``: retrain on train + validation trials once validation chose the
    epoch count (the run's model, the adaptation ways, the curve's shared model)."""
    return bool((cfg.get("refit") or {}).get(modality))


def train_epochs(cfg: DictConfig, lit, dm, epochs: int, *, out_dir: Path):
    """Train ``lit`` on ``dm``'s train trials for exactly ``epochs`` epochs, without
    validation, with the training's weight averaging (as in the run that chose the epoch
    count); return the seconds taken and the trainer."""
    from hydra.utils import instantiate

    averaging = (cfg.get("callbacks") or {}).get("weight_averaging")
    trainer = instantiate(cfg.trainer, max_epochs=epochs, min_epochs=epochs,
                          callbacks=[instantiate(averaging)] if averaging else [],
                          logger=False, limit_val_batches=0, enable_checkpointing=False,
                          default_root_dir=str(out_dir), enable_model_summary=False,
                          **({} if interactive() else {"enable_progress_bar": False}))
    t0 = time.perf_counter()
    trainer.fit(lit, datamodule=dm)
    return time.perf_counter() - t0, trainer


def refit(cfg: DictConfig, info: dict[str, Any], dm, *, out_dir: Path,
          focus: dict[str, Any] | None):
    """Retrain on train + validation trials for the epoch count validation selected.

    Validation (held-out train stimuli) picks the number of epochs; a fresh model then trains
    that long on *all* of ``dm``'s train trials (:meth:`.BrainDataModule.with_validation_in_train`),
    as the ridge baseline is fitted on all of them. The test set is never seen. Returns the
    new LitModule and data module (None without a selected checkpoint).
    """
    from lightning import seed_everything

    best = info.get("best_checkpoint")
    if not best:
        return None
    epochs = refit_epochs(info)
    seed_everything(int(cfg.seed), workers=True, verbose=False)  # the seed is in the config
    dm = dm.with_validation_in_train()
    lit = build_module(cfg, dm, focus=focus)
    seconds, trainer = train_epochs(cfg, lit, dm, epochs, out_dir=out_dir)
    path = (out_dir / "checkpoints" / "refit.ckpt").resolve()  # as Lightning records the best
    trainer.save_checkpoint(path, weights_only=False)  # a full checkpoint, like the best one
    info.update(selected_checkpoint=best, best_checkpoint=str(path), refit_epochs=epochs,
                refit_seconds=round(seconds, 2))
    logger.info("refit on train + validation trials: %d epochs (the peak of the validation "
                "curve averaged over %d epochs) in %.1f s -> %s", epochs, SMOOTH_EPOCHS,
                info["refit_seconds"], path)
    return lit, dm


def ensembling(cfg: DictConfig, modality: str) -> bool:
    """``ensemble.<modality>``: after a refit, the encoder is the average of the refitted
    model and the validation-selected one it was refitted from (:func:`ensemble_selected`)."""
    return bool((cfg.get("ensemble") or {}).get(modality))


def ensemble_selected(lit, selected, info: dict[str, Any]) -> None:
    """Make ``lit``'s encoder (a refit, :func:`refit`) the average of itself and ``selected``,
    the validation-selected model of ``info["selected_checkpoint"]``
    (:class:`~neurorecon.models.ensemble.EncoderEnsemble`): no training, and the spread
    over seeds of one refitted model falls (measured over draws of the randomized family;
    README). Recorded in ``info["ensemble"]``."""
    from neurorecon.models.ensemble import EncoderEnsemble

    lit.net = EncoderEnsemble([lit.net, selected])
    info["ensemble"] = {"members": [info["best_checkpoint"], info["selected_checkpoint"]]}
    logger.info("encoder: the refitted model averaged with the validation-selected one (%s)",
                info["selected_checkpoint"])


def update_checkpoint(lit, info: dict[str, Any]) -> None:
    """Rewrite the selected checkpoint (``info["best_checkpoint"]``) with ``lit``'s current
    weights and encoder config: what was fitted after training (the MEG read-out) is then part
    of it, as of the bundle. Written to a temporary file, then renamed."""
    import torch

    path = info.get("best_checkpoint")
    if not path:
        return
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt["state_dict"] = lit.state_dict()
    lit.description["model_type"] = type(lit.net).__name__
    lit.description["model_config"] = lit.net.get_config()
    ckpt["neurorecon"] = lit.description
    tmp = Path(f"{path}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
