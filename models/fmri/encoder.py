"""fMRI encoder: per-subject voxel adapters into a shared residual MLP (cross-subject).

Written from the papers:

- Scotti et al. (2023), "Reconstructing the Mind's Eye" (MindEye): a residual MLP backbone on
  masked voxels (Linear → LayerNorm → GELU → Dropout blocks with skip connections) and
  separate projection heads for contrastive and regression targets.
- Wang et al. (2024), "MindBridge: a cross-subject brain decoding framework": subjects with
  different voxel counts enter through their own input adapter into one shared space; a new
  subject is adapted by training only its adapter on top of the frozen shared model.

Layout::

    x (B, n_voxels[s]) → adapter[s] (B, hidden_dim) → n_blocks residual blocks
      → clip head, mse head: (B, n_outputs) or (B, n_tokens, n_outputs)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from neurorecon.models.common.checks import check_option

from ..base import (
    BrainModuleMixin,
    ModelInputError,
    check_subject_index,
    check_tensor,
    input_mismatch,
)
from ..heads import ProjectionHead

#: subject adapter kinds
ADAPTERS = ("subspace", "linear", "mlp")


def _streamed_svd_lowrank(blocks, mean: torch.Tensor, *, q: int, niter: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top singular values and right vectors ``(q,), (q, n_cols)`` of the row-centred matrix
    whose rows ``blocks()`` yields (each call a new pass), by the randomized range finder with
    ``niter`` power iterations (the algorithm of :func:`torch.svd_lowrank`)."""
    as64 = lambda b: torch.as_tensor(b).to(torch.float64) - mean  # noqa: E731

    def times(M: torch.Tensor) -> torch.Tensor:  # A @ M, (n_rows, q)
        return torch.cat([as64(b) @ M for b in blocks()])

    def t_times(Q: torch.Tensor) -> torch.Tensor:  # A.T @ Q, (n_cols, q)
        out, start = torch.zeros(len(mean), Q.shape[1], dtype=torch.float64), 0
        for b in blocks():
            b = as64(b)
            out += b.T @ Q[start : start + len(b)]
            start += len(b)
        return out

    Q = torch.linalg.qr(times(torch.randn(len(mean), q, dtype=torch.float64))).Q
    for _ in range(niter):
        Q = torch.linalg.qr(t_times(Q)).Q
        Q = torch.linalg.qr(times(Q)).Q
    _, svals, vt = torch.linalg.svd(t_times(Q).T, full_matrices=False)
    return svals, vt


class SubspaceProjection(nn.Module):
    """Fixed projection of voxels onto the principal subspace of a subject's training trials.

    With a few hundred trials and tens of thousands of voxels, a trainable voxel layer learns
    only inside the span of the training trials; everything its (random) initial weights do
    outside that span is noise added to every new pattern. Projecting first onto the span
    (the top ``n_components`` principal axes of the training trials, as ridge regression's dual
    form does implicitly) leaves the trainable layer ``n_components`` inputs instead of
    ``n_voxels``. The statistics are fitted from training trials only
    (:meth:`FmriEncoder.fit_subspace`) and saved with the weights (buffers).

    A voxel ``scale`` (default 1) weights the voxels before the projection and its fit (a
    weighted ridge kernel): the subject's voxel relevance and, for a new subject of a trained
    model, the region prior (:mod:`neurorecon.pipelines.train.region_prior`), so that the
    principal axes, and the linear layer on them, are those of the voxels that carry the
    stimulus rather than of the brain's noise. ``relevance`` holds the subject's own voxel
    relevance (the cross-validated share of each voxel's response that the stimulus embedding
    predicts on its train trials; 0: not measured), from which a later subject's prior is
    built.

    Notes
    -----
    ``x (B, n_voxels)`` → ``(B, n_components)``, ``((x - mean) * scale) @ components.T``,
    components scaled by ``1 / sqrt(n_voxels)`` so scores are O(1) for z-scored voxels (a
    ``scale`` has mean square 1).
    """

    def __init__(self, n_voxels: int, n_components: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_voxels))
        self.register_buffer("components", torch.zeros(n_components, n_voxels))
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("scale", torch.ones(n_voxels))
        self.register_buffer("relevance", torch.zeros(n_voxels))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # weights saved before the voxel scale and relevance existed: scale 1, not measured
        for name in ("scale", "relevance"):
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fit(self, X, *, scale=None) -> int:
        """Fit on training trials ``X (n_trials, n_voxels)``, weighted by ``scale``
        (``(n_voxels,)``, default 1); return the components kept.

        ``X`` may also be a function returning an iterable of row blocks (tensors or arrays),
        read several times: the fit then holds at most ``2 * n_components`` rows (exact SVD)
        or, with more trials, the ``(n_trials + n_voxels) x (n_components + 10)`` matrices of
        the randomized SVD (Halko et al., :func:`torch.svd_lowrank`'s algorithm, streamed).
        """
        weights = (torch.ones(self.scale.shape[0], dtype=torch.float64) if scale is None
                   else torch.as_tensor(scale).to(torch.float64))
        if weights.shape != self.scale.shape or not bool(torch.isfinite(weights).all()):
            raise ValueError(f"SubspaceProjection.fit: scale must be {tuple(self.scale.shape)} "
                             f"finite values, got {tuple(weights.shape)}")
        as64 = lambda b: torch.as_tensor(b).to(torch.float64)  # noqa: E731
        raw = X if callable(X) else (lambda: [X])
        k = self.components.shape[0]
        n, total = 0, torch.zeros(self.mean.shape[0], dtype=torch.float64)
        for b in raw():
            total += as64(b).sum(0)
            n += len(b)
        mean = total / max(n, 1)
        blocks = lambda: ((as64(b) - mean) * weights for b in raw())  # noqa: E731
        if min(n, len(mean)) <= 2 * k:
            _, svals, vt = torch.linalg.svd(torch.cat(list(blocks())), full_matrices=False)
        else:  # many trials: randomized SVD over the blocks, same span up to rounding
            svals, vt = _streamed_svd_lowrank(blocks, torch.zeros_like(mean), q=k + 10,
                                              niter=4)
        keep = min(k, int((svals > svals[0] * 1e-6).sum()) if len(svals) else 0)
        comps = torch.zeros_like(self.components, dtype=torch.float64)
        comps[:keep] = vt[:keep] / math.sqrt(len(mean))
        self.mean.copy_(mean.to(self.mean.dtype))
        self.scale.copy_(weights.to(self.scale.dtype))
        self.components.copy_(comps.to(self.components.dtype))
        self.fitted.fill_(True)
        return keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) * self.scale) @ self.components.T


class _ResidualMlpBlock(nn.Module):
    """``h + Dropout(GELU(LayerNorm(Linear(h))))``."""

    def __init__(self, dim: int, *, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU(),
                                 nn.Dropout(dropout))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.net(h)


def _check_label(label: Any) -> str:
    label = str(label)
    if not label or "." in label:
        raise ValueError(f"invalid subject label {label!r}: use a non-empty BIDS label "
                         "without '.' (e.g. '01')")
    return label


class FmriEncoder(BrainModuleMixin, nn.Module):
    """fMRI voxels → image-embedding encoder shared across subjects.

    Parameters
    ----------
    subjects : dict of str to int
        Subject label → number of voxels of that subject's mask, in subject-index order
        (index ``i`` is the ``i``-th key).
    n_outputs : int
        Embedding dimension of both heads (``emb_dim``).
    hidden_dim : int
        Width of the shared space and backbone (MindEye: 4096).
    n_blocks : int
        Residual MLP blocks of the backbone (MindEye: 4).
    dropout : float
        Dropout in the backbone blocks and heads.
    adapter_dropout : float
        Dropout after each subject adapter (MindEye's first layer: 0.5).
    adapter : {"subspace", "linear", "mlp"}
        Subject adapter: ``SubspaceProjection → Linear → Dropout`` (the linear per-subject
        layer of MindEye2 acting on the principal subspace of the subject's training trials;
        :meth:`fit_subspace` before training), one ``Linear`` map on all voxels followed by
        dropout, or ``Linear → LayerNorm → GELU → Dropout`` (MindBridge-style).
    n_components : int
        ``adapter="subspace"``: principal axes kept per subject (at most the training trials).
    head_hidden_dim : int | None
        Optional hidden layer width of the CLIP and MSE heads.
    n_tokens : int | None
        Predict ``n_tokens`` vectors per example (token-level targets) instead of one.

    Notes
    -----
    ``forward(x, *, subject)`` takes one subject's batch: ``x (batch, n_voxels[subject])``
    float and ``subject`` an index (int or ``(batch,)`` long tensor holding one value) or a
    label; it returns ``{"clip": (batch, n_outputs), "mse": (batch, n_outputs)}``, or
    ``(batch, n_tokens, n_outputs)`` each when ``n_tokens`` is set.

    New-subject adaptation: :meth:`add_subject` then :meth:`freeze_shared`, and train.
    """

    def __init__(self, *, subjects: Mapping[str, int], n_outputs: int, hidden_dim: int = 512,
                 n_blocks: int = 2, dropout: float = 0.15, adapter_dropout: float = 0.3,
                 adapter: str = "mlp", n_components: int = 256,
                 head_hidden_dim: int | None = None, n_tokens: int | None = None):
        super().__init__()
        subjects = {_check_label(k): int(v) for k, v in dict(subjects).items()}
        self._record_config(locals())
        if not subjects:
            raise ValueError("FmriEncoder: subjects is empty; give {label: n_voxels}")
        if n_tokens is not None and n_tokens < 1:
            raise ValueError(f"FmriEncoder: n_tokens must be >= 1 or None, got {n_tokens}")
        check_option("adapter", adapter, ADAPTERS)
        self.hidden_dim, self.adapter_dropout, self.adapter = hidden_dim, adapter_dropout, adapter
        self.n_components = int(n_components)
        self.adapters = nn.ModuleDict()
        for label, n_voxels in subjects.items():
            self.adapters[label] = self._make_adapter(n_voxels)
        self.backbone = nn.Sequential(*[_ResidualMlpBlock(hidden_dim, dropout=dropout)
                                        for _ in range(n_blocks)])
        out = n_outputs * (n_tokens or 1)
        self.clip_head = ProjectionHead(in_dim=hidden_dim, out_dim=out,
                                        hidden_dim=head_hidden_dim, dropout=dropout)
        self.mse_head = ProjectionHead(in_dim=hidden_dim, out_dim=out,
                                       hidden_dim=head_hidden_dim, dropout=dropout)

    def _make_adapter(self, n_voxels: int) -> nn.Module:
        if n_voxels < 1:
            raise ValueError(f"FmriEncoder: n_voxels must be >= 1, got {n_voxels}")
        if self.adapter == "subspace":
            return nn.Sequential(SubspaceProjection(n_voxels, self.n_components),
                                 nn.Linear(self.n_components, self.hidden_dim),
                                 nn.Dropout(self.adapter_dropout))
        if self.adapter == "linear":
            return nn.Sequential(nn.Linear(n_voxels, self.hidden_dim),
                                 nn.Dropout(self.adapter_dropout))
        return nn.Sequential(nn.Linear(n_voxels, self.hidden_dim), nn.LayerNorm(self.hidden_dim),
                             nn.GELU(), nn.Dropout(self.adapter_dropout))

    # ------------------------------------------------------------------ subjects
    @property
    def subjects(self) -> dict[str, int]:
        """Subject label → voxel count, in index order."""
        return dict(self._config["subjects"])

    @property
    def n_subjects(self) -> int:
        """Number of subjects (adapters)."""
        return len(self._config["subjects"])

    def add_subject(self, label: str, n_voxels: int) -> int:
        """Add a new subject's input adapter (randomly initialised); return its index.

        The config is updated, so :meth:`get_config` rebuilds a model with this subject.
        """
        label = _check_label(label)
        if label in self._config["subjects"]:
            raise ValueError(f"FmriEncoder: subject {label!r} already exists "
                             f"(subjects: {list(self._config['subjects'])})")
        ref = next(self.parameters())
        self.adapters[label] = self._make_adapter(int(n_voxels)).to(ref.device, ref.dtype)
        self._config["subjects"][label] = int(n_voxels)
        return self.n_subjects - 1

    def subset(self, labels: list[str]) -> FmriEncoder:
        """A copy holding subjects ``labels`` alone (their adapters, in that order) and the
        shared layers: the same outputs for them, indexed ``0..len(labels) - 1`` (a model
        fine-tuned for new subjects, kept as theirs and averaged with another of theirs)."""
        labels = [_check_label(label) for label in labels]
        unknown = [label for label in labels if label not in self.adapters]
        if unknown or not labels:
            raise input_mismatch("FmriEncoder.subset: unknown subjects", got=unknown or labels,
                                 expected=f"some of {list(self.adapters)}",
                                 hint="add a subject with add_subject first")
        config = {**self.get_config(),
                  "subjects": {label: self._config["subjects"][label] for label in labels}}
        kept = {f"adapters.{label}." for label in labels}
        return self._copy_with(config, {
            k: v for k, v in self.state_dict().items()
            if not k.startswith("adapters.") or any(k.startswith(p) for p in kept)})

    def _subspace(self, label: str) -> SubspaceProjection | None:
        proj = self.adapters[_check_label(label)][0]
        return proj if isinstance(proj, SubspaceProjection) else None

    def has_subspace(self, label: str) -> bool:
        """Whether subject ``label``'s adapter starts with a :class:`SubspaceProjection`."""
        return self._subspace(label) is not None

    def fit_subspace(self, label: str, X, *, scale=None) -> int | None:
        """Fit subject ``label``'s :class:`SubspaceProjection` on its training trials
        ``X (n_trials, n_voxels)`` (an array, or a callable yielding row blocks with a
        ``shape``: see :meth:`SubspaceProjection.fit`), its voxels weighted by ``scale``
        (default 1); return the components kept (None: no subspace adapter)."""
        label = _check_label(label)
        proj = self._subspace(label)
        if proj is None:
            return None
        n_voxels = self._config["subjects"][label]
        if X.shape[1] != n_voxels:
            raise input_mismatch(f"FmriEncoder.fit_subspace: wrong voxel count for sub-{label}",
                                 got=X.shape[1], expected=n_voxels,
                                 hint="fit on the trials of the subject's own voxel mask")
        return proj.fit(X, scale=scale)

    def voxel_relevance(self, label: str) -> torch.Tensor | None:
        """Subject ``label``'s voxel relevance (:class:`SubspaceProjection`; None: no
        subspace adapter, or not measured)."""
        proj = self._subspace(label)
        return None if proj is None or not bool(proj.relevance.any()) else proj.relevance

    def set_voxel_relevance(self, label: str, relevance) -> None:
        """Store subject ``label``'s voxel relevance ``(n_voxels,)`` (a subspace adapter's)."""
        proj = self._subspace(label)
        if proj is not None:
            proj.relevance.copy_(torch.as_tensor(relevance).to(proj.relevance.dtype))

    def freeze_shared(self, *labels: str) -> list[nn.Parameter]:
        """Freeze everything except the adapters of subjects ``labels`` (MindBridge-style
        adaptation).

        Returns
        -------
        list of nn.Parameter
            The parameters left trainable (pass them to the optimizer).
        """
        labels = tuple(_check_label(label) for label in labels)
        for label in labels:
            if label not in self.adapters:
                raise input_mismatch("FmriEncoder.freeze_shared: unknown subject",
                                     got=repr(label), expected=f"one of {list(self.adapters)}",
                                     hint="call add_subject(label, n_voxels) first")
        for p in self.parameters():
            p.requires_grad_(False)
        trainable = [p for label in labels for p in self.adapters[label].parameters()]
        for p in trainable:
            p.requires_grad_(True)
        return trainable

    # ------------------------------------------------------------------ forward
    def _subject_label(self, subject: Any, batch_size: int) -> str:
        labels = list(self._config["subjects"])
        idx = check_subject_index(subject, batch_size=batch_size, n_subjects=len(labels),
                                  owner="FmriEncoder", labels=labels)
        if len(idx) and bool((idx != idx[0]).any()):
            raise ModelInputError(
                f"FmriEncoder: a batch must hold one subject (voxel counts differ), got "
                f"subject indices {sorted(set(idx.tolist()))}",
                hint="batch by subject (neurorecon.pipelines.train.datamodule.SubjectBatchSampler)")
        return labels[int(idx[0])] if len(idx) else labels[0]

    def forward(self, x: torch.Tensor, *, subject: torch.Tensor | int | str
                ) -> dict[str, torch.Tensor]:
        """Encode one subject's voxel patterns.

        Parameters
        ----------
        x : torch.Tensor
            ``(batch, n_voxels)`` voxels in that subject's mask order.
        subject : torch.Tensor | int | str
            Subject index (int, or ``(batch,)`` long tensor with one value) or label.

        Returns
        -------
        dict of str to torch.Tensor
            ``"clip"`` and ``"mse"``: ``(batch, n_outputs)``, or
            ``(batch, n_tokens, n_outputs)`` when ``n_tokens`` is set.
        """
        check_tensor("x", x, shape=("batch", "n_voxels"), owner="FmriEncoder",
                     hint="pass one subject's trials as (batch, n_voxels)")
        label = self._subject_label(subject, x.shape[0])
        n_voxels = self._config["subjects"][label]
        if x.shape[1] != n_voxels:
            raise input_mismatch(
                f"FmriEncoder: wrong voxel count for sub-{label}", got=x.shape[1],
                expected=n_voxels,
                hint="use the voxel mask the model was trained with (stored with the "
                     "checkpoint); for a new mask add a subject with add_subject")
        adapter = self.adapters[label]
        if isinstance(adapter[0], SubspaceProjection) and not bool(adapter[0].fitted):
            raise ModelInputError(f"FmriEncoder: sub-{label}'s subspace adapter is not fitted",
                                  hint="call fit_subspace(label, train_X) on its training "
                                       "trials before training (neurorecon train does)")
        h = self.backbone(adapter(x))
        clip, mse = self.clip_head(h), self.mse_head(h)
        if self.n_tokens is not None:
            clip = clip.reshape(len(x), self.n_tokens, self.n_outputs)
            mse = mse.reshape(len(x), self.n_tokens, self.n_outputs)
        return {"clip": clip, "mse": mse}

    # ------------------------------------------------------------------ examples
    @classmethod
    def example_config(cls) -> dict[str, Any]:
        """A tiny config (CPU tests): two subjects with different voxel counts."""
        return {"subjects": {"01": 40, "02": 55}, "n_outputs": 8, "hidden_dim": 32,
                "n_blocks": 2}

    def example_inputs(self, *, batch_size: int = 2) -> tuple[torch.Tensor, dict[str, Any]]:
        """Random voxels of the first subject: ``(x, {subject})``."""
        n_voxels = next(iter(self._config["subjects"].values()))
        x = torch.randn(batch_size, n_voxels, generator=torch.Generator().manual_seed(0))
        return x, {"subject": torch.zeros(batch_size, dtype=torch.long)}
