"""The trained-decoder bundle and :class:`Decoder`, the one way to decode with a trained model.

A bundle is a directory (written by ``neurorecon export`` and by every ``train``/``run``, under
``<run dir>/bundle/``) that loads with no Hydra, no Lightning and no unpickling:

- ``config.json``: format version, modality, ``model_type`` + constructor config, embedder
  identity, preprocessing recipe (including ``phase``), per-subject fitted statistics (MEG
  channels, 2D positions, sensor kinds, bads, input rate, scaler; fMRI voxel count, mask file,
  normalisation), gallery and generator descriptions, provenance and headline metrics;
- ``model.safetensors``: the encoder's weights and buffers (fMRI subspace axes included);
- ``masks/sub-<label>_mask.nii.gz`` (fMRI): each subject's voxel mask on its grid;
- ``gallery/``: candidate embeddings (``embeddings.safetensors``), ``index.tsv`` (image id,
  concept, split, thumbnail) and ``thumbnails/*.png``;
- ``generator/``: the embedded generator's ``save_pretrained`` directory (or, for a diffusers
  backend, its local path in ``config.json``) and ``lowlevel.safetensors``, the low-level
  pathway's per-subject ridge maps;
- ``README.md``: the model card.

The transforms are the offline ones (:mod:`.preprocess.meg`, :mod:`.preprocess.fmri`) with the
bundle's frozen statistics, so decoding the data a run was trained on gives that run's numbers.
"""

from __future__ import annotations

from .base import DECODERS, Decoder, encode_batches, predict_split
from .files import (
           CONFIG,
           MASKS,
           NORMALISATION,
           BundleError,
           Gallery,
           model_card,
           read_bundle_config,
)
from .fmri import FmriDecoder
from .meg import MegDecoder

#: the bundle's other file names and helpers: :mod:`.files`
__all__ = ["CONFIG", "DECODERS", "MASKS", "NORMALISATION", "BundleError", "Decoder",
           "FmriDecoder", "Gallery", "MegDecoder", "encode_batches", "model_card",
           "predict_split", "read_bundle_config"]
