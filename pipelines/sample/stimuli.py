"""Stimulus set of the sample dataset: real photos that ship offline, as THINGS-like concepts.

Each photo is a *concept*; distinct random crops (with optional horizontal flips) of it are its
*exemplars*. Train exemplars are shown once, test exemplars are repeated (as in THINGS-MEG).
Image statistics that drive the simulated early visual response are computed here too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


def _grace_hopper() -> np.ndarray:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


#: concept name -> loader of the photo (all ship inside installed packages; no download)
CONCEPTS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "cat": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "galaxies": _skimage("hubble_deep_field"),
    "tissue": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "temple": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    "scientist": _grace_hopper,
    "cameraman": _skimage("camera"),
    "moon": _skimage("moon"),
    "coins": _skimage("coins"),
    "clock": _skimage("clock"),
    "brick": _skimage("brick"),
    "grass": _skimage("grass"),
}

CAPTIONS: dict[str, str] = {
    "astronaut": "a portrait of an astronaut in a spacesuit in front of a flag",
    "cat": "a tabby cat looking at the camera",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on a launch pad",
    "galaxies": "a deep field telescope image full of distant galaxies",
    "tissue": "a microscope image of stained tissue",
    "retina": "a photograph of the back of a human eye",
    "temple": "a chinese temple among trees",
    "flower": "a close-up of a flower with petals",
    "scientist": "a portrait of a woman in a navy uniform",
    "cameraman": "a black and white photo of a man with a camera on a tripod",
    "moon": "a grey photo of the surface of the moon",
    "coins": "old coins on a dark background",
    "clock": "a black and white photo of a wall clock",
    "brick": "a close-up of a brick wall",
    "grass": "a close-up of blades of grass",
}


def load_photo(concept: str) -> np.ndarray:
    """Return the concept's photo as an RGB uint8 array ``(height, width, 3)``."""
    img = np.asarray(CONCEPTS[concept]())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.dtype != np.uint8:  # skimage textures are uint8; binary/float photos are rescaled
        img = (255 * (img - img.min()) / max(float(np.ptp(img)), 1e-9)).astype(np.uint8)
    return img[..., :3]


def random_crop(photo: np.ndarray, *, size: int, rng: np.random.Generator) -> Image.Image:
    """A random square crop (50-90 % of the short side), random flip, resized to ``size``."""
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.5, 0.9))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    crop = photo[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BICUBIC)


def lowlevel_features(img: Image.Image | np.ndarray) -> np.ndarray:
    """Low-level statistics of an image (the drive of early visual responses).

    Returns 10 numbers: mean luminance, RMS contrast, red-green and blue-yellow means,
    luminance of the four quadrants relative to the mean (crude retinotopy), and high- and
    low-spatial-frequency energy (log).
    """
    a = np.asarray(img, dtype=np.float64) / 255.0
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    lum = 0.299 * r + 0.587 * g + 0.114 * b
    h, w = lum.shape
    quads = [lum[: h // 2, : w // 2], lum[: h // 2, w // 2 :], lum[h // 2 :, : w // 2],
             lum[h // 2 :, w // 2 :]]
    spec = np.abs(np.fft.fftshift(np.fft.fft2(lum - lum.mean()))) ** 2
    yy, xx = np.indices(spec.shape)
    radius = np.hypot(yy - h / 2, xx - w / 2) / (min(h, w) / 2)
    low = np.log1p(spec[(radius > 0.02) & (radius < 0.15)].sum())
    high = np.log1p(spec[radius > 0.4].sum())
    return np.array(
        [lum.mean(), lum.std(), (r - g).mean(), (b - (r + g) / 2).mean(),
         *[q.mean() - lum.mean() for q in quads], high, low]
    )


def make_stimuli(
    out_dir: str | Path,
    *,
    n_concepts: int,
    n_train_exemplars: int,
    n_test_exemplars: int,
    image_size: int,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Write exemplar images under ``out_dir/<concept>/`` and return the stimulus table.

    Columns: ``stim_file`` (relative to ``out_dir``), ``concept``, ``exemplar``, ``split``,
    ``caption`` and the low-level features ``ll0..ll9`` (z-scored across the set).
    """
    if not 2 <= n_concepts <= len(CONCEPTS):
        raise ValueError(f"n_concepts must be in [2, {len(CONCEPTS)}], got {n_concepts}")
    out_dir = Path(out_dir)
    rows = []
    for concept in list(CONCEPTS)[:n_concepts]:
        photo = load_photo(concept)
        (out_dir / concept).mkdir(parents=True, exist_ok=True)
        n_total = n_train_exemplars + n_test_exemplars
        for k in range(n_total):
            img = random_crop(photo, size=image_size, rng=rng)
            rel = f"{concept}/{concept}_{k + 1:02d}.jpg"
            img.save(out_dir / rel, quality=92)
            rows.append({
                "stim_file": rel,
                "concept": concept,
                "exemplar": k + 1,
                "split": "test" if k >= n_train_exemplars else "train",
                "caption": CAPTIONS[concept],
                "features": lowlevel_features(img),
            })
    table = pd.DataFrame(rows)
    feats = np.stack(table.pop("features").to_numpy())
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-12)
    for j in range(feats.shape[1]):
        table[f"ll{j}"] = feats[:, j]
    return table


def trial_sequence(
    stimuli: pd.DataFrame, *, n_test_repeats: int, n_runs: int, rng: np.random.Generator
) -> list[pd.DataFrame]:
    """Split a shuffled THINGS-like trial list into runs.

    Train exemplars appear once in total, test exemplars ``n_test_repeats`` times (spread over
    runs). Returns one stimulus table per run, in presentation order.
    """
    train = stimuli[stimuli["split"] == "train"]
    test = stimuli[stimuli["split"] == "test"]
    trials = pd.concat([train, *([test] * n_test_repeats)], ignore_index=True)
    trials = trials.iloc[rng.permutation(len(trials))].reset_index(drop=True)
    return [trials.iloc[idx].reset_index(drop=True)
            for idx in np.array_split(np.arange(len(trials)), n_runs)]
