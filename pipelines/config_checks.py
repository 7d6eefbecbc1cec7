"""Configuration values checked before any work: every enumerated option of a composed config.

A typo (``data.modality=eeg``, ``preprocess.meg.phase=casual``) stops the command with one line
naming the key and the allowed values, before any preprocessing or training starts. The allowed
values come from the code that uses them.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from neurorecon.models.common.checks import DataError, check_option
from neurorecon.models.fmri.encoder import ADAPTERS
from neurorecon.models.heads import AGGREGATIONS
from neurorecon.models.registry import GENERATOR_TYPES

from .common.parallel import EXECUTORS
from .data.studies import MODALITIES
from .embed.run import IMAGE_SELECTIONS
from .preprocess.fmri import DRIFT_MODELS, FMRI_INPUTS, GLMS, NOISE_MODELS, ZSCORE_MODES
from .preprocess.meg import BAD_CHANNEL_MODES, PHASES

#: config key -> allowed values (keys absent from a stage's config are skipped)
OPTIONS: dict[str, tuple[Any, ...]] = {
    "data.modality": MODALITIES,
    "data.fmri_input": FMRI_INPUTS,
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
    "reconstruct.generator.prediction_type": ("sample", "epsilon", "v_prediction"),
}
_ABSENT = object()


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`DataError` (one line: key, value, allowed values) for the first
    enumerated option of ``cfg`` that holds another value."""
    for key, allowed in OPTIONS.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if value is _ABSENT or OmegaConf.is_missing(cfg, key):
            continue
        check_option(key, value, allowed)
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
