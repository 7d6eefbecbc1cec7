"""Configuration values checked before any work: every enumerated option and number of a
composed config.

A typo (``data.modality=eeg``, ``preprocess.meg.phase=casual``) or a number out of range
(``preprocess.meg.tmax=-1``, ``datamodule.batch_size=0``) stops the command with one line
naming the key, the value and what is allowed, before any preprocessing or training starts.
The allowed values come from the code that uses them; the preprocessing recipes are checked by
the code that reads them (:class:`~.preprocess.meg.MegParams`,
:func:`~.preprocess.fmri.fmri_params`), since their bounds depend on each other.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from neurorecon.models.common.checks import DataError, check_number, check_option
from neurorecon.models.fmri.encoder import ADAPTERS
from neurorecon.models.generators.base import START_IMAGES
from neurorecon.models.heads import AGGREGATIONS
from neurorecon.models.registry import GENERATOR_TYPES

from .common.parallel import EXECUTORS
from .data.studies import MISSING_RUNS, MODALITIES
from .embed.run import IMAGE_SELECTIONS
from .preprocess.fmri import (
    DRIFT_MODELS,
    FMRI_INPUTS,
    GLMS,
    NOISE_MODELS,
    ZSCORE_MODES,
    fmri_params,
)
from .preprocess.meg import BAD_CHANNEL_MODES, PHASES, MegParams

#: config key -> allowed values (keys absent from a stage's config are skipped)
OPTIONS: dict[str, tuple[Any, ...]] = {
    "data.modality": MODALITIES,
    "data.fmri_input": FMRI_INPUTS,
    "data.missing_runs": MISSING_RUNS,
    "preprocess.meg.phase": PHASES,
    "preprocess.meg.bad_channels": BAD_CHANNEL_MODES,
    "preprocess.fmri.glm": GLMS,
    "preprocess.fmri.noise_model": NOISE_MODELS,
    "preprocess.fmri.drift_model": DRIFT_MODELS,
    "preprocess.fmri.zscore": ZSCORE_MODES,
    "preprocess.executor": EXECUTORS,
    "embed.images": IMAGE_SELECTIONS,
    "encoder.meg.aggregation": AGGREGATIONS,
    "encoder.fmri.adapter": ADAPTERS,
    "reconstruct.head": ("clip", "mse"),
    "reconstruct.start": START_IMAGES,
    "evaluate.adaptation_new": ("last", "all"),
    "reconstruct.generator.prediction_type": ("sample", "epsilon", "v_prediction"),
}
#: config key -> bounds of the number it holds (:func:`check_number`'s arguments; each item
#: of a list); keys absent from a stage's config are skipped
NUMBERS: dict[str, dict[str, Any]] = {
    "preprocess.n_jobs": dict(low=1, integer=True, also=(-1,)),
    "embed.batch_size": dict(low=1, integer=True),
    "datamodule.batch_size": dict(low=1, integer=True),
    "datamodule.val_fraction": dict(low=0, high=1, high_open=True),
    "datamodule.num_workers": dict(low=0, integer=True),
    "optimizer.lr": dict(low=0, low_open=True),
    "optimizer.weight_decay": dict(low=0),
    "trainer.max_epochs": dict(low=1, integer=True, also=(-1,)),
    "trainer.min_epochs": dict(low=0, integer=True),
    "trainer.gradient_clip_val": dict(low=0, none=True),
    "loss.lambda_clip": dict(low=0, high=1),
    **{f"objective.{modality}.{key}": bounds for modality in MODALITIES
       for key, bounds in {"mixco": dict(low=0, high=1),
                           "mixco_beta": dict(low=0, low_open=True),
                           "min_rank_images": dict(low=0, integer=True),
                           "lambda_clip": dict(low=0, high=1, none=True),
                           "weight_decay": dict(low=0, none=True)}.items()},
    "readout.meg.bin_widths": dict(low=0, low_open=True),
    "reconstruct.strength": dict(low=0, high=1, also=("auto",)),
    "reconstruct.steps": dict(low=1, integer=True),
    "reconstruct.guidance_scale": dict(low=0),
    "reconstruct.batch_size": dict(low=1, integer=True),
    "reconstruct.grid_rows": dict(low=1, integer=True),
    "reconstruct.retrieval_k": dict(low=1, integer=True),
    "reconstruct.retrieval_shortlist": dict(low=1, integer=True),
    "reconstruct.lowlevel_rerank": dict(low=0, also=("auto",)),
    "replay.chunk_size": dict(low=1, integer=True, also=("auto",)),
}
_ABSENT = object()


def _select(cfg: DictConfig, key: str) -> Any:
    """The value at ``key`` (resolved), or ``_ABSENT`` when the stage has no such key or it
    is missing (``???``)."""
    value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
    if value is _ABSENT or OmegaConf.is_missing(cfg, key):
        return _ABSENT
    return value


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`DataError` (one line: key, value, allowed values) for the first
    enumerated option or number of ``cfg`` that holds another value."""
    for key, allowed in OPTIONS.items():
        value = _select(cfg, key)
        if value is not _ABSENT:
            check_option(key, value, allowed)
    for key, bounds in NUMBERS.items():
        value = _select(cfg, key)
        if OmegaConf.is_list(value):
            for i, item in enumerate(value):
                check_number(f"{key}[{i}]", item, **bounds)
        elif value is not _ABSENT:
            check_number(key, value, **bounds)
    meg, fmri = _select(cfg, "preprocess.meg"), _select(cfg, "preprocess.fmri")
    if meg is not _ABSENT:
        MegParams.from_mapping(OmegaConf.to_container(meg, resolve=True))
    if fmri is not _ABSENT:
        fmri_params(fmri)
    focus = OmegaConf.select(cfg, "focus.meg", default=None)
    if focus is not None and focus != "auto" and not (
            OmegaConf.is_list(focus) and len(focus) == 2
            and all(isinstance(v, (int, float)) for v in focus)):
        raise DataError(f"Invalid value for 'focus.meg': {focus!r}. Allowed values: auto, null "
                        "or [tmin, tmax] (seconds from image onset).")
    target = OmegaConf.select(cfg, "reconstruct.generator._target_", default=None)
    if target is not None:
        check_option("reconstruct.generator._target_ (class)", str(target).rsplit(".", 1)[-1],
                     sorted(GENERATOR_TYPES))
    if OmegaConf.select(cfg, "reconstruct.captions", default=False) and target is None:
        raise DataError("reconstruct.captions=true, but the embedded generator takes no text",
                        hint="use reconstruct/generator=stable_unclip or ip_adapter (local "
                             "weights) for the caption pathway, or reconstruct.captions=false")
