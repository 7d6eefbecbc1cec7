"""The embedded generator: a small diffusion model conditioned on an image embedding.

No diffusion weights exist offline, so neurorecon trains its own (on the train-split
stimulus images and their own embeddings, never on brain data, validation or test images)
and drives it with brain-decoded embeddings at inference. It is built from diffusers parts: a
``UNet2DConditionModel`` whose timestep embedding is augmented with a projection of the image
embedding (``class_embed_type="projection"``, as in Stable unCLIP), a DDPM training noise
schedule (x0-prediction by default: clean, if smooth, images after little training) with an EMA
of the weights, a DDIM sampler, classifier-free guidance (the all-zeros embedding is the
unconditional input, used with probability ``p_uncond`` in training), and img2img from a
low-level initial image.
``save_pretrained`` / ``from_pretrained`` round-trip a directory like any diffusers pipeline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from PIL import Image

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import progress

from .base import check_embeddings, check_images, img2img_steps, load_quietly

NOTE = ("embedded conditional diffusion model trained by neurorecon on the train-split "
        "stimulus images and their embeddings (a low-resolution stand-in for Stable unCLIP / "
        "Versatile Diffusion; no diffusion weights exist offline)")


def make_unet(*, emb_dim: int, resolution: int = 32,
              block_out_channels: tuple[int, ...] = (32, 64, 64)) -> UNet2DConditionModel:
    """A small UNet conditioned on an embedding through its timestep embedding."""
    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
        mid_block_type="UNetMidBlock2D", norm_num_groups=8, cross_attention_dim=8,
        class_embed_type="projection", projection_class_embeddings_input_dim=emb_dim,
    )


def to_tensor(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """PIL images -> ``(n, 3, resolution, resolution)`` float tensor in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((resolution, resolution),
                                                        Image.BICUBIC), np.float32)
                    for im in images])
    return torch.from_numpy(arr / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """``(n, 3, H, W)`` in [-1, 1] -> PIL images."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


class EmbeddingDiffusionPipeline(DiffusionPipeline):
    """Image embedding (+ optional initial image) -> image.

    Parameters
    ----------
    unet : UNet2DConditionModel
        Noise predictor; ``class_labels`` carry the embedding ``(batch, emb_dim)``.
    scheduler : DDIMScheduler
        Sampler (any diffusers scheduler with ``set_timesteps``/``step``/``add_noise``).
    """

    def __init__(self, unet: UNet2DConditionModel, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def emb_dim(self) -> int:
        return int(self.unet.config.projection_class_embeddings_input_dim)

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size)

    def _model_output(self, x: torch.Tensor, t, emb: torch.Tensor,
                      guidance_scale: float) -> torch.Tensor:
        """UNet output (noise, sample or velocity, per the scheduler) with CFG."""
        ctx = torch.zeros(len(x), 1, self.unet.config.cross_attention_dim, dtype=x.dtype)
        if guidance_scale == 1.0:
            return self.unet(x, t, encoder_hidden_states=ctx, class_labels=emb).sample
        both = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([ctx, ctx]),
                         class_labels=torch.cat([torch.zeros_like(emb), emb])).sample
        uncond, cond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def __call__(self, image_embeds: torch.Tensor, *, num_inference_steps: int = 25,
                 guidance_scale: float = 3.0, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None, image: torch.Tensor | None = None,
                 strength: float = 0.8, output_type: str = "pil") -> ImagePipelineOutput:
        """Sample images for ``image_embeds (n, emb_dim)``.

        ``noise (n, 3, H, W)`` fixes the starting noise (else drawn with ``generator``);
        ``image (n, 3, H, W)`` in [-1, 1] starts the sampling part-way (img2img,
        ``strength`` = fraction of the steps that are run).
        """
        emb = image_embeds.to(self.unet.dtype)
        n, res = len(emb), self.resolution
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        if noise is None:
            noise = torch.randn((n, 3, res, res), generator=generator, dtype=emb.dtype)
        if image is None:
            x = noise * self.scheduler.init_noise_sigma
        else:
            n_run = img2img_steps(strength, num_inference_steps)
            timesteps = timesteps[num_inference_steps - n_run:]
            x = self.scheduler.add_noise(image.to(emb.dtype), noise, timesteps[:1].repeat(n))
        for t in self.progress_bar(timesteps):
            out = self._model_output(x, t, emb, guidance_scale)
            x = self.scheduler.step(out, t, x).prev_sample
        return ImagePipelineOutput(images=to_pil(x) if output_type == "pil" else x)


class EmbeddingDiffusionGenerator:
    """The :class:`~neurorecon.models.generators.base.Generator` over a saved pipeline dir.

    Parameters
    ----------
    path : str | Path
        Directory written by ``EmbeddingDiffusionPipeline.save_pretrained``.
    """

    note = NOTE
    embedding_scale = "unit"  # trained on unit-normalised embeddings

    def __init__(self, *, path: str | Path):
        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise DataError("no trained generator here (model_index.json missing)", path=path,
                            hint="train one with `neurorecon reconstruct` (generator=embedded)")
        self.path = path
        self.pipe = load_quietly(EmbeddingDiffusionPipeline, path)
        self.emb_dim, self.resolution = self.pipe.emb_dim, self.pipe.resolution

    def generate(self, embeddings: np.ndarray, *, seed: int = 0, steps: int = 25,
                 guidance_scale: float = 3.0, init_images: list[Image.Image] | None = None,
                 strength: float = 0.8, text_embeddings: np.ndarray | None = None,
                 batch_size: int = 16) -> list[Image.Image]:
        """Embeddings ``(n, emb_dim)`` -> images; image ``i`` uses seed ``seed + i``.

        The embedded model is conditioned on the image embedding only: passing
        ``text_embeddings`` raises (use a diffusers backend for the caption pathway).
        """
        emb = check_embeddings(embeddings, emb_dim=self.emb_dim, what="embedded generator")
        if text_embeddings is not None:
            raise DataError("the embedded generator takes no text embeddings (it is "
                            "conditioned on the image embedding only)",
                            hint="use generator=stable_unclip or ip_adapter for captions")
        if init_images is not None:
            check_images(init_images, what="initial images")
            if len(init_images) != len(emb):
                raise ValueError(f"{len(init_images)} initial images for {len(emb)} embeddings")
        res = self.resolution
        out: list[Image.Image] = []
        for start in progress(range(0, len(emb), batch_size), desc="generate batches",
                              total=-(-len(emb) // batch_size)):
            rows = range(start, min(start + batch_size, len(emb)))
            # per-image noise from its own seed: results do not depend on the batch size
            noise = torch.cat([torch.randn((1, 3, res, res),
                                           generator=torch.Generator().manual_seed(seed + i))
                               for i in rows])
            init = None if init_images is None else to_tensor(
                [init_images[i] for i in rows], res)
            out += self.pipe(torch.from_numpy(emb[rows.start:rows.stop]),
                             num_inference_steps=steps, guidance_scale=guidance_scale,
                             noise=noise, image=init, strength=strength).images
        return out
