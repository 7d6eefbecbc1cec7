"""The generator of a run and the pathways that feed it from brain data.

:func:`build_generator` gives the configured generator (a pretrained diffusers backend from
local directories, or the embedded generator trained on the training-split stimuli and cached);
the low-level pathway (ridge from brain data to a coarse colour thumbnail, Brain-Diffuser /
Takagi style) gives img2img starting images; the caption pathway (ridge to the generator's
caption embeddings) gives text conditioning. Scoring reconstructions of a test set is
:mod:`neurorecon.pipelines.evaluate.reconstruction`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger
from neurorecon.models.generators.base import (
    image_thumbnails,
    thumbnails_to_images,
    unit_rows,
)

from ..common.cache import cache_entry

#: keys of the embedded generator config that define the trained model (its cache key)
TRAINING_KEYS = ("resolution", "block_out_channels", "prediction_type", "ema_decay",
                 "train_steps", "batch_size", "lr", "p_uncond", "seed")


def build_generator(gen_cfg: DictConfig, *, images: list[Image.Image],
                    embeddings: np.ndarray, cache_dir: str | Path):
    """The configured generator and its training figures (None for a pretrained one).

    A config with ``_target_`` is a pretrained backend loaded from local directories
    (``reconstruct/generator=stable_unclip`` / ``ip_adapter``); otherwise it is the recipe of
    the embedded generator, trained on ``images`` / ``embeddings`` (see
    :func:`embedded_generator`).
    """
    if gen_cfg.get("_target_"):
        from hydra.utils import instantiate

        # built from a partial so the backend's own errors (missing directory...) surface
        # as they are, not wrapped by Hydra
        return instantiate(gen_cfg, _partial_=True)(), None
    return embedded_generator(gen_cfg, images=images, embeddings=embeddings,
                              cache_dir=cache_dir)


def embedded_generator(gen_cfg: DictConfig, *, images: list[Image.Image],
                       embeddings: np.ndarray, cache_dir: str | Path):
    """Train (or reuse from the cache) the embedded generator on ``images``.

    The cache key covers the training recipe and the *content* of the training images and
    embeddings, so datasets sharing a stimulus set (and embedder) share one trained generator.
    """
    import hashlib

    from neurorecon.models.generators.embedding_diffusion import EmbeddingDiffusionGenerator

    from .train_generator import train_embedding_diffusion

    cfg = OmegaConf.to_container(gen_cfg, resolve=True)
    params = {k: cfg[k] for k in TRAINING_KEYS}
    digest = hashlib.sha256(np.ascontiguousarray(embeddings, np.float32).tobytes())
    for im in images:
        digest.update(im.tobytes())
    entry = cache_entry(cache_dir, "generators", "embedded", params,
                        upstream=[digest.hexdigest()[:16]])
    if not entry.exists():
        pipe, info = train_embedding_diffusion(
            images, unit_rows(embeddings), resolution=params["resolution"],
            block_out_channels=tuple(params["block_out_channels"]),
            prediction_type=params["prediction_type"], ema_decay=params["ema_decay"],
            steps=params["train_steps"], batch_size=params["batch_size"], lr=params["lr"],
            p_uncond=params["p_uncond"], seed=params["seed"])
        with entry.writing({**params, "training": info}) as tmp:
            pipe.save_pretrained(tmp)
    else:
        logger.info("generator: reusing %s", entry.path)
        info = entry.manifest()["params"].get("training")
    return EmbeddingDiffusionGenerator(path=entry.path), info


def lowlevel_inits(dm, *, stim_images: list[Image.Image], resolution: int) -> list[Image.Image]:
    """Ridge from brain data to an 8x8 colour thumbnail of the stimulus, per test row.

    The low-level pathway of Brain-Diffuser / Takagi & Nishimoto, at thumbnail scale: the
    predicted thumbnail, upsampled, is the img2img starting image.
    """
    from ..train.ridge import ridge_predictions

    pred = ridge_predictions(dm, targets=image_thumbnails(stim_images))
    return thumbnails_to_images(pred, resolution=resolution)


def caption_pathway(dm, generator, *, stim_root: Path,
                    captions: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Caption pathway: ridge from brain data to the generator's caption ``prompt_embeds``.

    Captions come from ``<stim_root>/stimuli.tsv`` (or the ``captions`` TSV), are encoded by
    the generator's own text encoder, and a per-subject ridge predicts them for the test rows.
    Returns the predicted ``(n_test_rows, seq_len, hidden)`` and the true per-stimulus
    ``(n_stimuli, seq_len, hidden)`` text embeddings.
    """
    from ..embed.run import stimulus_table
    from ..train.ridge import ridge_predictions

    if not hasattr(generator, "encode_captions"):
        raise DataError(f"the caption pathway needs a generator with a text encoder; "
                        f"{type(generator).__name__} has none",
                        hint="use reconstruct/generator=stable_unclip or ip_adapter, or set "
                             "reconstruct.captions=false")
    index, _ = stimulus_table(Path(stim_root), dm.embedding_index["stim_file"].tolist(),
                              captions=captions, need_captions=True)
    true = generator.encode_captions(index["caption"].tolist())
    pred = ridge_predictions(dm, targets=true.reshape(len(true), -1))
    return pred.reshape(len(pred), *true.shape[1:]), true
