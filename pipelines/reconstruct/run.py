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
from ..common.checks import DataError
from ..common.logging import logger

THUMB = 8  # low-level pathway: predicted thumbnail side (pixels)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


#: keys of the embedded generator config that define the trained model (its cache key)
TRAINING_KEYS = ("resolution", "block_out_channels", "prediction_type", "ema_decay",
                 "train_steps", "batch_size", "lr", "p_uncond", "seed")


def build_generator(gen_cfg: DictConfig, *, images: list[Image.Image],
                    embeddings: np.ndarray, cache_dir: str | Path):
    """The configured generator and its training figures (None for a pretrained one).

    A config with ``_target_`` is a pretrained backend loaded from local directories
    (``reconstruct/generator=stable_unclip`` / ``ip_adapter``); otherwise it is the recipe of
    the embedded generator, trained on ``images`` / ``embeddings`` (see
    :func:`embedded_generator`).
    """
    if gen_cfg.get("_target_"):
        from hydra.utils import instantiate

        # built from a partial so the backend's own errors (missing directory...) surface
        # as they are, not wrapped by Hydra
        return instantiate(gen_cfg, _partial_=True)(), None
    return embedded_generator(gen_cfg, images=images, embeddings=embeddings,
                              cache_dir=cache_dir)


def embedded_generator(gen_cfg: DictConfig, *, images: list[Image.Image],
                       embeddings: np.ndarray, cache_dir: str | Path):
    """Train (or reuse from the cache) the embedded generator on ``images``.

    The cache key covers the training recipe and the *content* of the training images and
    embeddings, so datasets sharing a stimulus set (and embedder) share one trained generator.
    """
    import hashlib

    from neurorecon.models.generators.embedding_diffusion import EmbeddingDiffusionGenerator

    from .train_generator import train_embedding_diffusion

    cfg = OmegaConf.to_container(gen_cfg, resolve=True)
    params = {k: cfg[k] for k in TRAINING_KEYS}
    digest = hashlib.sha256(np.ascontiguousarray(embeddings, np.float32).tobytes())
    for im in images:
        digest.update(im.tobytes())
    entry = cache_entry(cache_dir, "generators", "embedded", params,
                        upstream=[digest.hexdigest()[:16]])
    if not entry.exists():
        pipe, info = train_embedding_diffusion(
            images, _unit(embeddings), resolution=params["resolution"],
            block_out_channels=tuple(params["block_out_channels"]),
            prediction_type=params["prediction_type"], ema_decay=params["ema_decay"],
            steps=params["train_steps"], batch_size=params["batch_size"], lr=params["lr"],
            p_uncond=params["p_uncond"], seed=params["seed"])
        with entry.writing({**params, "training": info}) as tmp:
            pipe.save_pretrained(tmp)
    else:
        logger.info("generator: reusing %s", entry.path)
        info = entry.manifest()["params"].get("training")
    return EmbeddingDiffusionGenerator(path=entry.path), info


def lowlevel_inits(dm, *, stim_images: list[Image.Image], resolution: int) -> list[Image.Image]:
    """Ridge from brain data to an 8x8 colour thumbnail of the stimulus, per test row.

    The low-level pathway of Brain-Diffuser / Takagi & Nishimoto, at thumbnail scale: the
    predicted thumbnail, upsampled, is the img2img starting image.
    """
    from ..evaluate.report import ridge_predictions

    thumbs = np.stack([np.asarray(im.convert("RGB").resize((THUMB, THUMB), Image.BOX),
                                  np.float32).ravel() / 255 for im in stim_images])
    pred = ridge_predictions(dm, targets=thumbs)
    return [Image.fromarray((np.clip(p, 0, 1).reshape(THUMB, THUMB, 3) * 255).astype(np.uint8))
            .resize((resolution, resolution), Image.BICUBIC) for p in pred]


def caption_pathway(dm, generator, *, stim_root: Path,
                    captions: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Caption pathway: ridge from brain data to the generator's caption ``prompt_embeds``.

    Captions come from ``<stim_root>/stimuli.tsv`` (or the ``captions`` TSV), are encoded by
    the generator's own text encoder, and a per-subject ridge predicts them for the test rows.
    Returns the predicted ``(n_test_rows, seq_len, hidden)`` and the true per-stimulus
    ``(n_stimuli, seq_len, hidden)`` text embeddings.
    """
    from ..embed.run import stimulus_table
    from ..evaluate.report import ridge_predictions

    if not hasattr(generator, "encode_captions"):
        raise DataError(f"the caption pathway needs a generator with a text encoder; "
                        f"{type(generator).__name__} has none",
                        hint="use reconstruct/generator=stable_unclip or ip_adapter, or set "
                             "reconstruct.captions=false")
    index, _ = stimulus_table(Path(stim_root), dm.embedding_index["stim_file"].tolist(),
                              captions=captions, need_captions=True)
    true = generator.encode_captions(index["caption"].tolist())
    pred = ridge_predictions(dm, targets=true.reshape(len(true), -1))
    return pred.reshape(len(pred), *true.shape[1:]), true


def plot_grid(rows: list[list[Image.Image]], labels: list[str], path: Path, *,
              columns: list[str], title: str, note: str) -> Path:
    """PNG grid of images, one row per test example, one column per image set."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = columns
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
    """Reconstruct the test images from brain-decoded embeddings; return metrics + paths.

    Writes ``reconstructions/*.png`` (one per test row), ``reconstructions.png`` (grid) and
    ``reconstruction.json`` in ``out_dir``. The embedded generator sees only the stimuli of
    the train and validation splits; the test images are new to it.
    """
    from ..evaluate.recon_metrics import compare_reconstructions
    from ..evaluate.report import flat_targets, predict_split

    t0 = time.perf_counter()
    rcfg = cfg.reconstruct
    if rcfg.captions and not rcfg.generator.get("_target_"):  # fail before training anything
        raise DataError("reconstruct.captions=true, but the embedded generator takes no text",
                        hint="use reconstruct/generator=stable_unclip or ip_adapter (local "
                             "weights) for the caption pathway, or reconstruct.captions=false")
    out_dir = Path(out_dir)
    (out_dir / "reconstructions").mkdir(parents=True, exist_ok=True)
    stim_files = dm.embedding_index["stim_file"].tolist()
    images = [Image.open(Path(stim_root) / s).convert("RGB") for s in stim_files]
    emb = flat_targets(dm)
    test = dm.splits["test"]
    fit_rows = np.unique(np.concatenate([dm.splits[n].target for n in ("train", "val")]))
    generator, train_info = build_generator(
        rcfg.generator, images=[images[i] for i in fit_rows], embeddings=emb[fit_rows],
        cache_dir=cfg.paths.cache_dir)
    res = generator.resolution
    # the generator is conditioned on the regression head (Benchetrit et al. 2023); the floor
    # retrieves with the contrastive head, as the retrieval evaluation does
    pred = _unit(predict_split(lit, dm, "test", head=str(rcfg.head)))
    retrieval_pred = _unit(predict_split(lit, dm, "test"))
    inits = (lowlevel_inits(dm, stim_images=images, resolution=res)
             if rcfg.lowlevel else None)
    text, true_text = (caption_pathway(dm, generator, stim_root=Path(stim_root),
                                       captions=rcfg.get("captions_table"))
                       if rcfg.captions else (None, None))
    kw = dict(steps=int(rcfg.steps), guidance_scale=float(rcfg.guidance_scale),
              seed=int(rcfg.seed), batch_size=int(rcfg.batch_size))
    t_gen = time.perf_counter()
    logger.info("reconstruct: %d test rows with %s", len(pred), type(generator).__name__)
    recon = generator.generate(pred, init_images=inits, strength=float(rcfg.strength),
                               text_embeddings=text, **kw)
    per_image = (time.perf_counter() - t_gen) / len(recon)
    uniq = np.unique(test.target)
    ceiling = dict(zip(uniq, generator.generate(
        _unit(emb[uniq]), text_embeddings=None if true_text is None else true_text[uniq],
        **kw), strict=True))
    nearest = fit_rows[(retrieval_pred @ _unit(emb[fit_rows]).T).argmax(1)]
    sized = [im.resize((res, res), Image.BICUBIC) for im in images]
    sets = {"brain": recon, "floor_retrieved": [sized[t] for t in nearest],
            "ceiling": [ceiling[t] for t in test.target]}
    if inits is not None:
        sets["lowlevel_only"] = inits
    truth = [sized[t] for t in test.target]
    subjects = [dm.labels[k] for k in test.subject]
    for i, im in enumerate(recon):
        im.save(out_dir / "reconstructions" / f"test{i:03d}_sub-{subjects[i]}_"
                f"{Path(stim_files[test.target[i]]).stem}.png")
    metrics = compare_reconstructions(sets, truth, groups=subjects,
                                      clip_path=rcfg.get("clip_path"),
                                      skip=list(rcfg.get("skip_metrics") or []))
    per_subject = metrics["brain"].pop("_per_group")
    for m in metrics.values():
        m.pop("_per_group", None)
    show = np.linspace(0, len(recon) - 1, min(int(rcfg.grid_rows), len(recon))).astype(int)
    columns = {"stimulus": truth, "low-level start (ridge)": inits,
               "reconstruction (brain)": recon, "retrieved (floor)": sets["floor_retrieved"],
               "ceiling (true emb.)": sets["ceiling"]}
    columns = {name: imgs for name, imgs in columns.items() if imgs is not None}
    plot_grid([[imgs[i] for imgs in columns.values()] for i in show],
              [f"{Path(stim_files[test.target[i]]).stem}\nsub-{subjects[i]}" for i in show],
              out_dir / "reconstructions.png", columns=list(columns),
              title=f"{dm.modality.upper()} reconstructions ({res}px)", note=generator.note)
    out = {"generator": generator.note, "resolution": res, "n_images": len(recon),
           "head": str(rcfg.head), "lowlevel_pathway": bool(rcfg.lowlevel),
           "caption_pathway": bool(rcfg.captions),
           "strength": float(rcfg.strength),
           "steps": int(rcfg.steps), "guidance_scale": float(rcfg.guidance_scale),
           "generator_training": train_info, "seconds_per_image": round(per_image, 4),
           "metrics": metrics, "per_subject_brain": per_subject,
           "seconds": round(time.perf_counter() - t0, 1), "grid": "reconstructions.png"}
    (out_dir / "reconstruction.json").write_text(json.dumps(out, indent=2, default=str))
    return out
