"""An encoder that averages several trained encoders of one architecture.

A run's refit (``refit.<modality>``) retrains a fresh model on train + validation trials for
the epoch count validation chose; that model is a new training that validation never scored,
and on a weak recording two seeds' refits can differ by 0.1 top-5. Averaging it with the
validation-selected model it was refitted from (``ensemble.<modality>``) costs no training:
both exist already. :class:`EncoderEnsemble` holds them as ``members`` and is used where one
encoder is (training's evaluation, checkpoints, the bundle, the ``Decoder``, the streamer,
``neurorecon adapt``):

- :meth:`forward`: the mean of the members' unit-norm contrastive outputs and of their
  regression outputs, equal or weighted (``weights``: a new subject's adapted ways, weighted
  by the trials behind each, :func:`~neurorecon.pipelines.train.adaptation.ensemble_of`).
- What changes a model (new subjects, their freezing, a read-out, the fMRI subspace) is
  applied to every member; attributes that describe it (``n_times``, ``focus``,
  ``readout_bins``, ``n_subjects``...) are read from the first, as all members agree.
- ``get_config()`` is ``{"members": [{"model_type", "config"}, ...]}`` (and ``"weights"``
  where they are not equal) and the state dict
  ``members.<i>.<name>``, so :func:`~neurorecon.models.registry.build` rebuilds it from a
  bundle without unpickling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: what changes a model: called on the ensemble, called on every member that has it (their
#: results must agree, e.g. a new subject's index)
_ON_EVERY_MEMBER = ("add_subjects", "add_subject", "fit_subspace", "add_readout", "set_readout",
                    "set_readout_mix", "set_voxel_relevance")
#: what every member holds alike (set on each from the data), read from the first
_AS_THE_FIRST = ("voxel_relevance", "has_subspace")


class EncoderEnsemble(nn.Module):
    """The average of ``members`` (encoders of one class with the same subjects and inputs).

    Parameters
    ----------
    members : sequence of nn.Module
        At least two encoders of one class (``forward(x, **inputs) -> {"clip", "mse"}``).
    weights : sequence of float, optional
        One non-negative weight per member, not all 0 (scaled to sum 1); default: equal.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None):
        super().__init__()
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"EncoderEnsemble needs at least 2 members, got {len(members)}")
        kinds = sorted({type(m).__name__ for m in members})
        if len(kinds) != 1:
            raise ValueError(f"EncoderEnsemble members must be of one class, got {kinds}")
        self.members = nn.ModuleList(members)
        self.weights = None if weights is None else _checked_weights(weights, len(members))

    # ------------------------------------------------------------------ config I/O
    def get_config(self) -> dict[str, Any]:
        """The members' types and constructor configs, and their weights where they are not
        equal (``from_config`` rebuilds them)."""
        config: dict[str, Any] = {"members": [{"model_type": type(m).__name__,
                                               "config": m.get_config()} for m in self.members]}
        if self.weights is not None:
            config["weights"] = list(self.weights)
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, build) -> EncoderEnsemble:
        """An ensemble of fresh members from :meth:`get_config` output; ``build(model_type,
        config)`` builds each (:func:`neurorecon.models.registry.build`)."""
        members = config.get("members") if isinstance(config, Mapping) else None
        if not members or not {"members"} <= set(config) <= {"members", "weights"}:
            raise ValueError("EncoderEnsemble config must be {'members': [{'model_type', "
                             "'config'}, ...], 'weights' (optional): [...]}, got "
                             + repr(config))
        return cls([build(m["model_type"], m["config"]) for m in members],
                   weights=config.get("weights"))

    # ------------------------------------------------------------------ what members share
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, sub-modules
        except AttributeError:
            pass
        members = self._modules.get("members")
        if not members or name.startswith("_"):
            raise AttributeError(f"EncoderEnsemble has no attribute {name!r}")
        value = getattr(members[0], name)
        if name in _ON_EVERY_MEMBER:
            return lambda *args, **kwargs: _agreed(
                [getattr(m, name)(*args, **kwargs) for m in members], name)
        if callable(value) and not isinstance(value, torch.Tensor) and name not in _AS_THE_FIRST:
            raise AttributeError(f"EncoderEnsemble does not forward the method {name!r} "
                                 "(it would change the first member alone)")
        return value

    def freeze_shared(self, *args, **kwargs) -> list[nn.Parameter]:
        """Freeze every member's shared layers; the parameters left trainable, all members'."""
        return [p for m in self.members for p in (m.freeze_shared(*args, **kwargs) or [])]

    # ------------------------------------------------------------------ outputs
    def forward(self, x: torch.Tensor, **inputs: Any) -> dict[str, torch.Tensor]:
        outs = [m(x, **inputs) for m in self.members]
        return {"clip": contrastive_mean([o["clip"] for o in outs], self.weights),
                "mse": weighted_mean([o["mse"] for o in outs], self.weights)}

    def trace_window(self, *, head: str = "clip", **kwargs: Any) -> nn.Module:
        """The members' :meth:`~neurorecon.models.meg.brain_module.MegBrainModule.trace_window`
        (each traced and frozen), averaged as :meth:`forward` averages them."""
        return _MeanOfWindows([m.trace_window(head=head, **kwargs) for m in self.members],
                              head=head, weights=self.weights).eval()


def weighted_mean(outputs: Sequence[torch.Tensor],
                  weights: Sequence[float] | None = None) -> torch.Tensor:
    """The mean of ``outputs``, weighted by ``weights`` (scaled to sum 1; None: equal)."""
    stacked = torch.stack(list(outputs))
    if weights is None:
        return stacked.mean(0)
    w = torch.as_tensor(_checked_weights(weights, len(stacked)), dtype=stacked.dtype)
    return torch.tensordot(w, stacked, dims=1)


def contrastive_mean(outputs: Sequence[torch.Tensor],
                     weights: Sequence[float] | None = None) -> torch.Tensor:
    """The (weighted) mean of unit-norm contrastive outputs (last dimension): how an ensemble
    averages its members', and how their predictions are averaged where they were computed
    apart."""
    return weighted_mean([F.normalize(o, dim=-1) for o in outputs], weights)


def _checked_weights(weights: Sequence[float], n: int) -> list[float]:
    w = [float(v) for v in weights]
    if len(w) != n or any(not v >= 0 for v in w) or not sum(w) > 0:
        raise ValueError(f"EncoderEnsemble weights must be {n} non-negative numbers, not all "
                         f"0, got {list(weights)}")
    return [v / sum(w) for v in w]


def _agreed(values: list[Any], what: str) -> Any:
    if any(v != values[0] for v in values[1:]):
        raise RuntimeError(f"EncoderEnsemble.{what}: members disagree ({values})")
    return values[0]


class _MeanOfWindows(nn.Module):
    """Traced single-window members, averaged (:meth:`EncoderEnsemble.trace_window`)."""

    def __init__(self, parts: list[nn.Module], *, head: str, weights: list[float] | None):
        super().__init__()
        self.parts, self.head, self.weights = nn.ModuleList(parts), head, weights

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        outs = [part(x, mask) for part in self.parts]
        return (contrastive_mean if self.head == "clip" else weighted_mean)(outs, self.weights)
