"""Stable unCLIP loaded from a local directory: CLIP image embeddings -> images.

A thin wrapper over :class:`diffusers.StableUnCLIPImg2ImgPipeline`. The brain-decoded
embeddings are passed as the pipeline's ``image_embeds`` (CLIP image embeddings, the
``projection_dim`` of its image encoder: 1024 for ``stable-diffusion-2-1-unclip``, 768 for the
``-small`` variant); the UNet is conditioned on them through its class embedding, after the
pipeline's own noise augmentation (``noise_level``).

Nothing is downloaded: the directory must hold a complete ``save_pretrained`` layout
(``model_index.json`` plus one folder per component), loaded with ``local_files_only=True``.
A Hugging Face cache folder (``models--org--name`` with ``refs/`` and ``snapshots/``) is
accepted too; ``revision`` then picks the snapshot.

The helpers :func:`resolve_model_dir`, :func:`check_pipeline_dir`, :func:`torch_dtype` and
:func:`seeded_generators` are shared with :mod:`.diffusers_ip_adapter`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from neurorecon.models.common.checks import DataError, check_option
from neurorecon.models.common.logging import logger, progress

from .base import check_embeddings, check_images, img2img_steps, load_quietly

if TYPE_CHECKING:  # heavy imports stay lazy
    import torch

#: dtype names accepted by the diffusers generators
DTYPES = ("float32", "float16", "bfloat16")

UNCLIP_COMPONENTS = ("feature_extractor", "image_encoder", "image_normalizer",
                     "image_noising_scheduler", "tokenizer", "text_encoder", "unet", "scheduler",
                     "vae")


def resolve_model_dir(path: str | Path, *, revision: str | None = None, what: str) -> Path:
    """Return the local pipeline directory for ``path`` (and ``revision``).

    Parameters
    ----------
    path : str | Path
        A ``save_pretrained`` directory, or a Hugging Face cache folder of one repository
        (``models--org--name``, holding ``refs/`` and ``snapshots/``).
    revision : str | None
        For a cache folder: a branch/tag name listed under ``refs/`` or a commit hash under
        ``snapshots/`` (default ``main``). For a plain directory it is only recorded.
    what : str
        Name used in error messages, e.g. ``"Stable unCLIP weights"``.

    Returns
    -------
    Path
        The directory to load from.

    Raises
    ------
    DataError
        If ``path`` does not exist or the revision is not in the cache folder.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(
            f"{what}: directory not found", path=path,
            hint="download the pipeline once (e.g. `huggingface-cli download <repo> --local-dir "
                 "DIR`) on a machine with internet and point the config at DIR; "
                 "neurorecon never downloads weights")
    snapshots = path / "snapshots"
    if not snapshots.is_dir() or (path / "model_index.json").is_file():
        return path
    ref = revision or "main"
    ref_file = path / "refs" / ref
    commit = ref_file.read_text().strip() if ref_file.is_file() else ref
    snapshot = snapshots / commit
    if not snapshot.is_dir():
        available = sorted(p.name for p in snapshots.iterdir())
        raise DataError(f"{what}: revision {ref!r} is not in this Hugging Face cache folder "
                        f"(snapshots: {available})", path=path,
                        hint="pass one of the snapshots as `revision`")
    return snapshot


def check_pipeline_dir(path: Path, *, required: Iterable[str], what: str,
                       class_names: Iterable[str] | None = None) -> dict:
    """Check that ``path`` is a complete diffusers pipeline directory; return its model index.

    Parameters
    ----------
    path : Path
        Directory written by ``DiffusionPipeline.save_pretrained``.
    required : iterable of str
        Components that must be present (not ``null``) in ``model_index.json``.
    what : str
        Name used in error messages.
    class_names : iterable of str | None
        Pipeline classes (``_class_name``) accepted; None accepts any.

    Returns
    -------
    dict
        The parsed ``model_index.json``.

    Raises
    ------
    DataError
        If ``model_index.json`` is missing or unreadable, declares another pipeline class,
        lacks a required component, or names a component folder that is missing or empty.
    """
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise DataError(f"{what}: model_index.json not found in the pipeline directory",
                        path=path, hint="point to the folder written by "
                                        "`DiffusionPipeline.save_pretrained` (the repository root)")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{what}: model_index.json is not valid JSON ({err})",
                        path=index_file) from err
    if class_names is not None:
        class_names = list(class_names)
        if index.get("_class_name") not in class_names:
            raise DataError(f"{what}: model_index.json declares pipeline "
                            f"{index.get('_class_name')!r}; expected one of {class_names}",
                            path=index_file)
    missing = [name for name in required if not _is_component(index.get(name))]
    if missing:
        raise DataError(f"{what}: model_index.json lacks the components {missing}",
                        path=index_file)
    for name, entry in index.items():
        if name.startswith("_") or not _is_component(entry):
            continue
        folder = path / name
        if not folder.is_dir() or not any(folder.iterdir()):
            raise DataError(f"{what}: component folder {name!r} ({entry[1]}) listed in "
                            "model_index.json is missing or empty", path=folder,
                            hint="copy the complete pipeline directory, all component folders "
                                 "included")
    return index


def _is_component(entry: object) -> bool:
    """True for a model_index entry ``[library, class]`` that names a component."""
    return isinstance(entry, list) and len(entry) == 2 and None not in entry


def torch_dtype(name: str) -> torch.dtype:
    """Return the torch dtype called ``name`` (one of :data:`DTYPES`)."""
    import torch

    check_option("dtype", name, DTYPES)
    return getattr(torch, name)


def seeded_generators(seed: int, start: int, stop: int) -> list[torch.Generator]:
    """One CPU generator per image ``i`` in ``[start, stop)``, seeded with ``seed + i``.

    Per-image generators make image ``i`` the same whatever the batch size; CPU generators make
    it the same on every device (diffusers draws the noise on CPU and moves it).
    """
    import torch

    return [torch.Generator(device="cpu").manual_seed(int(seed) + i) for i in range(start, stop)]


def encode_captions(pipe, captions: list[str], *, device: str) -> np.ndarray:
    """The pipeline's own ``prompt_embeds`` of ``captions``: ``(n, seq_len, hidden_size)``.

    These are the targets of the caption pathway (brain -> text-encoder hidden states), in the
    space the pipeline's ``prompt_embeds`` argument takes.
    """
    import torch

    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(list(captions), device, 1, False)
    return embeds.float().cpu().numpy()


def check_text_embeddings(text_embeddings: np.ndarray | None, *, n: int, hidden_size: int,
                          what: str) -> np.ndarray | None:
    """Return ``text_embeddings`` as float32 ``(n, seq_len, hidden_size)`` or raise DataError.

    These are text-encoder hidden states (the pipeline's ``prompt_embeds``), not pooled
    sentence embeddings.
    """
    if text_embeddings is None:
        return None
    text = np.asarray(text_embeddings, dtype=np.float32)
    if text.ndim != 3 or text.shape[0] != n or text.shape[2] != hidden_size:
        raise DataError(
            f"{what} takes text embeddings as text-encoder hidden states of shape "
            f"(n={n}, seq_len, {hidden_size}); got {tuple(text.shape)}",
            hint="pass the CLIP text encoder's last hidden states (prompt_embeds), or no text "
                 "embeddings")
    return text


def load_pipeline(pipeline_cls: type, path: Path, *, dtype: str, device: str, what: str):
    """``pipeline_cls.from_pretrained(path, local_files_only=True)`` moved to ``device``
    (:func:`.base.load_quietly`: no diffusers bars; a bar over batches via ``logging.progress``).

    A missing weight file inside a component folder (OSError from the loaders) becomes a
    :class:`DataError` naming the directory.
    """
    try:
        pipe = load_quietly(pipeline_cls, path, dtype=torch_dtype(dtype))
    except OSError as err:
        raise DataError(f"{what}: could not load the pipeline ({err})", path=path,
                        hint="the directory is incomplete; copy it again from its source") from err
    return pipe.to(device)


class StableUnclipGenerator:
    """Stable unCLIP (``StableUnCLIPImg2ImgPipeline``) from a local directory.

    Parameters
    ----------
    path : str | Path
        Pipeline directory (``save_pretrained`` layout, e.g. a local copy of
        ``stabilityai/stable-diffusion-2-1-unclip``) or a Hugging Face cache folder.
    revision : str | None
        Snapshot to use when ``path`` is a Hugging Face cache folder; recorded in :attr:`note`.
    dtype : {"float32", "float16", "bfloat16"}
        Weights dtype (float32 on CPU).
    device : str
        Torch device, e.g. ``"cpu"`` or ``"cuda"``.
    noise_level : int
        Noise augmentation of the image embeddings (the pipeline's ``noise_level``; 0 = none).

    Attributes
    ----------
    emb_dim : int
        CLIP image-embedding size the UNet is conditioned on.
    resolution : int
        Output image side in pixels (``unet.sample_size * vae_scale_factor``).
    note : str
        What model this is.

    Notes
    -----
    The pipeline's ``image`` argument is *not* an img2img init: the pipeline encodes it with its
    CLIP image encoder to get ``image_embeds`` and starts from pure noise, and it refuses ``image``
    and ``image_embeds`` together. Using low-level init images as ``image`` would therefore discard
    the brain-decoded embedding. Start images (``init_images``: the retrieval-augmented or
    low-level start) therefore go in as *latents*: VAE-encoded, noised to the timestep where
    the last ``strength`` of the schedule begins, and denoised over that part of the schedule
    only (img2img, as ``StableDiffusionImg2ImgPipeline`` does), with the decoded embedding as
    ``image_embeds``. This needs a scheduler that steps by timestep value (DDIM, DDPM: the
    checkpoint's DDIM does).
    """

    embedding_scale = "raw"  # CLIP image_embeds as the CLIP vision model outputs them

    def __init__(self, *, path: str | Path, revision: str | None = None, dtype: str = "float32",
                 device: str = "cpu", noise_level: int = 0):
        from diffusers import StableUnCLIPImg2ImgPipeline

        what = "Stable unCLIP weights"
        self.path = resolve_model_dir(path, revision=revision, what=what)
        check_pipeline_dir(self.path, required=UNCLIP_COMPONENTS, what=what,
                           class_names=["StableUnCLIPImg2ImgPipeline"])
        self.revision = revision
        self.device = device
        self.noise_level = int(noise_level)
        self.pipe = load_pipeline(StableUnCLIPImg2ImgPipeline, self.path, dtype=dtype,
                                  device=device, what=what)
        unet = self.pipe.unet.config
        self.emb_dim = int(self.pipe.image_normalizer.config.embedding_dim)
        if (unet.class_embed_type != "projection"
                or unet.projection_class_embeddings_input_dim != 2 * self.emb_dim):
            raise DataError(
                f"{what}: the UNet is not conditioned on {self.emb_dim}-d image embeddings "
                f"(class_embed_type={unet.class_embed_type!r}, projection_class_embeddings_"
                f"input_dim={unet.projection_class_embeddings_input_dim}, expected "
                f"2 x {self.emb_dim})", path=self.path / "unet",
                hint="use a Stable unCLIP checkpoint whose unet and image_normalizer match")
        self.resolution = int(unet.sample_size) * int(self.pipe.vae_scale_factor)
        self.text_hidden_size = int(self.pipe.text_encoder.config.hidden_size)
        rev = f"@{revision}" if revision else ""
        self.note = (f"Stable unCLIP (diffusers StableUnCLIPImg2ImgPipeline) from "
                     f"{self.path}{rev}; conditioned on {self.emb_dim}-d CLIP image embeddings, "
                     f"noise_level={self.noise_level}")
        logger.info("loaded %s", self.note)

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
            Predicted CLIP image embeddings (passed as ``image_embeds``).
        seed : int
            Image ``i`` uses a generator seeded with ``seed + i`` (independent of batching).
        steps : int
            Denoising steps.
        guidance_scale : float
            Classifier-free guidance weight (> 1 enables guidance; the unconditional branch
            uses zero image embeddings and the empty prompt, as the pipeline does).
        init_images : list of PIL.Image.Image | None
            Start images (img2img through the latents, see the class notes), one per
            embedding; None: from noise.
        strength : float
            With ``init_images``: the fraction of the denoising schedule run from the noised
            start.
        text_embeddings : np.ndarray, shape (n, seq_len, hidden_size) | None
            Optional text-encoder hidden states passed as ``prompt_embeds``; None = empty prompt.
        batch_size : int
            Images per pipeline call.

        Returns
        -------
        list of PIL.Image.Image
            ``n`` RGB images of ``resolution`` x ``resolution`` px.
        """
        emb = check_embeddings(embeddings, emb_dim=self.emb_dim, what="Stable unCLIP generator")
        n = len(emb)
        if init_images is not None and len(init_images) != n:
            raise DataError(f"Stable unCLIP generator: {len(init_images)} start images for "
                            f"{n} embeddings")
        text = check_text_embeddings(text_embeddings, n=n, hidden_size=self.text_hidden_size,
                                     what="Stable unCLIP generator")
        images: list[Image.Image] = []
        full = self.pipe.scheduler  # a start image runs only the end of its schedule
        try:
            self._batches(emb, text, images, full=full, seed=seed, steps=steps,
                          guidance_scale=guidance_scale, init_images=init_images,
                          strength=strength, batch_size=batch_size)
        finally:
            self.pipe.scheduler = full
        return images

    def _batches(self, emb, text, images, *, full, seed, steps, guidance_scale, init_images,
                 strength, batch_size) -> None:
        import torch

        n, dtype = len(emb), self.pipe.unet.dtype
        for start in progress(range(0, n, batch_size), desc="unCLIP batches",
                              total=-(-n // batch_size)):
            stop = min(start + batch_size, n)
            kwargs = {"prompt": [""] * (stop - start)}
            if text is not None:
                kwargs = {"prompt_embeds": torch.from_numpy(text[start:stop]).to(
                    self.device, dtype)}
            generators = seeded_generators(seed, start, stop)
            if init_images is not None:
                kwargs["latents"] = self._start_latents(init_images[start:stop], generators,
                                                        full=full, steps=steps,
                                                        strength=strength)
            out = self.pipe(
                image_embeds=torch.from_numpy(emb[start:stop]).to(self.device, dtype),
                height=self.resolution, width=self.resolution, num_inference_steps=steps,
                guidance_scale=guidance_scale, noise_level=self.noise_level,
                generator=generators, output_type="pil", **kwargs)
            images.extend(out.images)

    def _start_latents(self, starts: list[Image.Image], generators, *, full, steps: int,
                       strength: float):
        """Start images -> latents noised to where the last ``strength`` of a ``steps``-step
        schedule begins; the pipeline's scheduler then runs only that part."""
        import torch
        from diffusers import DDIMScheduler, DDPMScheduler

        from .embedding_diffusion import to_tensor

        if not isinstance(full, (DDIMScheduler, DDPMScheduler)):
            raise DataError(f"Stable unCLIP generator: a start image needs a DDIM or DDPM "
                            f"scheduler, this pipeline has {type(full).__name__}",
                            path=self.path / "scheduler",
                            hint="set reconstruct.start=noise")
        check_images(starts, what="start images")
        n_run = img2img_steps(strength, steps)
        self.pipe.scheduler = _tail_schedule(full, n_run)
        self.pipe.scheduler.set_timesteps(steps)
        first = self.pipe.scheduler.timesteps[:1]
        x = to_tensor(starts, self.resolution).to(self.device, self.pipe.vae.dtype)
        with torch.no_grad():
            latents = self.pipe.vae.encode(x).latent_dist.mean
        latents = latents * self.pipe.vae.config.scaling_factor
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
        noised = full.add_noise(latents, noise.to(latents), first.repeat(len(latents)))
        return noised / self.pipe.scheduler.init_noise_sigma


def _tail_schedule(scheduler, n_run: int):
    """A copy of ``scheduler`` whose ``set_timesteps`` keeps the last ``n_run`` timesteps
    (DDIM/DDPM step by timestep value, so a truncated schedule is img2img's)."""

    class Tail(type(scheduler)):
        def set_timesteps(self, *args, **kwargs):
            super().set_timesteps(*args, **kwargs)
            self.timesteps = self.timesteps[-n_run:]

    return Tail.from_config(scheduler.config)
