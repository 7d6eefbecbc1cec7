"""Temporal aggregation and projection heads shared by the encoders."""

from __future__ import annotations

import math

import torch
from torch import nn

from neurorecon.models.common.checks import check_option

AGGREGATIONS = ("affine", "mean", "attention")


class TemporalAggregation(nn.Module):
    """Collapse the time axis into ``n_queries`` feature vectors.

    Parameters
    ----------
    mode : {"affine", "mean", "attention"}
        ``affine``: a learned linear map over time, one weight per sample and query
        (Benchetrit et al. 2023); ``mean``: average over time (adaptive average pooling into
        ``n_queries`` segments when ``n_queries > 1``); ``attention``: one learned query per
        output attends over time steps (softmax over time).
    n_channels : int
        Feature channels ``C`` of the input.
    n_times : int
        Samples ``T`` of the input (used by ``affine``).
    n_queries : int
        Output vectors per example (1 for a pooled embedding, ``n_tokens`` for tokens).

    Notes
    -----
    Input ``(batch, C, T)`` → output ``(batch, n_queries, C)``.
    """

    def __init__(self, *, mode: str, n_channels: int, n_times: int, n_queries: int = 1):
        super().__init__()
        self.mode = check_option("aggregation", mode, AGGREGATIONS)
        self.n_queries = n_queries
        if mode == "affine":
            self.affine = nn.Linear(n_times, n_queries)
            nn.init.constant_(self.affine.weight, 1.0 / n_times)
            nn.init.zeros_(self.affine.bias)
        elif mode == "attention":
            self.query = nn.Parameter(torch.randn(n_queries, n_channels) / math.sqrt(n_channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Aggregate ``h`` ``(batch, C, T)`` into ``(batch, n_queries, C)``."""
        if self.mode == "affine":
            return self.affine(h).transpose(1, 2)
        if self.mode == "mean":
            if self.n_queries == 1:
                return h.mean(dim=-1, keepdim=True).transpose(1, 2)
            return nn.functional.adaptive_avg_pool1d(h, self.n_queries).transpose(1, 2)
        scores = torch.einsum("qc,bct->bqt", self.query, h) / math.sqrt(h.shape[1])
        return torch.einsum("bqt,bct->bqc", scores.softmax(dim=-1), h)


class ProjectionHead(nn.Module):
    """MLP head mapping features to the embedding space (applied on the last axis).

    ``LayerNorm → GELU → Dropout → Linear(in_dim, out_dim)``; with ``hidden_dim`` set, a
    ``Linear(in_dim, hidden_dim)`` comes first (and the rest works on ``hidden_dim``).

    Parameters
    ----------
    in_dim : int
        Input features.
    out_dim : int
        Output features (``emb_dim``).
    hidden_dim : int | None
        Width of an optional extra hidden layer.
    dropout : float
        Dropout before the last linear layer.

    Notes
    -----
    Input ``(..., in_dim)`` → output ``(..., out_dim)``.
    """

    def __init__(self, *, in_dim: int, out_dim: int, hidden_dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        if hidden_dim is not None:
            layers.append(nn.Linear(in_dim, hidden_dim))
            in_dim = hidden_dim
        layers += [nn.LayerNorm(in_dim), nn.GELU(), nn.Dropout(dropout),
                   nn.Linear(in_dim, out_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Project ``h`` ``(..., in_dim)`` to ``(..., out_dim)``."""
        return self.net(h)
