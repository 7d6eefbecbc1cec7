"""Stable Diffusion + IP-Adapter loaded from local directories: CLIP image embeddings -> images.

A thin wrapper over :class:`diffusers.StableDiffusionPipeline` with
:meth:`~diffusers.loaders.IPAdapterMixin.load_ip_adapter`. The brain-decoded embeddings are
passed as ``ip_adapter_image_embeds``: a list with one tensor per adapter (we load one) of shape
``(2 n, 1, emb_dim)`` under classifier-free guidance (``guidance_scale > 1``): the unconditional
half first, zero embeddings, which is what the pipeline itself uses for pooled embeddings; or
``(n, 1, emb_dim)`` without guidance. The prompt is empty unless text embeddings are given.

Only the basic IP-Adapter (an ``ImageProjection`` of the *pooled* CLIP image embedding, e.g.
``h94/IP-Adapter`` ``models/ip-adapter_sd15.safetensors``, 1024-d ViT-H embeddings) fits
decoded embeddings; "Plus"/"Full" adapters take CLIP hidden states and are refused.
The adapter's image encoder is never loaded (``image_encoder_folder=None``).

Low-level pathway: with ``init_images`` the same components run through
:class:`diffusers.StableDiffusionImg2ImgPipeline` (``from_pipe``, no copy of the weights), with
``strength`` the fraction of the schedule that is re-noised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger, progress

from .base import check_embeddings, check_images
from .diffusers_unclip import (
    check_pipeline_dir,
    check_text_embeddings,
    encode_captions,
    load_pipeline,
    resolve_model_dir,
    seeded_generators,
)

SD_COMPONENTS = ("tokenizer", "text_encoder", "unet", "scheduler", "vae")
#: state-dict key of the basic IP-Adapter image projection, shape (4 * cross_attention_dim, emb)
PROJ_KEY = "image_proj.proj.weight"


class IpAdapterGenerator:
    """Stable Diffusion + IP-Adapter from local directories.

    Parameters
    ----------
    path : str | Path
        Stable Diffusion pipeline directory (``save_pretrained`` layout, e.g. a local copy of
        ``stable-diffusion-v1-5``) or a Hugging Face cache folder of it.
    ip_adapter_path : str | Path
        Directory holding the IP-Adapter weights (e.g. a local copy of ``h94/IP-Adapter``).
    ip_adapter_weight_name : str
        Weight file name, e.g. ``"ip-adapter_sd15.safetensors"``.
    ip_adapter_subfolder : str
        Folder of the weight file inside ``ip_adapter_path`` (``"models"`` in ``h94/IP-Adapter``;
        ``""`` for none).
    scale : float
        IP-Adapter scale (weight of the image tokens in cross-attention).
    revision : str | None
        Snapshot of ``path`` when it is a Hugging Face cache folder; recorded in :attr:`note`.
    dtype : {"float32", "float16", "bfloat16"}
        Weights dtype (float32 on CPU).
    device : str
        Torch device, e.g. ``"cpu"`` or ``"cuda"``.

    Attributes
    ----------
    emb_dim : int
        Image-embedding size the adapter's projection takes.
    resolution : int
        Output image side in pixels (``unet.sample_size * vae_scale_factor``).
    note : str
        What model this is.
    """

    embedding_scale = "raw"  # CLIP image_embeds as the CLIP vision model outputs them

    def __init__(self, *, path: str | Path, ip_adapter_path: str | Path,
                 ip_adapter_weight_name: str, ip_adapter_subfolder: str = "models",
                 scale: float = 1.0, revision: str | None = None, dtype: str = "float32",
                 device: str = "cpu"):
        from diffusers import StableDiffusionPipeline
        from diffusers.models.embeddings import ImageProjection
        from diffusers.utils import is_accelerate_available

        what = "Stable Diffusion weights"
        self.path = resolve_model_dir(path, revision=revision, what=what)
        check_pipeline_dir(self.path, required=SD_COMPONENTS, what=what)
        adapter_dir = resolve_model_dir(ip_adapter_path, what="IP-Adapter weights")
        weight_file = adapter_dir / ip_adapter_subfolder / ip_adapter_weight_name
        if not weight_file.is_file():
            raise DataError("IP-Adapter weight file not found", path=weight_file,
                            hint="check ip_adapter_path, ip_adapter_subfolder and "
                                 "ip_adapter_weight_name (e.g. models/ip-adapter_sd15.safetensors)")
        self.revision = revision
        self.device = device
        self.scale = float(scale)
        self.pipe = load_pipeline(StableDiffusionPipeline, self.path, dtype=dtype, device=device,
                                  what=what)
        cross_dim = int(self.pipe.unet.config.cross_attention_dim)
        if weight_file.suffix == ".safetensors":
            _check_adapter_file(weight_file, cross_attention_dim=cross_dim)
        self.pipe.load_ip_adapter(str(adapter_dir), subfolder=ip_adapter_subfolder,
                                  weight_name=ip_adapter_weight_name, image_encoder_folder=None,
                                  local_files_only=True,
                                  low_cpu_mem_usage=is_accelerate_available())  # see load_quietly
        self.pipe.set_ip_adapter_scale(self.scale)
        projection = self.pipe.unet.encoder_hid_proj.image_projection_layers[0]
        if not isinstance(projection, ImageProjection):
            raise DataError(f"IP-Adapter {type(projection).__name__} takes CLIP hidden states, "
                            "not pooled image embeddings", path=weight_file,
                            hint="use a basic IP-Adapter (e.g. ip-adapter_sd15.safetensors)")
        self.emb_dim = int(projection.image_embeds.in_features)
        self.resolution = int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)
        self.text_hidden_size = int(self.pipe.text_encoder.config.hidden_size)
        self._img2img = None
        rev = f"@{revision}" if revision else ""
        self.note = (f"Stable Diffusion (diffusers StableDiffusionPipeline) from {self.path}{rev} "
                     f"+ IP-Adapter {weight_file} (scale {self.scale}); conditioned on "
                     f"{self.emb_dim}-d CLIP image embeddings, empty prompt")
        logger.info("loaded %s", self.note)

    def _img2img_pipe(self):
        """The img2img pipeline sharing this pipeline's components (built once)."""
        if self._img2img is None:
            from diffusers import StableDiffusionImg2ImgPipeline

            self._img2img = StableDiffusionImg2ImgPipeline.from_pipe(self.pipe)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    def encode_captions(self, captions: list[str]) -> np.ndarray:
        """Captions -> this pipeline's ``prompt_embeds`` (the caption pathway's targets)."""
        return encode_captions(self.pipe, captions, device=self.device)

    def generate(self, embeddings: np.ndarray, *, seed: int = 0, steps: int = 25,
                 guidance_scale: float = 3.0, init_images: list[Image.Image] | None = None,
                 strength: float = 0.8, text_embeddings: np.ndarray | None = None,
                 batch_size: int = 4) -> list[Image.Image]:
        """Generate one image per embedding.

        Parameters
        ----------
        embeddings : np.ndarray, shape (n, emb_dim)
            Predicted CLIP image embeddings (passed as ``ip_adapter_image_embeds``).
        seed : int
            Image ``i`` uses a generator seeded with ``seed + i`` (independent of batching).
        steps : int
            Denoising steps (with ``init_images``, about ``strength * steps`` are run).
        guidance_scale : float
            Classifier-free guidance weight (> 1 enables guidance; unconditional branch: zero
            image embeddings and the empty prompt).
        init_images : list of PIL.Image.Image | None
            Low-level init images, one per embedding, all one size; resized to
            ``resolution`` px. None = start from noise.
        strength : float
            Img2img strength in (0, 1]: 1 = ignore the init image.
        text_embeddings : np.ndarray, shape (n, seq_len, hidden_size) | None
            Optional text-encoder hidden states passed as ``prompt_embeds``; None = empty prompt.
        batch_size : int
            Images per pipeline call.

        Returns
        -------
        list of PIL.Image.Image
            ``n`` RGB images of ``resolution`` x ``resolution`` px.
        """
        import torch

        what = "IP-Adapter generator"
        emb = check_embeddings(embeddings, emb_dim=self.emb_dim, what=what)
        n = len(emb)
        text = check_text_embeddings(text_embeddings, n=n, hidden_size=self.text_hidden_size,
                                     what=what)
        if init_images is not None:
            if len(init_images) != n:
                raise DataError(f"{what}: {len(init_images)} init images for {n} embeddings",
                                hint="pass one init image per embedding")
            check_images(init_images, what=what)
            if not 0.0 < strength <= 1.0:
                raise ValueError(f"strength must be in (0, 1]; got {strength}")
            size = (self.resolution, self.resolution)
            init_images = [im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
                           for im in init_images]
        pipe = self.pipe if init_images is None else self._img2img_pipe()
        # the pipelines' own `do_classifier_free_guidance` rule (no CFG for LCM-style UNets)
        cfg = guidance_scale > 1.0 and self.pipe.unet.config.time_cond_proj_dim is None
        dtype = self.pipe.unet.dtype
        images: list[Image.Image] = []
        for start in progress(range(0, n, batch_size), desc="IP-Adapter batches",
                              total=-(-n // batch_size)):
            stop = min(start + batch_size, n)
            cond = torch.from_numpy(emb[start:stop]).to(self.device, dtype)[:, None, :]
            if cfg:
                cond = torch.cat([torch.zeros_like(cond), cond])
            kwargs = {"prompt": [""] * (stop - start)}
            if text is not None:
                kwargs = {"prompt_embeds": torch.from_numpy(text[start:stop]).to(
                    self.device, dtype)}
            if init_images is None:
                kwargs.update(height=self.resolution, width=self.resolution)
            else:
                kwargs.update(image=init_images[start:stop], strength=strength)
            out = pipe(ip_adapter_image_embeds=[cond], num_inference_steps=steps,
                       guidance_scale=guidance_scale, output_type="pil",
                       generator=seeded_generators(seed, start, stop), **kwargs)
            images.extend(out.images)
        return images


def _check_adapter_file(weight_file: Path, *, cross_attention_dim: int) -> None:
    """Refuse adapter files that are not a basic IP-Adapter for this UNet (reads the header)."""
    from safetensors import safe_open

    with safe_open(str(weight_file), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        if PROJ_KEY not in keys:
            raise DataError(
                "not a basic IP-Adapter weight file (no 'image_proj.proj.weight'): Plus/Full/"
                "FaceID adapters take CLIP hidden states, not pooled image embeddings",
                path=weight_file, hint="use e.g. ip-adapter_sd15.safetensors")
        rows = f.get_slice(PROJ_KEY).get_shape()[0]
    if rows != 4 * cross_attention_dim:
        raise DataError(
            f"IP-Adapter projects to cross-attention size {rows // 4}, but the Stable Diffusion "
            f"UNet uses {cross_attention_dim}", path=weight_file,
            hint="use the IP-Adapter trained for this Stable Diffusion version (sd15 vs sdxl)")
