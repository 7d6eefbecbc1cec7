"""The generator interface every reconstruction backend follows.

A generator turns image embeddings (decoded from the brain) into images. Optional inputs:
low-level initial images (img2img, Brain-Diffuser / Takagi style) and text embeddings where
the backend takes them. ``note`` says what model it is and whether it stands in for the one a
paper used; every output that uses it carries the note.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from neurorecon.pipelines.common.checks import DataError


@runtime_checkable
class Generator(Protocol):
    """Embeddings ``(n, emb_dim)`` -> ``n`` PIL images of ``resolution`` px."""

    emb_dim: int
    resolution: int
    note: str

    def generate(self, embeddings: np.ndarray, *, seed: int = 0, steps: int = 25,
                 guidance_scale: float = 3.0, init_images: list[Image.Image] | None = None,
                 strength: float = 0.8, text_embeddings: np.ndarray | None = None,
                 batch_size: int = 4) -> list[Image.Image]:
        ...


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
