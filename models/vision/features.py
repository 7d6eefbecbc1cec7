"""Features of image batches from the shipped networks, as the reconstruction metrics
(MindEye's protocol) and the choices scored with them compute them: AlexNet conv maps and FID
InceptionV3 pool features, images as uint8 ``(n, h, w, 3)`` arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from neurorecon.models.common.logging import progress

from .alexnet import IMAGENET_MEAN, IMAGENET_STD, LAYERS, load_alexnet
from .inception import FidInceptionV3

#: MindEye's AlexNet input: short side resized to this (bilinear)
ALEXNET_SIZE = 256


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (height, width) of torchvision's ``Resize(size)``: short side -> ``size``."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8 ``(n, h, w, 3)`` -> float32 ``(n, 3, h, w)`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).float() / 255.0


def resize_short(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``(n, 3, h, w)`` so the short side is ``size``.

    Same as torchvision's ``Resize(size, BILINEAR)`` on float tensors in the versions MindEye
    used (no antialiasing for tensors; ``align_corners=False``).
    """
    out = short_side_size(x.shape[-2], x.shape[-1], size)
    if tuple(x.shape[-2:]) == out:
        return x
    return torch.nn.functional.interpolate(x, size=out, mode="bilinear", align_corners=False,
                                           antialias=False)


def image_chunks(x: np.ndarray, *, batch_size: int, desc: str):
    """Yield consecutive slices of ``batch_size`` images, with a progress bar."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, len(x), int(batch_size))
    for start in progress(starts, desc=desc, total=len(starts)):
        yield x[start : start + int(batch_size)]


def alexnet_features(*batches: np.ndarray, layers: Sequence[int], batch_size: int,
                     device: str) -> list[dict[int, np.ndarray]]:
    """Flattened AlexNet conv features, one ``{layer: (n, n_features)}`` per batch.

    The network is loaded once and run once per image up to the deepest requested layer.
    """
    model = load_alexnet(layer=f"conv{max(layers)}").to(device)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ends = {layer: LAYERS[f"conv{layer}"] + 1 for layer in sorted(layers)}
    results = []
    for batch in batches:
        out: dict[int, list[np.ndarray]] = {layer: [] for layer in ends}
        with torch.no_grad():
            for chunk in image_chunks(batch, batch_size=batch_size, desc="AlexNet features"):
                x = ((resize_short(to_tensor(chunk), ALEXNET_SIZE) - mean) / std).to(device)
                start = 0
                for layer, end in ends.items():
                    x = model.features[start:end](x)
                    start = end
                    out[layer].append(x.float().cpu().flatten(1).numpy())
        results.append({layer: np.concatenate(chunks) for layer, chunks in out.items()})
    return results


def inception_features(*batches: np.ndarray, batch_size: int,
                       device: str) -> list[np.ndarray]:
    """FID InceptionV3 pool features ``(n, 2048)`` per batch (network loaded once)."""
    model = FidInceptionV3().to(device)
    results = []
    with torch.no_grad():
        for batch in batches:
            chunks = image_chunks(batch, batch_size=batch_size, desc="InceptionV3 features")
            results.append(np.concatenate(
                [model(to_tensor(c).to(device)).float().cpu().numpy() for c in chunks]))
    return results
