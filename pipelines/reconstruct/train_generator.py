"""Train the embedded generator on stimulus images and their own embeddings (no brain data)."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from PIL import Image

from neurorecon.models.common.checks import check_option
from neurorecon.models.common.logging import logger, progress
from neurorecon.models.generators.embedding_diffusion import (
    EmbeddingDiffusionPipeline,
    make_unet,
    to_tensor,
)


def train_embedding_diffusion(
    images: list[Image.Image],
    embeddings: np.ndarray,
    *,
    resolution: int = 32,
    block_out_channels: tuple[int, ...] = (16, 32, 32),
    steps: int = 1200,
    batch_size: int = 16,
    lr: float = 1e-3,
    p_uncond: float = 0.1,
    prediction_type: str = "sample",
    ema_decay: float | None = 0.995,
    seed: int = 0,
) -> tuple[EmbeddingDiffusionPipeline, dict]:
    """DDPM training of :func:`make_unet` to denoise ``images`` given their ``embeddings``.

    Embeddings are L2-normalised per row by the caller's convention (the same transform is
    applied to brain-decoded embeddings at inference). Horizontal flips augment the images.
    ``prediction_type`` is the UNet's target: ``"sample"`` (x0, the default: on a few hundred
    images and ~1000 steps it gives clean if smooth images), ``"epsilon"`` (noise; needs far
    more training before samples stop being noisy) or ``"v_prediction"``. ``ema_decay``
    (None: off) keeps an exponential moving average of the weights, which the saved model
    uses. The learning rate warms up over 100 steps, then follows a cosine decay.
    Returns the pipeline (DDIM sampler) and training figures (seconds, final loss).
    """
    # its own random stream (UNet init, batches, noise): training the generator when its
    # cache is cold must not shift the random state of what runs after it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        from diffusers import DDIMScheduler, DDPMScheduler
        from diffusers.training_utils import EMAModel

        check_option("prediction_type", prediction_type, ("sample", "epsilon", "v_prediction"))
        gen = torch.Generator().manual_seed(seed)
        x0_all = to_tensor(images, resolution)
        emb_all = torch.as_tensor(np.asarray(embeddings, np.float32))
        unet = make_unet(emb_dim=emb_all.shape[1], resolution=resolution,
                         block_out_channels=block_out_channels)
        noise_schedule = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                       prediction_type=prediction_type)
        opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
        ema = None if not ema_decay else EMAModel(unet.parameters(), decay=ema_decay,
                                                  use_ema_warmup=True)
        ctx = torch.zeros(batch_size, 1, unet.config.cross_attention_dim)
        unet.train()
        t0, losses = time.perf_counter(), []
        for _ in progress(range(steps), desc="train generator"):
            idx = torch.randint(0, len(x0_all), (batch_size,), generator=gen)
            x0, emb = x0_all[idx], emb_all[idx]
            flip = torch.rand(batch_size, generator=gen) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            drop = torch.rand(batch_size, generator=gen) < p_uncond
            emb = torch.where(drop[:, None], torch.zeros_like(emb), emb)
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch_size,),
                              generator=gen)
            xt = noise_schedule.add_noise(x0, noise, t)
            pred = unet(xt, t, encoder_hidden_states=ctx, class_labels=emb).sample
            if prediction_type == "epsilon":
                target = noise
            elif prediction_type == "sample":
                target = x0
            else:
                target = noise_schedule.get_velocity(x0, noise, t)
            loss = torch.nn.functional.mse_loss(pred, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.step(unet.parameters())
            losses.append(loss.item())
        if ema is not None:
            ema.copy_to(unet.parameters())
        unet.eval()
        seconds = time.perf_counter() - t0
        info = {"steps": steps, "seconds": round(seconds, 1), "resolution": resolution,
                "final_loss": float(np.mean(losses[-50:])), "n_images": len(images)}
        logger.info("generator: %d steps in %.0f s, final loss %.4f", steps, seconds,
                    info["final_loss"])
        pipe = EmbeddingDiffusionPipeline(unet=unet, scheduler=DDIMScheduler.from_config(
            noise_schedule.config))
        return pipe, info
