"""Shared signature, input checks and config I/O of the brain encoders.

After braindecode's ``EEGModuleMixin``: every encoder speaks one vocabulary (``n_chans``,
``n_times``, ``sfreq``, ``input_window_seconds``, ``n_outputs``, ``n_subjects``), derives the
missing signal-shape argument and raises on contradictions. Constructor arguments are saved
(:meth:`BrainModuleMixin.get_config`) so a model can be rebuilt from its JSON config and its
state dict alone (:meth:`BrainModuleMixin.from_config`, ``models/registry.py``).

Inputs that do not fit the model (window too short, wrong channel count, unknown subject)
raise :class:`ModelInputError`, which says what does not match and what to do.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from neurorecon.models.common.checks import DataError


class ModelInputError(DataError):
    """Input that does not fit a model: the message says what differs and what to do.

    A :class:`~neurorecon.models.common.checks.DataError`, so the CLI prints it without a
    traceback.
    """


def input_mismatch(what: str, *, got: Any, expected: Any, hint: str) -> ModelInputError:
    """Build the error for an input that does not fit the model.

    Parameters
    ----------
    what : str
        What is being checked, e.g. ``"MegBrainModule input x"``.
    got, expected : object
        The offending value and what the model needs (shapes, sizes, indices).
    hint : str
        What to do about it.

    Returns
    -------
    ModelInputError
        To be raised by the caller.
    """
    return ModelInputError(f"{what}: got {got}, expected {expected}", hint=hint)


def check_tensor(name: str, tensor: Any, *, shape: Sequence[int | str | None],
                 owner: str, hint: str) -> torch.Tensor:
    """Check a tensor's number of dimensions and the sizes that are fixed.

    Parameters
    ----------
    name : str
        Argument name (``"x"``, ``"positions"``...).
    tensor : torch.Tensor
        The input.
    shape : sequence of int | str | None
        Expected layout; an ``int`` is a size that must match, a ``str`` names a free axis
        (used in the message), ``None`` is a free unnamed axis.
    owner : str
        Model name for the message.
    hint : str
        What to do when it does not match.

    Returns
    -------
    torch.Tensor
        ``tensor`` unchanged.
    """
    layout = "(" + ", ".join(str(s) if s is not None else "?" for s in shape) + ")"
    if not isinstance(tensor, torch.Tensor):
        raise ModelInputError(f"{owner}: {name} must be a torch.Tensor {layout}, "
                              f"got {type(tensor).__name__}", hint=hint)
    if tensor.ndim != len(shape):
        raise input_mismatch(f"{owner}: {name} has the wrong number of dimensions",
                             got=tuple(tensor.shape), expected=layout, hint=hint)
    for axis, (size, want) in enumerate(zip(tensor.shape, shape, strict=True)):
        if isinstance(want, int) and size != want:
            raise input_mismatch(f"{owner}: {name} axis {axis} has size {size}",
                                 got=tuple(tensor.shape), expected=layout, hint=hint)
    return tensor


def _jsonable(value: Any) -> Any:
    """Convert a constructor argument to plain JSON types (tuples become lists)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return value.item()
    raise TypeError(f"constructor argument of type {type(value).__name__} is not "
                    f"JSON-serialisable; pass plain numbers, strings, lists or dicts")


def resolve_signal_shape(*, n_times: int | None, sfreq: float | None,
                         input_window_seconds: float | None,
                         owner: str) -> tuple[int, float | None]:
    """Derive ``n_times`` from ``sfreq`` and ``input_window_seconds`` and check agreement.

    Parameters
    ----------
    n_times : int | None
        Samples per window.
    sfreq : float | None
        Sampling frequency (Hz).
    input_window_seconds : float | None
        Window length (s).
    owner : str
        Model name for error messages.

    Returns
    -------
    n_times : int
    sfreq : float | None
    """
    if n_times is None:
        if sfreq is None or input_window_seconds is None:
            raise ValueError(f"{owner}: give n_times, or both sfreq and input_window_seconds")
        n_times = int(round(input_window_seconds * sfreq))
    elif sfreq is not None and input_window_seconds is not None:
        derived = input_window_seconds * sfreq
        if abs(derived - n_times) > 1:
            raise ValueError(
                f"{owner}: n_times={n_times} contradicts sfreq={sfreq} Hz x "
                f"input_window_seconds={input_window_seconds} s = {derived:g} samples; "
                "give only two of the three")
    if n_times < 1:
        raise ValueError(f"{owner}: n_times must be >= 1, got {n_times}")
    return int(n_times), (None if sfreq is None else float(sfreq))


class BrainModuleMixin:
    """Signature, checks and config I/O shared by the encoders (mix into an ``nn.Module``).

    Subclasses call :meth:`_record_config` with ``locals()`` first thing in ``__init__``;
    :meth:`get_config` then returns exactly the constructor arguments, and
    :meth:`from_config` rebuilds the model from them.
    """

    _config: dict[str, Any]

    # ------------------------------------------------------------------ config I/O
    def _record_config(self, values: Mapping[str, Any]) -> None:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        self._config = {name: _jsonable(values[name]) for name in names}

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments as a JSON-serialisable dict (keys = argument names)."""
        return copy.deepcopy(self._config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]):
        """Build a model from :meth:`get_config` output (a dict or a JSON string).

        Unknown keys raise a ValueError listing the constructor arguments.
        """
        if isinstance(config, str):
            config = json.loads(config)
        allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(config) - set(allowed))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config key(s) {unknown}; "
                             f"constructor arguments are {allowed}")
        return cls(**dict(config))

    def _copy_with(self, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]):
        """A new model of this class from ``config`` holding ``state``, on this model's device
        and dtype, with its parameters' ``requires_grad`` and its train/eval mode (a subset of
        the subjects: ``subset``)."""
        ref = next(self.parameters())
        out = type(self).from_config(config).to(ref.device, ref.dtype)
        out.load_state_dict(state)
        grads = {name: p.requires_grad for name, p in self.named_parameters()}
        for name, p in out.named_parameters():
            p.requires_grad_(grads[name])
        return out.train(self.training)

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        """A small valid config (tests, docs, registry completeness)."""
        raise NotImplementedError

    def example_inputs(self, *, batch_size: int = 2) -> tuple[torch.Tensor, dict[str, Any]]:
        """Random inputs that fit this model: ``(x, keyword inputs)`` for ``forward``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ signature
    @property
    def n_outputs(self) -> int:
        """Embedding dimension of each output (``emb_dim``)."""
        return int(self._config["n_outputs"])

    @property
    def n_tokens(self) -> int | None:
        """Tokens per output when the model predicts token-level targets, else None."""
        return self._config.get("n_tokens")

    def get_output_shape(self, *, batch_size: int = 2) -> dict[str, tuple[int, ...]]:
        """Output shapes on :meth:`example_inputs`, run in eval mode without gradients."""
        x, kwargs = self.example_inputs(batch_size=batch_size)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                out = self(x, **kwargs)
        finally:
            self.train(was_training)
        return {k: tuple(v.shape) for k, v in out.items()}


def check_subject_index(subject: Any, *, batch_size: int, n_subjects: int,
                        owner: str, labels: Sequence[str] | None = None) -> torch.Tensor:
    """Turn ``subject`` (int, label or ``(batch,)`` tensor) into a checked long tensor.

    Parameters
    ----------
    subject : int | str | torch.Tensor
        Subject index per batch row, one index for all rows, or a subject label (when
        ``labels`` is given).
    batch_size : int
        Rows in the batch.
    n_subjects : int
        Subjects the model was built for.
    owner : str
        Model name for error messages.
    labels : sequence of str | None
        Subject labels in index order (lets callers pass a label).

    Returns
    -------
    torch.Tensor
        ``(batch,)`` long tensor of indices in ``[0, n_subjects)``.
    """
    known = (f"indices 0..{n_subjects - 1}" if labels is None
             else f"subjects {list(labels)} (indices 0..{n_subjects - 1})")
    hint = ("use the subject index the model was trained with (see the checkpoint's subject "
            "map); for a new subject add it (FmriEncoder.add_subject) or fine-tune with "
            "a larger n_subjects")
    if isinstance(subject, str):
        if labels is None or subject not in labels:
            raise input_mismatch(f"{owner}: unknown subject", got=repr(subject),
                                 expected=known, hint=hint)
        subject = list(labels).index(subject)
    idx = torch.as_tensor(subject)
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise ModelInputError(f"{owner}: subject must hold integer indices, got {idx.dtype}",
                              hint="pass a long tensor of subject indices")
    if idx.ndim == 0:
        idx = idx.expand(batch_size)
    if idx.ndim != 1 or len(idx) != batch_size:
        raise input_mismatch(f"{owner}: subject must be one index per batch row",
                             got=tuple(idx.shape), expected=f"({batch_size},)",
                             hint="pass a (batch,) tensor of subject indices")
    bad = idx[(idx < 0) | (idx >= n_subjects)]
    if len(bad):
        raise input_mismatch(f"{owner}: unknown subject index", got=int(bad[0]),
                             expected=known, hint=hint)
    return idx.long()


def window_mismatch(*, owner: str, got: int, n_times: int, sfreq: float | None) -> ModelInputError:
    """Error for a window whose number of samples differs from the model's ``n_times``."""
    def _dur(n: int) -> str:
        return f"{n} samples" + ("" if sfreq is None else f" ({n / sfreq:.3g} s at {sfreq:g} Hz)")

    kind = "window too short" if got < n_times else "window too long"
    return ModelInputError(
        f"{owner}: {kind}: got {_dur(got)}, the model was built for n_times={_dur(n_times)}",
        hint="epoch/window the data with the tmin/tmax and sfreq of the model's preprocessing "
             "recipe (or build a model with this n_times)")

