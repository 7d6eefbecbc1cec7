"""Reconstruction: brain-decoded embeddings -> images, measured against floor and ceiling.

For each test row (subject x test image) the encoder's predicted embedding drives the
generator; a low-level pathway (ridge from brain data to a coarse colour thumbnail,
Brain-Diffuser / Takagi style) optionally gives the initial image for img2img. Beside the
reconstructions: the *floor* (the training image whose embedding is nearest to the prediction:
retrieval, no generation) and the *ceiling* (the generator fed the stimulus' true embedding).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ..common.cache import cache_entry
from ..common.logging import logger

THUMB = 8  # low-level pathway: predicted thumbnail side (pixels)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embedded_generator(gen_cfg: DictConfig, *, images: list[Image.Image],
                       embeddings: np.ndarray, cache_dir: str | Path):
    """Train (or reuse from the cache) the embedded generator on the stimulus images.

    The cache key covers the generator parameters and the *content* of the training images
    and embeddings, so datasets sharing a stimulus set share one trained generator.
    """
    import hashlib

    from neurorecon.models.generators.embedding_diffusion import EmbeddingDiffusionGenerator

    from .train_generator import train_embedding_diffusion

    params = {k: v for k, v in OmegaConf.to_container(gen_cfg, resolve=True).items()
              if k in ("resolution", "block_out_channels", "train_steps", "batch_size", "lr",
                       "p_uncond", "seed")}
    digest = hashlib.sha256(np.ascontiguousarray(embeddings, np.float32).tobytes())
    for im in images:
        digest.update(im.tobytes())
    entry = cache_entry(cache_dir, "generators", "embedded", params,
                        upstream=[digest.hexdigest()[:16]])
    info = None
    if not entry.exists():
        pipe, info = train_embedding_diffusion(
            images, _unit(embeddings), resolution=params["resolution"],
            block_out_channels=tuple(params["block_out_channels"]),
            steps=params["train_steps"], batch_size=params["batch_size"], lr=params["lr"],
            p_uncond=params["p_uncond"], seed=params["seed"])
        with entry.writing({**params, "training": info}) as tmp:
            pipe.save_pretrained(tmp)
    else:
        logger.info("generator: reusing %s", entry.path)
        info = entry.manifest()["params"].get("training")
    return EmbeddingDiffusionGenerator(path=entry.path), info


def lowlevel_inits(dm, *, stim_images: list[Image.Image], resolution: int) -> list[Image.Image]:
    """Ridge from brain data to an 8x8 colour thumbnail of the stimulus, per test row."""
    from ..evaluate.report import _subject_arrays
    from ..evaluate.ridge import RidgeDecoder

    thumbs = np.stack([np.asarray(im.convert("RGB").resize((THUMB, THUMB), Image.BOX),
                                  np.float32).ravel() / 255 for im in stim_images])
    test = dm.splits["test"]
    out: list[Image.Image | None] = [None] * len(test)
    for k in np.unique(test.subject):
        fit_X, _, test_X, rows = _subject_arrays(dm, int(k))
        fit_rows = np.concatenate([dm.splits[n].target[dm.splits[n].subject == k]
                                   for n in ("train", "val")])
        pred = RidgeDecoder().fit(fit_X, thumbs[fit_rows]).predict(test_X)
        for r, p in zip(rows, pred, strict=True):
            arr = (np.clip(p, 0, 1).reshape(THUMB, THUMB, 3) * 255).astype(np.uint8)
            out[r] = Image.fromarray(arr).resize((resolution, resolution), Image.BICUBIC)
    return out


def plot_grid(rows: list[list[Image.Image]], labels: list[str], path: Path, *, title: str,
              note: str) -> Path:
    """PNG grid, one row per test example: stimulus | reconstruction | retrieved | ceiling."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = ["stimulus", "reconstruction (brain)", "retrieved (floor)", "ceiling (true emb.)"]
    fig = Figure(figsize=(2.0 * len(cols), 2.0 * len(rows) + 0.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for r, (row, label) in enumerate(zip(rows, labels, strict=True)):
        for c, im in enumerate(row):
            ax = axes[r][c]
            ax.imshow(im)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        axes[r][0].set_ylabel(label, fontsize=8)
    import textwrap

    fig.suptitle(title + "\n" + textwrap.fill(note, 90), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def reconstruct(lit, dm, *, cfg: DictConfig, out_dir: str | Path,
                stim_root: str | Path) -> dict[str, Any]:
    """Reconstruct the test images from brain-decoded embeddings; return metrics + paths."""
    from ..evaluate.recon_metrics import reconstruction_metrics
    from ..evaluate.report import flat_targets, predict_split

    t0 = time.perf_counter()
    gcfg = cfg.reconstruct
    out_dir = Path(out_dir)
    (out_dir / "reconstructions").mkdir(parents=True, exist_ok=True)
    stim_files = dm.embedding_index["stim_file"].tolist()
    images = [Image.open(Path(stim_root) / s).convert("RGB") for s in stim_files]
    emb = flat_targets(dm)
    generator, train_info = embedded_generator(gcfg.generator, images=images, embeddings=emb,
                                               cache_dir=cfg.paths.cache_dir)
    res = generator.resolution
    test = dm.splits["test"]
    pred = _unit(predict_split(lit, dm, "test"))
    inits = (lowlevel_inits(dm, stim_images=images, resolution=res)
             if gcfg.lowlevel else None)
    kw = dict(steps=int(gcfg.steps), guidance_scale=float(gcfg.guidance_scale),
              seed=int(gcfg.seed))
    recon = generator.generate(pred, init_images=inits, strength=float(gcfg.strength), **kw)
    uniq = np.unique(test.target)
    ceiling = dict(zip(uniq, generator.generate(_unit(emb[uniq]), **kw), strict=True))
    train_rows = np.unique(np.concatenate([dm.splits[n].target for n in ("train", "val")]))
    nearest = train_rows[(pred @ _unit(emb[train_rows]).T).argmax(1)]
    truth = [images[t].resize((res, res), Image.BICUBIC) for t in test.target]
    retrieved = [images[t].resize((res, res), Image.BICUBIC) for t in nearest]
    ceil = [ceiling[t] for t in test.target]
    for i, im in enumerate(recon):
        im.save(out_dir / "reconstructions" / f"test{i:03d}_sub-{dm.labels[test.subject[i]]}.png")
    metrics = {name: reconstruction_metrics(imgs, truth, clip_path=gcfg.get("clip_path"))
               for name, imgs in (("brain", recon), ("floor_retrieved", retrieved),
                                  ("ceiling", ceil))}
    show = np.linspace(0, len(recon) - 1, min(8, len(recon))).astype(int)
    plot_grid([[truth[i], recon[i], retrieved[i], ceil[i]] for i in show],
              [f"{Path(stim_files[test.target[i]]).stem}\nsub-{dm.labels[test.subject[i]]}"
               for i in show], out_dir / "reconstructions.png",
              title=f"{dm.modality.upper()} reconstructions ({res}px)", note=generator.note)
    out = {"generator": generator.note, "resolution": res, "n_images": len(recon),
           "lowlevel_pathway": bool(gcfg.lowlevel), "strength": float(gcfg.strength),
           "steps": int(gcfg.steps), "guidance_scale": float(gcfg.guidance_scale),
           "generator_training": train_info, "metrics": metrics,
           "seconds": round(time.perf_counter() - t0, 1), "grid": "reconstructions.png"}
    (out_dir / "reconstruction.json").write_text(json.dumps(out, indent=2, default=str))
    return out
