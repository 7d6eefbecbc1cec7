"""The generator interface every reconstruction backend follows.

A generator turns image embeddings (decoded from the brain) into images. Optional inputs:
low-level initial images (img2img, Brain-Diffuser / Takagi style) and text embeddings where
the backend takes them. ``note`` says what model it is and whether it stands in for the one a
paper used; every output that uses it carries the note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from neurorecon.models.common.checks import DataError


@runtime_checkable
class Generator(Protocol):
    """Embeddings ``(n, emb_dim)`` -> ``n`` PIL images of ``resolution`` px."""

    emb_dim: int
    resolution: int
    note: str
    #: the scale of the embeddings it was trained on: "unit" (L2-normalised rows) or "raw"
    #: (the embedder's own scale, e.g. CLIP ``image_embeds`` for Stable unCLIP)
    embedding_scale: str

    def generate(self, embeddings: np.ndarray, *, seed: int = 0, steps: int = 25,
                 guidance_scale: float = 3.0, init_images: list[Image.Image] | None = None,
                 strength: float = 0.8, text_embeddings: np.ndarray | None = None,
                 batch_size: int = 4) -> list[Image.Image]:
        ...


def img2img_steps(strength: float, steps: int) -> int:
    """Sampler steps an img2img start runs: the last ``strength`` of a ``steps``-step
    schedule, at least one."""
    return max(1, min(steps, int(round(strength * steps))))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm: the embedded generator is trained and sampled on
    unit-normalised embeddings (zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def conditioning(embeddings: np.ndarray, *, scale: str, target_norm: float) -> np.ndarray:
    """Decoded embeddings in the scale a generator was trained on.

    Decoded embeddings carry direction, not a trustworthy norm: rows are unit-normalised, then,
    for a ``"raw"``-scale generator (Stable unCLIP, IP-Adapter: real CLIP ``image_embeds``),
    multiplied by ``target_norm``, the mean L2 norm of the training targets.
    """
    unit = unit_rows(embeddings)
    if scale == "unit":
        return unit
    if scale == "raw":
        return unit * np.float32(target_norm)
    raise ValueError(f"embedding scale must be 'unit' or 'raw', got {scale!r}")


def load_quietly(pipeline_cls: type, path: str | Path, **kwargs: Any):
    """``pipeline_cls.from_pretrained(path, local_files_only=True, **kwargs)`` without diffusers'
    console output: no "Loading pipeline components" bar (the caller logs what it loaded) and no
    bar when the pipeline is called (``logging.progress`` draws one over batches instead).

    Low-memory loading is asked for only where ``accelerate`` is installed: diffusers defaults to
    it and, without ``accelerate``, warns on every load before falling back to normal loading.
    """
    from diffusers.utils import is_accelerate_available
    from diffusers.utils import logging as diffusers_logging

    kwargs.setdefault("low_cpu_mem_usage", is_accelerate_available())
    bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        pipe = pipeline_cls.from_pretrained(path, local_files_only=True, **kwargs)
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_embeddings(embeddings: np.ndarray, *, emb_dim: int, what: str) -> np.ndarray:
    """Return ``embeddings`` as float32 ``(n, emb_dim)`` or raise a clear DataError."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] != emb_dim:
        raise DataError(
            f"{what} takes embeddings of shape (n, {emb_dim}); got {tuple(emb.shape)}",
            hint="decode embeddings with the embedder the generator was trained/conditioned on")
    if not np.isfinite(emb).all():
        raise DataError(f"{what}: embeddings contain NaN or inf")
    return emb


def check_images(images: list[Image.Image], *, what: str) -> tuple[int, int]:
    """Raise DataError unless all ``images`` share one size; return it."""
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise DataError(f"{what}: images of mixed sizes {sorted(sizes)}",
                        hint="resize all images to one size first")
    return sizes.pop()


#: side (pixels) of the low-level pathway's colour thumbnails
THUMB = 8


def image_thumbnails(images: list[Image.Image], *, size: int = THUMB) -> np.ndarray:
    """Coarse colour thumbnails as regression targets: ``(n, size * size * 3)`` in [0, 1]
    (box-filtered RGB), the low-level pathway's targets (Brain-Diffuser / Takagi style)."""
    return np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BOX),
                                np.float32).ravel() / 255 for im in images])


def thumbnails_to_images(pred: np.ndarray, *, resolution: int,
                         size: int = THUMB) -> list[Image.Image]:
    """Predicted thumbnails ``(n, size * size * 3)`` -> img2img starting images, upsampled
    (bicubic) to ``resolution`` px."""
    pred = np.asarray(pred, np.float32)
    return [Image.fromarray((np.clip(p, 0, 1).reshape(size, size, 3) * 255).astype(np.uint8))
            .resize((resolution, resolution), Image.BICUBIC) for p in pred]


#: img2img starting images of a reconstruction (``reconstruct.start``): the low-level
#: pathway's thumbnail, the retrieved training images (:func:`retrieved_starts`), none
START_IMAGES = ("lowlevel", "retrieved", "noise")


def retrieved_starts(queries: np.ndarray, candidates: np.ndarray, images: list[Image.Image], *,
                     k: int, resolution: int, temperature: float = 0.05,
                     coarse: list[Image.Image] | None = None, rerank: float = 0.0,
                     shortlist: int = 8, layouts: np.ndarray | None = None,
                     exclude: np.ndarray | None = None) -> list[Image.Image]:
    """Retrieval-augmented img2img starting images (RDM, kNN-Diffusion).

    For each query embedding, the ``k`` best candidates by :func:`start_scores` (cosine, with
    ``coarse`` re-ranked by the low-level pathway); their ``images`` blended with softmax
    weights of the scores (``temperature``: one clear neighbour dominates, close ones
    average), at ``resolution`` px. ``candidates`` are the start candidates' (training images')
    embeddings, ``images`` those images; ``coarse`` the low-level pathway's predicted images,
    row-aligned with ``queries``; ``layouts`` the images' :func:`image_thumbnails` where the
    caller keeps them (computed here otherwise, when ``coarse`` re-ranks); ``exclude``: per
    query, a candidate never picked (:func:`start_scores`).
    """
    if len(candidates) != len(images):
        raise ValueError(f"{len(candidates)} candidate embeddings for {len(images)} images")
    k = max(1, min(int(k), len(images)))
    reranked = coarse is not None and rerank > 0
    if reranked and layouts is None:
        layouts = image_thumbnails(images)
    scores = start_scores(queries, candidates, layouts=layouts if reranked else None,
                          predicted=image_thumbnails(coarse) if reranked else None,
                          rerank=rerank, shortlist=max(k, int(shortlist)), exclude=exclude)
    top = np.argsort(-scores, axis=1)[:, :k]
    pixels = {int(i): np.asarray(images[i].convert("RGB").resize(
        (resolution, resolution), Image.BICUBIC), np.float64) for i in np.unique(top)}
    out = []
    for row, idx in zip(scores, top, strict=True):
        w = np.exp((row[idx] - row[idx].max()) / temperature)
        blend = sum(wi * pixels[i] for wi, i in zip(w / w.sum(), idx, strict=True))
        out.append(Image.fromarray(np.clip(blend, 0, 255).astype(np.uint8)))
    return out


def start_scores(queries: np.ndarray, candidates: np.ndarray, *,
                 layouts: np.ndarray | None = None, predicted: np.ndarray | None = None,
                 rerank: float = 0.0, shortlist: int = 8,
                 exclude: np.ndarray | None = None) -> np.ndarray:
    """``(n_queries, n_candidates)`` scores by which retrieved starts are chosen.

    Cosine between query and candidate embeddings. With ``predicted`` (the low-level
    pathway's thumbnails of the queries' trials, :func:`image_thumbnails`), ``layouts`` (the
    candidates' thumbnails) and ``rerank > 0``, the ``shortlist`` best by cosine gain
    ``rerank`` x the Pearson correlation of their thumbnail with the predicted one, and the
    others drop out (-inf): of the training images the semantic embedding points to, the one
    whose layout and colour the low-level pathway predicts (two decoded inputs, as Takagi &
    Nishimoto combine them). ``exclude``: a candidate per query that is never chosen (its own
    image, when choosing the weight on validation trials).
    """
    q, c = unit_rows(np.asarray(queries, np.float64)), unit_rows(np.asarray(candidates,
                                                                            np.float64))
    scores = q @ c.T
    if exclude is not None:
        scores[np.arange(len(q)), np.asarray(exclude, int)] = -np.inf
    if predicted is None or layouts is None or rerank <= 0:
        return scores
    if len(predicted) != len(q):
        raise ValueError(f"{len(predicted)} low-level images for {len(q)} queries")
    near = np.argsort(-scores, axis=1)[:, :max(1, int(shortlist))]
    bonus = np.einsum("rkp,rp->rk", centred_unit(layouts)[near], centred_unit(predicted))
    shortlisted = np.take_along_axis(scores, near, axis=1) + rerank * bonus
    out = np.full_like(scores, -np.inf)
    np.put_along_axis(out, near, shortlisted, axis=1)
    return out


def centred_unit(x: np.ndarray) -> np.ndarray:
    """Rows minus their mean, scaled to unit norm: dot products are Pearson correlations."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
