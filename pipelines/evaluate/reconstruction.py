"""Reconstruction of a test set from brain-decoded embeddings, measured against floor and
ceiling; the ``neurorecon reconstruct checkpoint=<ckpt>`` stage.

For each test row (subject x test image) the encoder's predicted embedding drives the
generator (:mod:`neurorecon.pipelines.reconstruct.generation`); a low-level pathway (ridge from
brain data to a coarse colour thumbnail, Brain-Diffuser / Takagi style) optionally gives the
initial image for img2img. Beside the reconstructions: the *floor* (the training image whose
embedding is nearest to the prediction: retrieval, no generation) and the *ceiling* (the
generator fed the stimulus' true embedding).
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger
from neurorecon.models.generators.base import (
    conditioning,
    image_thumbnails,
    retrieved_starts,
    thumbnails_to_images,
    unit_rows,
)

from ..inference import predict_split
from ..reconstruct.generation import (
    build_generator,
    caption_pathway,
    generator_rows,
    lowlevel_inits,
    lowlevel_rerank,
    stimulus_images,
)
from ..train.ridge import flat_targets
from .recon_metrics import compare_reconstructions
from .summary import write_report


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
    fig.suptitle(title + "\n" + textwrap.fill(note, 90), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def reconstruct(net, dm, *, cfg: DictConfig, out_dir: str | Path,
                stim_root: str | Path, rerank: dict | None = None,
                stim_images: list[Image.Image] | None = None) -> dict[str, Any]:
    """Reconstruct the test images from brain-decoded embeddings; return metrics + paths.

    Writes ``reconstructions/*.png`` (one per test row), ``reconstructions.png`` (grid) and
    ``reconstruction.json`` in ``out_dir``. The embedded generator sees only the stimuli of
    the train and validation splits; the test images are new to it. ``rerank``: the low-level
    re-ranking weight chosen before (:func:`~..reconstruct.generation.lowlevel_rerank` with a
    model that has not seen the validation trials); None: chosen here with ``net``.
    ``stim_images``: the data module's stimulus images when the caller has them
    (:func:`~..reconstruct.generation.stimulus_images`); None: read from ``stim_root``.
    """

    t0 = time.perf_counter()
    rcfg = cfg.reconstruct
    if rcfg.captions and not rcfg.generator.get("_target_"):  # fail before training anything
        raise DataError("reconstruct.captions=true, but the embedded generator takes no text",
                        hint="use reconstruct/generator=stable_unclip or ip_adapter (local "
                             "weights) for the caption pathway, or reconstruct.captions=false")
    out_dir = Path(out_dir)
    (out_dir / "reconstructions").mkdir(parents=True, exist_ok=True)
    stim_files = dm.embedding_index["stim_file"].tolist()
    images = stimulus_images(dm, Path(stim_root)) if stim_images is None else stim_images
    emb = flat_targets(dm)
    test = dm.splits["test"]
    fit_rows = generator_rows(dm)
    generator, train_info = build_generator(
        rcfg.generator, images=[images[i] for i in fit_rows], embeddings=emb[fit_rows],
        cache_dir=cfg.paths.cache_dir)
    res = generator.resolution
    # the generator is conditioned on the regression head (Benchetrit et al. 2023); the floor
    # retrieves with the contrastive head, as the retrieval evaluation does
    # in the scale the generator was trained on (unit rows, or raw CLIP image_embeds whose
    # norm is the training targets' mean norm)
    target_norm = float(np.linalg.norm(emb[fit_rows], axis=1).mean())
    scale = generator.embedding_scale
    pred = conditioning(predict_split(net, dm, "test", head=str(rcfg.head)), scale=scale,
                        target_norm=target_norm)
    retrieval_pred = unit_rows(predict_split(net, dm, "test"))
    lowlevel = (lowlevel_inits(dm, stim_images=images, resolution=res)
                if rcfg.lowlevel else None)
    start = str(rcfg.start)
    fit_images = [images[i] for i in fit_rows]
    if rerank is None:
        rerank = lowlevel_rerank(cfg, net, dm, stim_images=images)
    layouts = image_thumbnails(fit_images) if rerank["value"] > 0 else None

    def starts(queries: np.ndarray, coarse: list[Image.Image] | None
               ) -> list[Image.Image] | None:
        """The img2img starting images of ``queries`` (``reconstruct.start``); ``coarse``:
        their low-level images (the start itself, or what re-ranks the retrieved ones)."""
        if start == "retrieved":
            return retrieved_starts(queries, emb[fit_rows], fit_images,
                                    k=int(rcfg.retrieval_k), resolution=res, coarse=coarse,
                                    rerank=rerank["value"],
                                    shortlist=int(rcfg.retrieval_shortlist), layouts=layouts)
        return coarse if start == "lowlevel" else None

    # the start is retrieved with the contrastive head, as the floor and the retrieval
    # evaluation retrieve
    inits = starts(retrieval_pred, lowlevel)
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
    true_cond = emb[uniq] if scale == "raw" else unit_rows(emb[uniq])  # the true embeddings
    # the ceiling's start: its own retrieval, re-ranked by the true thumbnail (a perfect
    # low-level pathway) where the brain's is re-ranked by the predicted one
    true_inits = starts(emb[uniq], None if lowlevel is None else thumbnails_to_images(
        image_thumbnails([images[i] for i in uniq]), resolution=res)
    ) if start == "retrieved" else None
    ceiling = dict(zip(uniq, generator.generate(
        true_cond, text_embeddings=None if true_text is None else true_text[uniq],
        init_images=true_inits, strength=float(rcfg.strength), **kw), strict=True))
    nearest = fit_rows[(retrieval_pred @ unit_rows(emb[fit_rows]).T).argmax(1)]
    sized = [im.resize((res, res), Image.BICUBIC) for im in images]
    sets = {"brain": recon, "floor_retrieved": [sized[t] for t in nearest],
            "ceiling": [ceiling[t] for t in test.target]}
    if lowlevel is not None:
        sets["lowlevel_only"] = lowlevel
    if start == "retrieved":  # what the generator adds to its start
        sets["start_only"] = inits
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
    columns = {"stimulus": truth, f"start ({start})": inits,
               "reconstruction (brain)": recon, "retrieved (floor)": sets["floor_retrieved"],
               "ceiling (true emb.)": sets["ceiling"]}
    columns = {name: imgs for name, imgs in columns.items() if imgs is not None}
    plot_grid([[imgs[i] for imgs in columns.values()] for i in show],
              [f"{Path(stim_files[test.target[i]]).stem}\nsub-{subjects[i]}" for i in show],
              out_dir / "reconstructions.png", columns=list(columns),
              title=f"{dm.modality.upper()} reconstructions ({res}px)", note=generator.note)
    out = {"generator": generator.note, "resolution": res, "n_images": len(recon),
           "head": str(rcfg.head), "lowlevel_pathway": bool(rcfg.lowlevel),
           "start": start, "retrieval": {
               "k": int(rcfg.retrieval_k), "shortlist": int(rcfg.retrieval_shortlist),
               "lowlevel_rerank": rerank["value"],
               "lowlevel_rerank_choice": rerank} if start == "retrieved" else None,
           "caption_pathway": bool(rcfg.captions),
           "strength": float(rcfg.strength),
           "steps": int(rcfg.steps), "guidance_scale": float(rcfg.guidance_scale),
           "embedding_scale": scale,
           "embedding_norm": {"conditioning_mean": round(float(
               np.linalg.norm(pred, axis=1).mean()), 4),
               "training_targets_mean": round(target_norm, 4)},
           "generator_training": train_info, "seconds_per_image": round(per_image, 4),
           "metrics": metrics, "per_subject_brain": per_subject,
           "seconds": round(time.perf_counter() - t0, 1), "grid": "reconstructions.png"}
    (out_dir / "reconstruction.json").write_text(json.dumps(out, indent=2, default=str))
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    """Stage entry point (Hydra root config ``reconstruct.yaml``).

    Writes the reconstructions, ``metrics.json`` (``{"modality", "n_test", "checkpoint",
    "reconstruction"}``) and ``report.md`` in the run directory; returns the reconstruction
    block.
    """
    from ..train.checkpoint import selected_before_refit
    from .stage import checkpoint_encoder, from_checkpoint

    net, dm, job = from_checkpoint(cfg)
    out_dir = Path(cfg.paths.output_dir)
    stim_root = Path(cfg.data.root) / cfg.data.stim_dir
    images = stimulus_images(dm, stim_root)
    rerank = None
    selected = selected_before_refit(cfg.checkpoint)
    if selected is not None:  # choices on validation trials by a model that has not seen them
        rerank = lowlevel_rerank(job, checkpoint_encoder(selected, dm), dm, stim_images=images)
        logger.info("reconstruct: choices on validation trials with %s (before the refit)",
                    selected)
    out = reconstruct(net, dm, cfg=job, out_dir=out_dir, stim_root=stim_root, rerank=rerank,
                      stim_images=images)
    metrics = {"modality": dm.modality, "n_test": out["n_images"],
               "n_test_images": len(set(dm.splits["test"].target.tolist())),
               "subjects": dm.labels,
               "embedder": dm.embedder_spec.get("name"),
               "embedder_note": dm.embedder_spec.get("substitute_note"),
               "checkpoint": str(cfg.checkpoint), "reconstruction": out}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    logger.info("reconstruct: %s", write_report(out_dir, metrics))
    return out
