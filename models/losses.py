"""Training objectives: CLIP (InfoNCE), MSE and their mix. Plain ``nn.Module`` s.

Every loss takes the encoder's output dict (``{"clip": ..., "mse": ...}``) or a tensor and the
target embeddings, with layouts ``(batch, emb_dim)`` or, for token-level targets,
``(batch, n_tokens, emb_dim)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import input_mismatch


def _check_pair(pred: torch.Tensor, target: torch.Tensor, owner: str) -> None:
    if pred.shape != target.shape:
        raise input_mismatch(f"{owner}: prediction and target shapes differ",
                             got=tuple(pred.shape), expected=tuple(target.shape),
                             hint="the model's n_outputs (and n_tokens) must equal the "
                                  "embedding dimension of the targets; rebuild the model "
                                  "for this embedder")


class ClipLoss(nn.Module):
    """InfoNCE over the batch with a learnable temperature (CLIP; Radford et al. 2021).

    Logits are ``scale * cos(pred_i, target_j)``; the positive of row ``i`` is target ``i``.
    Token-level inputs are flattened to one vector per example.

    With ``ids`` (the image id of each row), rows showing the *same image* are not each
    other's negatives (a batch holding two trials of one image would otherwise push a trial
    away from its own image): those logits are masked out. With ``mix`` (MixCo, Kim et al.
    2020, as MindEye's BiMixCo), row ``i``'s input was ``lam_i x_i + (1 - lam_i) x_perm[i]``
    and its target distribution puts ``lam_i`` on target ``i`` and ``1 - lam_i`` on
    ``perm[i]`` (and symmetrically for the image → brain direction).

    Parameters
    ----------
    init_temperature : float
        Initial temperature (``scale = 1 / temperature``).
    learn_temperature : bool
        Learn ``log(scale)`` (clamped to ``[0, log(max_scale)]``).
    max_scale : float
        Upper bound of the scale (CLIP: 100).
    symmetric : bool
        Average the brain→image and image→brain cross-entropies (else brain→image only).

    Notes
    -----
    ``forward(pred, target)``: ``pred`` and ``target`` ``(batch, emb_dim)`` or
    ``(batch, n_tokens, emb_dim)`` → scalar loss.
    """

    def __init__(self, *, init_temperature: float = 0.07, learn_temperature: bool = True,
                 max_scale: float = 100.0, symmetric: bool = True):
        super().__init__()
        if not 0 < init_temperature:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        log_scale = torch.tensor(math.log(1.0 / init_temperature))
        if learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.max_log_scale = math.log(max_scale)
        self.symmetric = symmetric

    @property
    def scale(self) -> torch.Tensor:
        """Current logit scale (1 / temperature), clamped."""
        return self.log_scale.clamp(0.0, self.max_log_scale).exp()

    def logits(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(batch, batch)`` scaled cosine similarities, rows = predictions."""
        _check_pair(pred, target, type(self).__name__)
        p = F.normalize(pred.flatten(1), dim=-1)
        t = F.normalize(target.flatten(1), dim=-1)
        return self.scale * p @ t.T

    def forward(self, pred: torch.Tensor, target: torch.Tensor, *,
                ids: torch.Tensor | None = None,
                mix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean InfoNCE loss of matched pairs ``(pred[i], target[i])``.

        ``ids (batch,)``: image id per row (same id = not a negative); ``mix``:
        ``(perm (batch,) long, lam (batch,) float)`` of a MixCo batch.
        """
        logits = self.logits(pred, target)
        n = len(logits)
        eye = torch.eye(n, dtype=torch.bool, device=logits.device)
        if mix is not None:
            perm, lam = mix
            lam = lam.to(logits.dtype)
            soft = lam[:, None] * eye + (1 - lam)[:, None] * F.one_hot(perm, n).to(logits.dtype)
            loss = -(soft * logits.log_softmax(-1)).sum(-1).mean()
            if self.symmetric:
                loss = 0.5 * (loss - (soft.T * logits.T.log_softmax(-1)).sum(-1).mean())
            return loss
        if ids is not None:
            ids = ids.to(logits.device)
            logits = logits.masked_fill((ids[:, None] == ids[None, :]) & ~eye, float("-inf"))
        labels = torch.arange(n, device=logits.device)
        loss = F.cross_entropy(logits, labels)
        if self.symmetric:
            loss = 0.5 * (loss + F.cross_entropy(logits.T, labels))
        return loss


class MseLoss(nn.Module):
    """Mean squared error between predicted and target embeddings.

    Notes
    -----
    ``forward(pred, target)``: equal shapes → scalar loss.
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over all elements of ``(pred - target) ** 2``."""
        _check_pair(pred, target, type(self).__name__)
        return F.mse_loss(pred, target)


class CombinedLoss(nn.Module):
    """``lambda_clip * CLIP(out["clip"], y) + (1 - lambda_clip) * MSE(out["mse"], y)``.

    Parameters
    ----------
    lambda_clip : float
        Weight of the CLIP term in [0, 1].
    init_temperature, learn_temperature, max_scale, symmetric
        Passed to :class:`ClipLoss`.

    Notes
    -----
    ``forward(outputs, targets)`` with ``outputs = {"clip": P, "mse": P}`` (``P`` of the
    layout of ``targets``) → ``(loss, parts)``; ``parts`` holds detached ``clip``, ``mse``
    and ``temperature`` for logging.
    """

    def __init__(self, *, lambda_clip: float = 0.5, init_temperature: float = 0.07,
                 learn_temperature: bool = True, max_scale: float = 100.0,
                 symmetric: bool = True):
        super().__init__()
        if not 0.0 <= lambda_clip <= 1.0:
            raise ValueError(f"lambda_clip must be in [0, 1], got {lambda_clip}")
        self.lambda_clip = float(lambda_clip)
        self.clip = ClipLoss(init_temperature=init_temperature,
                             learn_temperature=learn_temperature, max_scale=max_scale,
                             symmetric=symmetric)
        self.mse = MseLoss()

    def forward(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor, *,
                ids: torch.Tensor | None = None,
                mix: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted loss and its detached parts (``ids``, ``mix``: see :class:`ClipLoss`).

        In a MixCo batch the MSE target is the same mix of the two targets.
        """
        missing = [k for k in ("clip", "mse") if k not in outputs]
        if missing:
            raise KeyError(f"CombinedLoss: model outputs lack {missing}; got {list(outputs)}")
        targets = targets.to(outputs["clip"].dtype)
        clip = self.clip(outputs["clip"], targets, ids=ids, mix=mix)
        if mix is not None:
            perm, lam = mix
            lam = lam.to(targets.dtype).reshape(-1, *[1] * (targets.ndim - 1))
            targets = lam * targets + (1 - lam) * targets[perm]
        mse = self.mse(outputs["mse"], targets)
        loss = self.lambda_clip * clip + (1.0 - self.lambda_clip) * mse
        parts = {"clip": clip.detach(), "mse": mse.detach(),
                 "temperature": (1.0 / self.clip.scale).detach()}
        return loss, parts
