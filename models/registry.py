"""Artifact ``model_type`` string → encoder class (rebuild models without Hydra).

Checkpoints and exported artifacts store ``model_type`` (the class name) and the model's
:meth:`~neurorecon.models.base.BrainModuleMixin.get_config`; :func:`build` turns them back
into a module, ready for ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .ensemble import EncoderEnsemble
from .fmri.encoder import FmriEncoder
from .meg.brain_module import MegBrainModule

#: model_type → class; keys are the class names (what training stores as ``model_type``).
#: Besides these encoders, ``build`` knows :class:`EncoderEnsemble` (an average of them).
MODEL_TYPES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (MegBrainModule, FmriEncoder)
}


def get_model_class(model_type: str) -> type[nn.Module]:
    """Class registered under ``model_type``; a ValueError lists the known types."""
    try:
        return MODEL_TYPES[model_type]
    except KeyError:
        raise ValueError(f"unknown model_type {model_type!r}; known types: "
                         f"{sorted(MODEL_TYPES)}") from None


def build(model_type: str, config: Mapping[str, Any]) -> nn.Module:
    """Build a model of ``model_type`` from its constructor config (``get_config()`` output).

    Parameters
    ----------
    model_type : str
        A key of :data:`MODEL_TYPES` (the class name), or ``EncoderEnsemble``.
    config : mapping
        Constructor arguments (keys = argument names); an ensemble's members' types and
        configs.

    Returns
    -------
    nn.Module
        A freshly initialised model; load the saved state dict into it.
    """
    if model_type == EncoderEnsemble.__name__:  # its members are models of the registry
        return EncoderEnsemble.from_config(config, build=build)
    return get_model_class(model_type).from_config(config)


#: generator class name → module holding it (imported on use: diffusers backends are heavy)
GENERATOR_TYPES: dict[str, str] = {
    "EmbeddingDiffusionGenerator": "neurorecon.models.generators.embedding_diffusion",
    "StableUnclipGenerator": "neurorecon.models.generators.diffusers_unclip",
    "IpAdapterGenerator": "neurorecon.models.generators.diffusers_ip_adapter",
}


def build_generator(name: str, config: Mapping[str, Any]):
    """Build the generator class ``name`` (a key of :data:`GENERATOR_TYPES`) from its
    constructor arguments (bundles store them; no Hydra)."""
    import importlib

    if name not in GENERATOR_TYPES:
        raise ValueError(f"unknown generator {name!r}; known: {sorted(GENERATOR_TYPES)}")
    return getattr(importlib.import_module(GENERATOR_TYPES[name]), name)(**dict(config))
