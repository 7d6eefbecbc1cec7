"""LightningModule for contrastive + MSE training of a brain encoder (the net is injected)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning import LightningModule
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger
from neurorecon.models.retrieval import rank_score, retrieval_metrics

#: batch keys that are model inputs besides ``x`` (present depending on modality)
EXTRA_INPUTS = ("positions", "mask", "subject", "sensors")


class ContrastiveLitModule(LightningModule):
    """Train ``net`` so that its outputs match image embeddings.

    Parameters
    ----------
    net : nn.Module
        Encoder; ``net(x, **extras)`` returns ``{"clip": (B, D), "mse": (B, D)}``.
    loss : nn.Module
        ``loss(outputs, targets) -> (loss, parts)`` (e.g. λ·CLIP + (1−λ)·MSE).
    optimizer : callable
        Partial optimizer: ``optimizer(params) -> torch.optim.Optimizer``.
    scheduler : callable | None
        Partial LR scheduler: ``scheduler(optimizer)``.
    mixco : float
        Fraction of ``max_epochs`` trained with MixCo (BiMixCo of MindEye: each training input
        becomes ``lam x_i + (1 - lam) x_perm[i]`` with ``lam ~ Beta(mixco_beta, mixco_beta)``
        and soft contrastive targets); 0 disables it.
    mixco_beta : float
        Parameter of the Beta distribution of ``lam``.
    mask_false_negatives : bool
        Rows of one batch that show the same image are not each other's negatives.
    min_rank_images : int
        Checkpoints and early stopping follow ``val/select``: the validation retrieval
        ``val/rank_score`` when the validation split holds at least this many images, else
        (too few to rank epochs; a warning says so) minus the validation loss.
    """

    def __init__(self, *, net: nn.Module, loss: nn.Module,
                 optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None = None, mixco: float = 0.0,
                 mixco_beta: float = 0.15, mask_false_negatives: bool = True,
                 min_rank_images: int = 8):
        super().__init__()
        if not 0.0 <= mixco <= 1.0:
            raise ValueError(f"mixco must be a fraction of the epochs in [0, 1], got {mixco}")
        self.net, self.loss = net, loss
        self._optimizer, self._scheduler = optimizer, scheduler
        self.mixco, self.mixco_beta = float(mixco), float(mixco_beta)
        self.mask_false_negatives = bool(mask_false_negatives)
        self.description: dict[str, Any] = {}
        self.min_rank_images = int(min_rank_images)
        self._val: list[tuple[torch.Tensor, torch.Tensor, float, int]] = []
        self._warned_small_val = False
        self.candidates: torch.Tensor | None = None  # all stimulus embeddings (set by train)
        self.select_history: list[float] = []  # val/select per epoch (not the sanity check)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        extras = {k: batch[k] for k in EXTRA_INPUTS if k in batch}
        return self.net(batch["x"], **extras)

    def _mix(self, batch) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor] | None]:
        """A MixCo version of a training batch during the first ``mixco`` of the epochs."""
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        if (not self.mixco or not max_epochs or len(batch["x"]) < 2
                or self.current_epoch >= self.mixco * max_epochs):
            return batch, None
        x = batch["x"]
        perm = torch.randperm(len(x), device=x.device)
        beta = torch.distributions.Beta(self.mixco_beta, self.mixco_beta)
        lam = beta.sample((len(x),)).to(x.device, x.dtype)
        w = lam.reshape(-1, *[1] * (x.ndim - 1))
        return {**batch, "x": w * x + (1 - w) * x[perm]}, (perm, lam)

    def _step(self, batch, stage: str) -> torch.Tensor:
        mix = None
        if stage == "train":
            batch, mix = self._mix(batch)
        out = self(batch)
        ids = batch["target"] if self.mask_false_negatives and "target" in batch else None
        loss, parts = self.loss(out, batch["y"], ids=ids, mix=mix)
        bs = len(batch["x"])
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs, on_epoch=True,
                 on_step=False, sync_dist=True)
        for name, value in parts.items():
            self.log(f"{stage}/{name}", value, batch_size=bs, on_epoch=True, on_step=False,
                     sync_dist=True)
        return loss, out

    def training_step(self, batch, batch_idx):
        loss, _ = self._step(batch, "train")
        return loss

    def validation_step(self, batch, batch_idx):
        loss, out = self._step(batch, "val")
        n = len(batch["x"])
        self._val.append((out["clip"].detach().flatten(1).cpu(), batch["target"].cpu(),
                          float(loss) * n, n))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        pred = torch.cat([v[0] for v in self._val]).numpy()
        target = torch.cat([v[1] for v in self._val]).numpy()
        val_loss = sum(v[2] for v in self._val) / sum(v[3] for v in self._val)
        self._val.clear()
        # retrieval among the validation stimuli (single trials against their images)
        stims = sorted(set(target.tolist()))
        cand = (self.candidates[stims].flatten(1).numpy() if self.candidates is not None
                else None)
        if cand is None or len(stims) < max(2, self.min_rank_images):
            if not self._warned_small_val:
                logger.warning("validation holds %d image(s), too few to rank epochs by "
                               "retrieval (min_rank_images=%d): checkpoints and early stopping "
                               "follow the validation loss", len(stims), self.min_rank_images)
                self._warned_small_val = True
            self._select(-val_loss)
            if cand is None or len(stims) < 2:
                return
        pos = {s: i for i, s in enumerate(stims)}
        true = [pos[t] for t in target]
        m = retrieval_metrics(pred, cand, true)
        self.log("val/top1", m["top1"], prog_bar=False, sync_dist=True)
        self.log("val/top5", m["top5"], prog_bar=True, sync_dist=True)
        # continuous and unsaturated even with few validation images (top-5 of 10 images is
        # 1.0 for any decent model): 1 - mean normalised rank, 0.5 = chance, 1 = perfect
        score = rank_score(pred, cand, true)
        self.log("val/rank_score", score, prog_bar=False, sync_dist=True)
        if len(stims) >= self.min_rank_images:
            self._select(score)

    def _select(self, value: float) -> None:
        """Log ``val/select`` (checkpoints, early stopping) and keep its history (the refit's
        epoch count, :func:`~.fit.refit_epochs`)."""
        self.log("val/select", value, prog_bar=False, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.select_history.append(float(value))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = self._optimizer(params)
        if self._scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self._scheduler(opt)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["neurorecon"] = self.description


class WeightEMA(EMAWeightAveraging):
    """Lightning's exponential moving average of the weights, updated every optimizer step;
    validation, the saved checkpoints and the trained model use the average (Polyak
    averaging: on a few hundred trials, the weights of one step carry the noise of its batch,
    and the epoch validation picks moves with it). The decay comes from a half-life in
    epochs, so the horizon is the same whatever the number of batches in an epoch; early on,
    the half-life is at most a quarter of the steps taken (:data:`WARMUP`), so a short training
    is not averaged with its untrained start. Checkpoints hold the average only (runs are not
    resumed). Integer and boolean buffers (the subject indices of :class:`Reindexed`, a
    subspace's ``fitted`` flag) keep the current value: averaged in floating point and copied
    back, 3 became 2.9999998 and then 2, so a new subject was validated through an old one's layers.
    """

    #: the half-life (steps) is at most the steps taken so far over this
    WARMUP = 4.0

    def __init__(self, half_life_epochs: float = 1.0):
        if not half_life_epochs > 0:
            raise DataError(f"callbacks.weight_averaging.half_life_epochs={half_life_epochs}: "
                            "a positive number of epochs")
        super().__init__()
        self.half_life_epochs = float(half_life_epochs)
        self._half_life = 1.0  # steps, set when the epoch length is known

    def on_train_start(self, trainer, pl_module) -> None:
        self._half_life = max(1.0, self.half_life_epochs * float(trainer.num_training_batches))
        self._average_model.avg_fn = self._average

    def _average(self, averaged, current, n_averaged):
        if not averaged.is_floating_point():  # an index or a flag (buffers): not averaged
            return current
        steps = min(self._half_life, max(float(n_averaged), 1.0) / self.WARMUP)
        decay = 0.5 ** (1.0 / steps)
        return decay * averaged + (1.0 - decay) * current

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        checkpoint.pop("current_model_state", None)  # the last step's weights


class Reindexed(nn.Module):
    """``net`` called with the data module's subject indices mapped to the net's own
    (``mapping[k]``: the net's index of the data module's subject ``k``): a checkpoint scored
    on a subset of its subjects, new subjects appended to a trained decoder."""

    def __init__(self, net: nn.Module, mapping: list[int]):
        super().__init__()
        self.net = net
        self.register_buffer("mapping", torch.as_tensor(mapping), persistent=False)

    def forward(self, x, *, subject, **extras):
        return self.net(x, subject=self.mapping[torch.as_tensor(subject)], **extras)
