"""MEG encoder: our implementation of the brain module of Défossez et al. (2023).

Written from the papers, not from brainmagick/braindecode code:

- Défossez, Caucheteux, Rapin, Kabeli & King (2023), "Decoding speech perception from
  non-invasive brain recordings", Nat. Mach. Intell.: spatial attention over 2D sensor
  positions with Fourier features, spatial dropout, 1x1 conv, subject layer, dilated residual
  convolutions (BatchNorm + GELU) with GLU layers, contrastive (CLIP) training.
- Benchetrit, Banville & King (2023), "Brain decoding: toward real-time reconstruction of
  visual perception": temporal aggregation by a learned affine map over time and two MLP
  heads (CLIP and MSE) predicting image embeddings.

Layout of one forward pass::

    x (B, n_chans, T), positions (B, n_chans, 2), mask (B, n_chans)
      → SpatialAttention         (B, n_virtual_chans, T)   softmax over *good* sensors
      → Conv1d 1x1               (B, hidden_dim, T)
      → SubjectLayer             (B, hidden_dim, T)        one matrix per subject
      → depth x [dilated residual conv (+ GLU conv every glu_every-th)]
      → Conv1d 1x1 + GELU        (B, head_dim, T)
      → TemporalAggregation      (B, Q, head_dim)          Q = n_tokens or 1
      → clip head, mse head      (B, n_outputs) or (B, n_tokens, n_outputs)
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from neurorecon.models.common.checks import check_option

from ..base import (
    BrainModuleMixin,
    ModelInputError,
    check_subject_index,
    check_tensor,
    input_mismatch,
    resolve_signal_shape,
    window_mismatch,
)
from ..heads import AGGREGATIONS, ProjectionHead, TemporalAggregation

_POSITION_HINT = ("pass positions=(batch, n_chans, 2) 2D sensor positions in [0, 1] "
                  "(neurorecon.pipelines.preprocess.meg.sensor_layout) and mask=(batch, n_chans) "
                  "True for good channels, both in the channel order of x")


#: sensor kinds the spatial attention distinguishes
#: (``neurorecon.pipelines.preprocess.meg.sensor_kinds``)
SENSOR_KINDS = ("mag", "axial", "planar")
#: per-channel sensor features: one-hot kind, then the planar gradient direction (x, y)
N_SENSOR_FEATURES = len(SENSOR_KINDS) + 2


def sensor_features(kinds, orientation) -> torch.Tensor:
    """Sensor descriptors ``(n_chans, N_SENSOR_FEATURES)`` for :class:`SpatialAttention`.

    Parameters
    ----------
    kinds : sequence of str
        One of :data:`SENSOR_KINDS` per channel.
    orientation : array-like, shape (n_chans, 2)
        Planar gradiometers' gradient direction in the 2D layout (ignored for other kinds).
    """
    kinds = list(kinds)
    unknown = sorted(set(kinds) - set(SENSOR_KINDS))
    if unknown:
        raise ModelInputError(f"unknown sensor kind(s) {unknown}; expected {list(SENSOR_KINDS)}")
    ori = torch.as_tensor(orientation, dtype=torch.float32).reshape(len(kinds), 2)
    onehot = torch.zeros(len(kinds), len(SENSOR_KINDS))
    onehot[torch.arange(len(kinds)), [SENSOR_KINDS.index(k) for k in kinds]] = 1.0
    planar = onehot[:, SENSOR_KINDS.index("planar"), None]
    return torch.cat([onehot, planar * ori], dim=1)


def bin_means(x: torch.Tensor, bins, mask: torch.Tensor) -> torch.Tensor:
    """Mean of each channel over each ``[start, stop)`` bin of samples, masked channels 0:
    ``x (batch, n_chans, n_times)``, ``mask (n_chans,)`` or ``(batch, n_chans)`` bool ->
    ``(batch, n_chans * n_bins)``, channel-major (the features of the linear read-out)."""
    feats = torch.stack([x[..., a:b].mean(-1) for a, b in bins], dim=-1)
    # masked, not multiplied: a bad channel's non-finite values must not leak (0 * nan)
    return feats.masked_fill(~mask[..., None], 0.0).flatten(1)


class SpatialAttention(nn.Module):
    """Sensor-position-based spatial attention (Défossez et al. 2023).

    Each output ("virtual") channel ``j`` has a learned function over the 2D sensor layout,
    ``a_j(x, y) = Σ_{k,l} w_{j,kl} cos(π(kx + ly)) + w'_{j,kl} sin(π(kx + ly))`` with
    ``k, l < n_fourier``; its output is the softmax-weighted sum of the sensors, the softmax
    taken over the *good* sensors only (masked sensors get weight exactly 0). Frequencies
    use π (period 2) so the unit square is not wrapped onto itself.

    Sensor-aware form (``n_sensor_features > 0``): the weights depend on the sensor too,
    ``w_j = Σ_s f_s W_{j,s}`` with ``f`` the sensor's features (:func:`sensor_features`: kind
    one-hot and planar-gradiometer direction). Co-located sensors of different kinds (the
    magnetometer and two orthogonal planar gradiometers of a Neuromag triplet) then get their
    own weights instead of identical ones; on a single-kind system (CTF) it reduces to the
    position-only form.

    Parameters
    ----------
    n_virtual_chans : int
        Output channels.
    n_fourier : int
        Harmonics per axis; the position embedding has ``2 * n_fourier**2`` features.
    spatial_dropout_radius : float
        During training, all sensors within this distance (layout units, [0, 1]) of one
        random point per example are dropped from the softmax. 0 disables it.
    n_sensor_features : int
        Width of the per-sensor features (:data:`N_SENSOR_FEATURES`), 0 for position only.

    Notes
    -----
    ``x (B, C, T)``, ``positions (B, C, 2)``, ``mask (B, C)``, ``sensors (B, C, S)`` (only
    when ``n_sensor_features > 0``) → ``(B, n_virtual_chans, T)``.
    """

    def __init__(self, *, n_virtual_chans: int, n_fourier: int,
                 spatial_dropout_radius: float, n_sensor_features: int = 0):
        super().__init__()
        k = torch.arange(n_fourier, dtype=torch.float32)
        freqs = torch.stack(torch.meshgrid(k, k, indexing="ij"), dim=-1).reshape(-1, 2)
        self.register_buffer("freqs", math.pi * freqs, persistent=False)  # (K², 2)
        n_feat = 2 * n_fourier**2
        self.n_virtual_chans, self.n_sensor_features = n_virtual_chans, int(n_sensor_features)
        shape = ((n_virtual_chans, n_feat) if not self.n_sensor_features
                 else (n_virtual_chans * self.n_sensor_features, n_feat))
        self.weight = nn.Parameter(torch.randn(*shape) / math.sqrt(n_feat))
        self.spatial_dropout_radius = float(spatial_dropout_radius)
        self._cache: tuple | None = None  # eval-mode weights of the last layout (not state)

    def logits(self, positions: torch.Tensor,
               sensors: torch.Tensor | None = None) -> torch.Tensor:
        """Attention logits ``(B, n_virtual_chans, C)`` for positions ``(B, C, 2)``."""
        phase = positions @ self.freqs.T  # (B, C, K²)
        feats = torch.cat([phase.cos(), phase.sin()], dim=-1)  # (B, C, 2K²)
        out = feats @ self.weight.T  # (B, C, V) or (B, C, V * S)
        if self.n_sensor_features:
            b, c = positions.shape[:2]
            out = out.reshape(b, c, self.n_virtual_chans, self.n_sensor_features)
            out = (out * sensors[:, :, None, :].to(out.dtype)).sum(-1)
        return out.transpose(1, 2)

    def attention(self, positions: torch.Tensor, mask: torch.Tensor,
                  sensors: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax weights ``(B, n_virtual_chans, C)``; zero on masked (and dropped) sensors.

        In eval mode without autograd (real-time decoding: one layout, many windows) the
        weights of the last call are reused while positions, mask and parameters are unchanged.
        """
        reuse = not self.training and not torch.is_grad_enabled() and not torch.jit.is_tracing()
        if self.n_sensor_features:
            if sensors is None:
                raise ModelInputError(
                    "SpatialAttention: this model is sensor-aware and needs sensors=(batch, "
                    f"n_chans, {self.n_sensor_features})",
                    hint="build them with neurorecon.models.meg.brain_module.sensor_features "
                         "from the channels' kinds and orientations")
            if not torch.jit.is_tracing():  # a traced layout is a constant, checked before
                check_tensor("sensors", sensors, shape=(*positions.shape[:2],
                                                        self.n_sensor_features),
                             owner=type(self).__name__,
                             hint="one row of sensor_features per channel, in the order of x")
        else:
            sensors = positions[..., :0]  # unused; keeps one code path below
        key = (self.weight.data_ptr(), self.weight._version, positions.shape, mask.shape,
               positions.dtype, positions.device)
        if reuse and self._cache is not None:
            cached_key, cached_pos, cached_mask, cached_sens, weights = self._cache
            if (cached_key == key and torch.equal(cached_pos, positions)
                    and torch.equal(cached_mask, mask) and torch.equal(cached_sens, sensors)):
                return weights
        weights = self._attention(positions, mask, sensors)
        self._cache = ((key, positions.clone(), mask.clone(), sensors.clone(), weights)
                       if reuse else None)
        return weights

    def _attention(self, positions: torch.Tensor, mask: torch.Tensor,
                   sensors: torch.Tensor) -> torch.Tensor:
        b = positions.shape[0]
        shared = not _single(positions) and bool((positions == positions[:1]).all()
                                and (sensors == sensors[:1]).all())
        logits = self.logits(positions[:1] if shared else positions,
                             sensors[:1] if shared else sensors)  # (1 or B, V, C)
        keep = mask
        if self.training and self.spatial_dropout_radius > 0:
            center = torch.rand(b, 1, 2, device=positions.device, dtype=positions.dtype)
            dropped = (positions - center).norm(dim=-1) < self.spatial_dropout_radius
            keep = mask & ~dropped
            # never drop every good sensor of an example
            keep = torch.where(keep.any(dim=1, keepdim=True), keep, mask)
        logits = logits.masked_fill(~keep[:, None, :], float("-inf"))
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                sensors: torch.Tensor | None = None) -> torch.Tensor:
        """Mix sensors ``x (B, C, T)`` into virtual channels ``(B, n_virtual_chans, T)``."""
        weights = self.attention(positions, mask, sensors)
        # zero masked rows too, so non-finite values in bad channels cannot leak (0 * nan)
        return weights @ x.masked_fill(~mask[:, :, None], 0.0)


class SubjectLayer(nn.Module):
    """One ``(C, C)`` matrix per subject, picked by a subject index per example.

    Initialised to the identity, so all subjects start from the shared path.

    Notes
    -----
    ``h (B, C, T)``, ``subject (B,)`` long → ``(B, C, T)``.
    """

    def __init__(self, *, n_subjects: int, n_channels: int):
        super().__init__()
        eye = torch.eye(n_channels).expand(n_subjects, n_channels, n_channels)
        self.weight = nn.Parameter(eye.clone())

    def forward(self, h: torch.Tensor, subject: torch.Tensor | int) -> torch.Tensor:
        """Apply each example's subject matrix: ``out[b] = W[subject[b]]ᵀ h[b]``; an int
        ``subject`` is the whole batch's (one matmul)."""
        if isinstance(subject, int):
            return self.weight[subject].T @ h
        if bool((subject == subject[0]).all()):
            return self.weight[subject[0]].T @ h
        return torch.bmm(self.weight[subject].transpose(1, 2), h)


class _Conv1d(nn.Conv1d):
    """``nn.Conv1d`` (stride 1, length-preserving) with a fast path for single windows.

    For batch size 1 (the real-time decoder's case) PyTorch's CPU heuristics pick slow
    non-oneDNN kernels for small and dilated convolutions; there the convolution is computed
    as one matrix product of the weights with the stacked shifted inputs. Results equal
    ``nn.Conv1d`` up to float rounding; the parameters are those of ``nn.Conv1d``.
    """

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not _single(h):
            return super().forward(h)
        k, d, p = self.kernel_size[0], self.dilation[0], self.padding[0]
        t_out = h.shape[-1] + 2 * p - d * (k - 1)
        padded = F.pad(h[0], (p, p)) if p else h[0]
        cols = padded if k == 1 else torch.stack(
            [padded[:, i * d:i * d + t_out] for i in range(k)], dim=1).reshape(-1, t_out)
        weight = self.weight.reshape(self.out_channels, -1)  # (C_out, C_in * k), cols alike
        out = weight @ cols if self.bias is None else torch.addmm(self.bias[:, None], weight,
                                                                  cols)
        return out[None]


class _ResidualConv(nn.Module):
    """``h + GELU(BatchNorm(Conv1d(h)))``, dilated, length preserving."""

    def __init__(self, channels: int, *, kernel_size: int, dilation: int, dropout: float):
        super().__init__()
        pad = dilation * (kernel_size - 1) // 2
        self.conv = _Conv1d(channels, channels, kernel_size, padding=pad, dilation=dilation)
        self.norm = nn.BatchNorm1d(channels)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.drop(self.act(self.norm(self.conv(h))))


class _GluConv(nn.Module):
    """``GLU(Conv1d(h, 2C))``: gated, length preserving (kernel 3, no dilation)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _Conv1d(channels, 2 * channels, 3, padding=1)
        self.glu = nn.GLU(dim=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.glu(self.conv(h))


class MegBrainModule(BrainModuleMixin, nn.Module):
    """MEG → image-embedding encoder (brain module of Défossez et al. 2023, as adapted by
    Benchetrit et al. 2023 for images).

    Positions come with the data, so one model takes recordings with different channel
    sets and sensor systems; bad or missing channels are masked out of the spatial softmax.

    Parameters
    ----------
    n_outputs : int
        Embedding dimension of both heads (``emb_dim``).
    n_times : int | None
        Samples per window. Derived from ``sfreq * input_window_seconds`` if None.
    sfreq : float | None
        Sampling frequency (Hz); used in messages and to derive ``n_times``.
    input_window_seconds : float | None
        Window length (s).
    n_subjects : int
        Number of subjects (rows of the subject layer).
    n_chans : int | None
        If set, inputs must have exactly this many channels; None accepts any channel set
        (positions and mask say which sensors they are).
    n_virtual_chans : int
        Output channels of the spatial attention (Défossez: 270).
    n_fourier : int
        Fourier harmonics per axis of the position embedding (Défossez: 32).
    spatial_dropout_radius : float
        Radius (layout units) of the sensor disc dropped during training; 0 disables.
    hidden_dim : int
        Channels of the convolutional stack (Défossez: 320; the default keeps one 1.5 s
        CTF-275 window at 120 Hz under 5 ms on 2 CPU cores).
    depth : int
        Dilated residual conv layers (Défossez: 10).
    kernel_size : int
        Kernel of the dilated convs (odd).
    dilation_period : int
        Dilation of layer ``i`` is ``2 ** (i % dilation_period)``.
    glu_every : int
        A GLU conv follows every ``glu_every``-th residual layer (0: none).
    dropout : float
        Dropout in the residual layers and heads.
    subject_layer : bool
        Use the per-subject matrix.
    sensor_aware : bool
        Spatial attention weights per sensor kind and planar-gradiometer direction (inputs
        then need ``sensors``); False: positions only (Défossez et al.).
    aggregation : {"affine", "mean", "attention"}
        Temporal aggregation (see :class:`~neurorecon.models.heads.TemporalAggregation`).
    head_dim : int | None
        Channels of the last 1x1 conv before aggregation (default ``2 * hidden_dim``).
    head_hidden_dim : int | None
        Optional hidden layer width of the CLIP and MSE heads.
    n_tokens : int | None
        Predict ``n_tokens`` vectors per example (token-level targets) instead of one.
    focus : [int, int] | None
        Temporal focus: only samples ``[start, stop)`` of each input window enter the network
        (inputs keep the full ``n_times``); None uses the whole window. Training picks it on
        validation trials (``neurorecon.pipelines.train.focus``).
    readout : dict | None
        A linear read-out combined with the deep embedding: ``{"bins": [[start, stop), ...],
        "n_chans": C}``. Each bin's samples are averaged per channel (masked channels count
        as 0) and a per-subject affine map (buffers ``readout_weight (n_subjects, n_outputs,
        C * n_bins)``, ``readout_bias``) predicts the embedding from them; both heads return
        ``mix * deep + (1 - mix) * read-out`` (the clip head on unit vectors), ``mix`` the
        subject's entry of the buffer ``readout_mix (n_subjects,)`` (a scalar in a state dict
        written before is taken for every subject). Fitted after training
        (``neurorecon.pipelines.train.readout``, :meth:`set_readout`); None: the deep
        embedding alone.

    Notes
    -----
    ``forward(x, *, positions, mask, subject)`` with ``x (batch, n_chans, n_times)`` float,
    ``positions (batch, n_chans, 2)`` float in [0, 1], ``mask (batch, n_chans)`` bool (True =
    good channel), ``subject (batch,)`` long (or an int) and, when ``sensor_aware``,
    ``sensors (batch, n_chans, N_SENSOR_FEATURES)`` returns
    ``{"clip": (batch, n_outputs), "mse": (batch, n_outputs)}``, or ``(batch, n_tokens,
    n_outputs)`` each when ``n_tokens`` is set.
    """

    def __init__(self, *, n_outputs: int, n_times: int | None = None,
                 sfreq: float | None = None, input_window_seconds: float | None = None,
                 n_subjects: int = 1, n_chans: int | None = None,
                 n_virtual_chans: int = 128, n_fourier: int = 12,
                 spatial_dropout_radius: float = 0.2, hidden_dim: int = 96, depth: int = 6,
                 kernel_size: int = 3, dilation_period: int = 5, glu_every: int = 2,
                 dropout: float = 0.0, subject_layer: bool = True,
                 sensor_aware: bool = False, aggregation: str = "affine",
                 head_dim: int | None = None,
                 head_hidden_dim: int | None = None, n_tokens: int | None = None,
                 focus: list[int] | None = None, readout: dict[str, Any] | None = None):
        super().__init__()
        focus = None if focus is None else [int(v) for v in focus]
        self._record_config(locals())
        name = type(self).__name__
        n_times, sfreq = resolve_signal_shape(n_times=n_times, sfreq=sfreq,
                                              input_window_seconds=input_window_seconds,
                                              owner=name)
        if focus is None:
            focus = [0, n_times]
        start, stop = (int(v) for v in focus)
        if not 0 <= start < stop <= n_times:
            raise ValueError(f"{name}: focus must be [start, stop) samples with 0 <= start < "
                             f"stop <= n_times={n_times}, got {list(focus)}")
        self.focus = (start, stop)
        check_option("aggregation", aggregation, AGGREGATIONS)
        if kernel_size % 2 != 1:
            raise ValueError(f"{name}: kernel_size must be odd (length-preserving "
                             f"padding), got {kernel_size}")
        if n_subjects < 1:
            raise ValueError(f"{name}: n_subjects must be >= 1, got {n_subjects}")
        if n_tokens is not None and n_tokens < 1:
            raise ValueError(f"{name}: n_tokens must be >= 1 or None, got {n_tokens}")
        self.n_times, self.sfreq, self.n_chans = n_times, sfreq, n_chans
        self.n_subjects = n_subjects
        head_dim = 2 * hidden_dim if head_dim is None else head_dim

        self.sensor_aware = bool(sensor_aware)
        self.spatial = SpatialAttention(n_virtual_chans=n_virtual_chans, n_fourier=n_fourier,
                                        spatial_dropout_radius=spatial_dropout_radius,
                                        n_sensor_features=N_SENSOR_FEATURES if sensor_aware
                                        else 0)
        self.merge = _Conv1d(n_virtual_chans, hidden_dim, 1)
        self.subject_layer = (SubjectLayer(n_subjects=n_subjects, n_channels=hidden_dim)
                              if subject_layer else None)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(_ResidualConv(hidden_dim, kernel_size=kernel_size,
                                        dilation=2 ** (i % dilation_period), dropout=dropout))
            if glu_every and (i + 1) % glu_every == 0:
                layers.append(_GluConv(hidden_dim))
        self.encoder = nn.Sequential(*layers)
        self.final = nn.Sequential(_Conv1d(hidden_dim, head_dim, 1), nn.GELU())
        self.aggregate = TemporalAggregation(mode=aggregation, n_channels=head_dim,
                                             n_times=stop - start, n_queries=n_tokens or 1)
        self.clip_head = ProjectionHead(in_dim=head_dim, out_dim=n_outputs,
                                        hidden_dim=head_hidden_dim, dropout=dropout)
        self.mse_head = ProjectionHead(in_dim=head_dim, out_dim=n_outputs,
                                       hidden_dim=head_hidden_dim, dropout=dropout)
        self.readout_bins: list[tuple[int, int]] = []
        self._readout_factors_cache: dict[int, tuple] = {}  # single-window fast path (no state)
        if readout is not None:
            self._build_readout(readout, n_outputs=n_outputs)

    @property
    def input_window_seconds(self) -> float | None:
        """Window length (s), when ``sfreq`` is known."""
        return None if self.sfreq is None else self.n_times / self.sfreq

    # ------------------------------------------------------------------ linear read-out
    def _build_readout(self, readout: dict[str, Any], *, n_outputs: int) -> None:
        name = type(self).__name__
        bins = [(int(a), int(b)) for a, b in readout["bins"]]
        n_chans = int(readout["n_chans"])
        if not bins or any(not 0 <= a < b <= self.n_times for a, b in bins) or n_chans < 1:
            raise ValueError(f"{name}: readout needs bins [start, stop) inside the window of "
                             f"{self.n_times} samples and n_chans >= 1, got {readout}")
        if self.n_tokens is not None:
            raise ValueError(f"{name}: the linear read-out predicts one embedding per window; "
                             "it does not combine with n_tokens")
        self.readout_bins = bins
        n_feat = n_chans * len(bins)
        self.register_buffer("readout_weight", torch.zeros(self.n_subjects, n_outputs, n_feat))
        self.register_buffer("readout_bias", torch.zeros(self.n_subjects, n_outputs))
        self.register_buffer("readout_mix", torch.ones(self.n_subjects))  # deep share each

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "readout_mix"
        mix = state_dict.get(key)
        if mix is not None and mix.ndim == 0:  # one share for all (written before 2026-12)
            state_dict[key] = mix.expand(self.n_subjects).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def add_readout(self, *, bins: list[list[int]], n_chans: int) -> None:
        """Add an empty linear read-out (``readout`` of the constructor; mix 1: deep alone
        until :meth:`set_readout` and ``readout_mix`` are set). Recorded in the config."""
        config = {"bins": [[int(a), int(b)] for a, b in bins], "n_chans": int(n_chans)}
        self._build_readout(config, n_outputs=int(self._config["n_outputs"]))
        self._config["readout"] = config

    def set_readout(self, subject: int, weight, bias) -> None:
        """Set subject ``subject``'s read-out: ``weight (n_outputs, n_chans_s * n_bins)`` (its
        channels, channel-major; fewer than ``n_chans`` leave the rest 0), ``bias``."""
        weight = torch.as_tensor(weight, dtype=torch.float32)
        n_bins = len(self.readout_bins)
        if weight.shape[1] % n_bins or weight.shape[1] > self.readout_weight.shape[2]:
            raise ValueError(f"read-out weight of shape {tuple(weight.shape)} does not fit "
                             f"{n_bins} bins of at most "
                             f"{self.readout_weight.shape[2] // n_bins} channels")
        with torch.no_grad():
            self.readout_weight[subject].zero_()
            self.readout_weight[subject, :, :weight.shape[1]] = weight
            self.readout_bias[subject] = torch.as_tensor(bias, dtype=torch.float32)

    def set_readout_mix(self, mix, subjects=None) -> None:
        """Set the deep share (``readout_mix``) of ``subjects`` (indices; default all) to
        ``mix``: a number, or one per subject."""
        with torch.no_grad():
            rows = slice(None) if subjects is None else torch.as_tensor(subjects).long()
            self.readout_mix[rows] = torch.as_tensor(mix, dtype=self.readout_mix.dtype)

    # ------------------------------------------------------------------ new subjects
    def add_subjects(self, n: int, *, n_chans: int | None = None) -> list[int]:
        """Append ``n`` subjects (new-subject adaptation); return their indices.

        Their subject-layer matrices start from the mean of the trained subjects' (the input
        the shared layers learned from), their read-out at 0 (:meth:`set_readout`), widened to
        ``n_chans`` channels when a new subject has more. The trained subjects' weights are
        unchanged; the config records the new count.
        """
        if n < 1:
            raise ValueError(f"{type(self).__name__}.add_subjects: n must be >= 1, got {n}")
        old = self.n_subjects
        with torch.no_grad():
            if self.subject_layer is not None:
                w = self.subject_layer.weight
                start = w.mean(0, keepdim=True).expand(n, -1, -1)
                self.subject_layer.weight = nn.Parameter(torch.cat([w, start]),
                                                         requires_grad=w.requires_grad)
            if self.readout_bins:
                weight = self.readout_weight
                width = max(weight.shape[2], int(n_chans or 0) * len(self.readout_bins))
                grown = weight.new_zeros((old + n, weight.shape[1], width))
                grown[:old, :, :weight.shape[2]] = weight
                self.readout_weight = grown
                self.readout_bias = torch.cat([self.readout_bias,
                                               self.readout_bias.new_zeros((n, weight.shape[1]))])
                self.readout_mix = torch.cat([self.readout_mix, self.readout_mix.new_ones(n)])
                self._config["readout"]["n_chans"] = width // len(self.readout_bins)
                self._readout_factors_cache.clear()
        self.n_subjects = old + n
        self._config["n_subjects"] = self.n_subjects
        return list(range(old, old + n))

    def subset(self, subjects: list[int]) -> MegBrainModule:
        """A copy holding subjects ``subjects`` alone (indices: their subject-layer matrices,
        read-outs and deep shares, in that order) and the shared layers: the same outputs for
        them, indexed ``0..len(subjects) - 1`` (a model fine-tuned for new subjects, kept as
        theirs and averaged with another of theirs)."""
        rows = [int(s) for s in subjects]
        if not rows or any(not 0 <= s < self.n_subjects for s in rows):
            raise input_mismatch(f"{type(self).__name__}.subset: unknown subjects", got=rows,
                                 expected=f"indices in 0..{self.n_subjects - 1}",
                                 hint="add subjects with add_subjects first")
        per_subject = {"subject_layer.weight", "readout_weight", "readout_bias", "readout_mix"}
        return self._copy_with({**self.get_config(), "n_subjects": len(rows)},
                               {k: v[rows] if k in per_subject else v
                                for k, v in self.state_dict().items()})

    def freeze_shared(self, subjects: list[int]) -> list[nn.Parameter]:
        """Freeze everything but the subject layer (whose rows other than ``subjects`` get
        no gradient from their batches; weight decay still moves them, so an adaptation puts
        them back after training). Returns the parameters left trainable."""
        bad = [s for s in subjects if not 0 <= int(s) < self.n_subjects]
        if bad:
            raise ValueError(f"{type(self).__name__}.freeze_shared: subject indices {bad} "
                             f"outside 0..{self.n_subjects - 1}")
        self.requires_grad_(False)
        if self.subject_layer is None:
            return []
        self.subject_layer.weight.requires_grad_(True)
        return [self.subject_layer.weight]

    def _readout(self, x: torch.Tensor, mask: torch.Tensor, subject: torch.Tensor,
                 one: int | None) -> torch.Tensor:
        feats = bin_means(x, self.readout_bins, mask)  # (B, C_s * n_bins)
        weight = self.readout_weight[:, :, :feats.shape[1]]
        if one is not None:
            s = one
            factors = (self._readout_factors(s, feats.shape[1]) if _single(x)
                       and not self.training and not torch.is_grad_enabled() else None)
            if factors is not None:
                return (feats @ factors[1].T) @ factors[0].T + self.readout_bias[s]
            return feats @ weight[s].T + self.readout_bias[s]
        return torch.einsum("bf,bof->bo", feats, weight[subject]) + self.readout_bias[subject]

    def _readout_factors(self, subject: int,
                         n_feat: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Subject ``subject``'s read-out weights ``W (n_outputs, n_feat)`` as ``A @ B``,
        ``A (n_outputs, r)``, ``B (r, n_feat)``, ``r`` the numerical rank of ``W``; None when
        that is not smaller.

        A ridge fitted on n trials has rank below n, so a single window (the real-time
        decoder's case, where reading ``W`` is most of the read-out's time) multiplies by far
        fewer weights. Computed once per weights, kept outside the state: ``W``'s leading
        singular vectors from the eigenvectors of the smaller Gram matrix (``W Wᵀ`` or
        ``Wᵀ W``, in float64), and ``W`` projected on them; no division by singular values.
        On a 1280 x 8494 read-out this takes 0.5 s where an SVD of ``W`` took 7 s, which every
        start of the real-time decoder paid per model.
        """
        if torch.jit.is_tracing():  # trace_window computed them just before, eagerly
            return self._readout_factors_cache[subject][1]
        key = (n_feat, self.readout_weight._version, self.readout_weight.data_ptr())
        cached = self._readout_factors_cache.get(subject)
        if cached is not None and cached[0] == key:
            return cached[1]
        w = self.readout_weight[subject, :, :n_feat].double()
        wide = w.shape[0] <= w.shape[1]
        eigval, eigvec = torch.linalg.eigh(w @ w.T if wide else w.T @ w)  # ascending
        # singular values above 1e-7 of the largest: their squares above 1e-14 of its square
        rank = int((eigval > eigval[-1] * 1e-14).sum()) if eigval[-1] > 0 else 0
        factors = None
        if rank * sum(w.shape) < w.numel():
            basis = eigvec[:, len(eigval) - rank:]
            a, b = (basis, basis.T @ w) if wide else (w @ basis, basis.T)
            factors = (a.float().contiguous(), b.float().contiguous())
        self._readout_factors_cache[subject] = (key, factors)
        return factors

    # ------------------------------------------------------------------ checks
    def check_inputs(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                     subject: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Check shapes and indices before any compute; return ``(mask, subject)`` tensors.

        Raises
        ------
        ModelInputError
            Window length, channel count, positions/mask layout or subject index do not fit.
        """
        name = type(self).__name__
        check_tensor("x", x, shape=("batch", "n_chans", "n_times"),
                     owner=name, hint="pass MEG windows as (batch, n_chans, n_times)")
        b, c, t = x.shape
        if self.n_chans is not None and c != self.n_chans:
            raise input_mismatch(f"{name}: wrong channel count", got=c, expected=self.n_chans,
                                 hint="build the model with n_chans=None to accept any "
                                      "channel set, or pick the channels it was trained on")
        if t != self.n_times:
            raise window_mismatch(owner=name, got=t, n_times=self.n_times, sfreq=self.sfreq)
        if positions is None or mask is None:
            raise ModelInputError(f"{name}: positions and mask are required", hint=_POSITION_HINT)
        check_tensor("positions", positions, shape=(b, c, 2), owner=name, hint=_POSITION_HINT)
        check_tensor("mask", mask, shape=(b, c), owner=name, hint=_POSITION_HINT)
        if mask.dtype != torch.bool:
            raise ModelInputError(f"{name}: mask must be a bool tensor, got {mask.dtype}",
                                  hint=_POSITION_HINT)
        empty = ~mask.any(dim=1)
        if bool(empty.any()):
            raise ModelInputError(f"{name}: batch row(s) {empty.nonzero()[:, 0].tolist()} "
                                  "have no good channel", hint="drop such trials upstream")
        subject = check_subject_index(subject, batch_size=b, n_subjects=self.n_subjects,
                                      owner=name)
        return mask, subject.to(x.device)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *, positions: torch.Tensor, mask: torch.Tensor,
                subject: torch.Tensor | int = 0,
                sensors: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Encode MEG windows.

        Parameters
        ----------
        x : torch.Tensor
            ``(batch, n_chans, n_times)`` MEG windows (bad channels may hold anything).
        positions : torch.Tensor
            ``(batch, n_chans, 2)`` sensor positions in [0, 1], channel order of ``x``.
        mask : torch.Tensor
            ``(batch, n_chans)`` bool, True for channels to use.
        subject : torch.Tensor | int
            ``(batch,)`` long subject indices, or one index for the whole batch.
        sensors : torch.Tensor | None
            ``(batch, n_chans, N_SENSOR_FEATURES)`` sensor features (:func:`sensor_features`);
            required when ``sensor_aware``, ignored otherwise.

        Returns
        -------
        dict of str to torch.Tensor
            ``"clip"`` and ``"mse"``: ``(batch, n_outputs)``, or
            ``(batch, n_tokens, n_outputs)`` when ``n_tokens`` is set.
        """
        mask, subject = self.check_inputs(x, positions, mask, subject)
        one = int(subject[0]) if bool((subject == subject[0]).all()) else None
        return self._encode(x, positions, mask, subject, sensors, one=one)

    def _encode(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                subject: torch.Tensor, sensors: torch.Tensor | None,
                one: int | None) -> dict[str, torch.Tensor]:
        """:meth:`forward` on checked inputs; ``one`` is the batch's subject when all rows
        share one (Python-level, so tracing one subject turns no tensor into a bool)."""
        linear = self._readout(x, mask, subject, one) if self.readout_bins else None
        if self.focus != (0, self.n_times):
            x = x[..., self.focus[0]:self.focus[1]]
        h = self.spatial(x, positions.to(x.dtype), mask,
                         sensors if self.sensor_aware else None)
        h = self.merge(h)
        if self.subject_layer is not None:
            h = self.subject_layer(h, subject if one is None else one)
        h = self.final(self.encoder(h))
        z = self.aggregate(h)  # (B, Q, head_dim)
        clip, mse = self.clip_head(z), self.mse_head(z)
        if self.n_tokens is None:
            clip, mse = clip[:, 0], mse[:, 0]
        if linear is not None:
            w = self.readout_mix[subject][:, None]  # each example's subject's deep share
            clip = w * F.normalize(clip, dim=-1) + (1 - w) * F.normalize(linear, dim=-1)
            mse = w * mse + (1 - w) * linear
        return {"clip": clip, "mse": mse}

    # ------------------------------------------------------------------ single windows
    def trace_window(self, *, positions: torch.Tensor, subject: int,
                     sensors: torch.Tensor | None = None,
                     head: str = "clip") -> torch.jit.ScriptModule:
        """This model (eval mode) for single windows of one subject and channel layout:
        ``(x (1, n_chans, n_times), mask (1, n_chans))`` -> :meth:`forward`'s output ``head``
        (the other head is not computed).

        ``positions (n_chans, 2)`` and ``sensors`` are fixed, so the attention logits and the
        read-out factors are constants; the mask stays an input (a channel that goes bad in a
        stream costs no new trace). The model is traced, frozen and optimised for inference
        (TorchScript): for one window most of eager mode's time is Python overhead around
        ~100 small ops, and the traced module takes about 40 % less (the real-time decoder's
        case). Outputs equal :meth:`forward`'s up to float rounding. Inputs are not checked
        (``mask`` needs a True). The module holds a copy of the weights: trace again after
        changing them.
        """
        layout = {"positions": positions[None].float(), "subject": torch.tensor([int(subject)]),
                  "sensors": sensors[None] if self.sensor_aware else None, "one": int(subject)}
        one = _OneLayout(self, layout, check_option("head", head, ("clip", "mse"))).eval()
        example = (torch.zeros(1, len(positions), self.n_times),
                   torch.ones(1, len(positions), dtype=torch.bool))
        _quiet_tracing()
        with torch.no_grad():
            one(*example)  # the read-out factors are computed now and become constants
            traced = torch.jit.trace(one, example, check_trace=False)
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced))

    # ------------------------------------------------------------------ examples
    @classmethod
    def example_config(cls) -> dict[str, Any]:
        """A tiny config (CPU tests): 2 subjects, 0.5 s windows at 60 Hz."""
        return {"n_outputs": 8, "n_times": 30, "sfreq": 60.0, "n_subjects": 2,
                "n_virtual_chans": 16, "n_fourier": 4, "hidden_dim": 16, "depth": 2}

    def example_inputs(self, *, batch_size: int = 2) -> tuple[torch.Tensor, dict[str, Any]]:
        """Random windows on a random 2D layout: ``(x, {positions, mask, subject})``."""
        c = self.n_chans or 12
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, c, self.n_times, generator=gen)
        positions = torch.rand(1, c, 2, generator=gen).expand(batch_size, c, 2).clone()
        mask = torch.ones(batch_size, c, dtype=torch.bool)
        subject = torch.arange(batch_size) % self.n_subjects
        inputs = {"positions": positions, "mask": mask, "subject": subject}
        if self.sensor_aware:  # a Neuromag-like mix: magnetometer + two planar gradiometers
            kinds = [("mag", "planar", "planar")[i % 3] for i in range(c)]
            ori = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)] * (c // 3 + 1)
            inputs["sensors"] = sensor_features(kinds, ori[:c]).expand(batch_size, c, -1)
        return x, inputs


def _single(t: torch.Tensor) -> bool:
    """Whether ``t`` holds one example (batch size 1). Under tracing it is True without
    looking at the size: :meth:`MegBrainModule.trace_window` traces single windows, and a
    traced size turned into a bool would be a ``TracerWarning``."""
    return torch.jit.is_tracing() or t.shape[0] == 1


def _quiet_tracing() -> None:
    """Silence torch 2.13's deprecation of TorchScript, process-wide (``catch_warnings`` is
    not thread-safe, and the streamer traces in its own thread). The traced path itself
    turns no tensor into a Python value (:func:`_single`, ``_encode``'s ``one``), so tracing
    says nothing else. ``torch.compile`` needs a C++ compiler at run time and
    ``torch.export`` does not take the data-dependent input checks of ``forward``; measured
    in the real-time benchmark, the traced model halves a window's encode time."""
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated",
                            category=DeprecationWarning)


class _OneLayout(nn.Module):
    """A :class:`MegBrainModule` with its layout inputs bound and one output
    (:meth:`~MegBrainModule.trace_window`)."""

    def __init__(self, net: MegBrainModule, layout: dict[str, Any], head: str):
        super().__init__()
        self.net, self.layout, self.head = net, layout, head

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net._encode(x, mask=mask, **self.layout)[self.head]
