"""Reconstruction of a test set from brain-decoded embeddings, measured against floor and
ceiling, through the trained :class:`~..inference.Decoder`; the ``neurorecon reconstruct
bundle=<dir>`` (or ``checkpoint=<ckpt>``) stage.

For each test row (subject x test image) the decoder's predicted embedding drives its
generator (:meth:`~..inference.Decoder.reconstruct`) from its img2img start: the training image
nearest to the decoded embedding, re-ranked by the low-level pathway (ridge from brain data to
a coarse colour thumbnail, Brain-Diffuser / Takagi style). Beside the reconstructions: the
*floor* (the training image whose embedding is nearest to the prediction: retrieval, no
generation) and the *ceiling* (the generator fed the stimulus' true embedding). A training run
scores its in-memory decoder the same way before writing the bundle.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, open_dict
from PIL import Image

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger
from neurorecon.models.generators.base import (
    conditioning,
    image_thumbnails,
    retrieved_starts,
    thumbnails_to_images,
)

from ..inference import Decoder
from ..reconstruct.generation import (
    STRENGTH_GRID,
    STRENGTH_N_SE,
    ValidationTrials,
    build_generator,
    caption_pathway,
    generator_rows,
    lowlevel_rerank,
    one_standard_error,
    read_images,
    start_rows,
    stimulus_images,
)
from .recon_metrics import alexnet_two_way_sets, compare_reconstructions
from .stage import TestTrials, candidate_embeddings, prepare_dataset
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


def reconstruct(decoder: Decoder, test: TestTrials, *, cfg: DictConfig, out_dir: str | Path,
                stim_root: str | Path, true_embeddings: np.ndarray,
                choices: dict | None = None,
                captions: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Reconstruct the test images from brain-decoded embeddings, all through ``decoder``;
    return metrics + paths.

    Writes ``reconstructions/*.png`` (one per test row), ``reconstructions.png`` (grid) and
    ``reconstruction.json`` in ``out_dir``. ``test``: the test trials; ``true_embeddings``:
    the embedding of each test row's image (the ceiling's input). The generation settings
    (start, re-ranking weight, strength, steps...) are the decoder's
    (``config.json`` ``generator.defaults``); ``cfg.reconstruct`` gives what is measured and
    shown (``skip_metrics``, ``clip_path``, ``grid_rows``, ``batch_size``). ``choices``: how
    the run chose the re-ranking weight and the strength (:func:`validation_choices`),
    reported beside them. ``captions``: the
    caption pathway's ``(per test row, per test row's true caption)`` text embeddings
    (:func:`~..reconstruct.generation.caption_pathway`, a training run's data only).
    """
    t0 = time.perf_counter()
    rcfg = cfg.reconstruct
    out_dir = Path(out_dir)
    (out_dir / "reconstructions").mkdir(parents=True, exist_ok=True)
    generator, info = decoder.generator, decoder.config.generator
    res, start, defaults = generator.resolution, info.defaults.start, info.defaults
    batch = int(rcfg.batch_size)
    # the generator is conditioned on the regression head (Benchetrit et al. 2023); the
    # start and the floor retrieve with the contrastive head, as the retrieval evaluation does
    pred = test.encode(decoder, head=decoder.generation_head)
    retrieval_pred = test.encode(decoder)
    coarse = None
    if decoder.lowlevel and set(test.trials) <= set(decoder.lowlevel):
        # the low-level pathway's images, in row order (where every subject has one)
        coarse = [None] * len(test.subjects)
        for subject, x in test.trials.items():
            for row, im in zip(test.rows[subject], decoder.lowlevel_images(x, subject=subject),
                               strict=True):
                coarse[row] = im
    text, true_text = captions if captions is not None else (None, None)
    logger.info("reconstruct: %d test rows with %s", len(pred), type(generator).__name__)
    t_gen = time.perf_counter()  # per image: its start, then the generator from it
    inits = decoder.start_images(pred, coarse=coarse, retrieval=retrieval_pred)
    recon = decoder.reconstruct(pred, starts=inits, text_embeddings=text, batch_size=batch)
    per_image = (time.perf_counter() - t_gen) / len(recon)
    first = {}  # each test image's first row
    for row, f in enumerate(test.stim_files):
        first.setdefault(f, row)
    files = list(first)
    truth_of = dict(zip(files, read_images(Path(stim_root), files), strict=True))
    # the ceiling: the generator fed each test image's true embedding, its start retrieved
    # with it and re-ranked by the true thumbnail (a perfect low-level pathway) where the
    # brain's is re-ranked by the predicted one
    true = true_embeddings[list(first.values())]
    true_coarse = None if coarse is None else thumbnails_to_images(
        image_thumbnails([truth_of[f] for f in files]), resolution=res)
    ceiling = dict(zip(files, decoder.reconstruct(
        true, coarse=true_coarse, retrieval=true, batch_size=batch,
        text_embeddings=None if true_text is None else true_text[list(first.values())]),
        strict=True))
    sets = {"brain": recon, "floor_retrieved": decoder.retrieved_starts(retrieval_pred, k=1),
            "ceiling": [ceiling[f] for f in test.stim_files]}
    if coarse is not None:
        sets["lowlevel_only"] = coarse
    if start == "retrieved":  # what the generator adds to its start
        sets["start_only"] = inits
    truth = [truth_of[f].resize((res, res), Image.BICUBIC) for f in test.stim_files]
    for i, im in enumerate(recon):
        im.save(out_dir / "reconstructions" / f"test{i:03d}_sub-{test.subjects[i]}_"
                f"{Path(test.stim_files[i]).stem}.png")
    metrics = compare_reconstructions(sets, truth, groups=test.subjects,
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
              [f"{Path(test.stim_files[i]).stem}\nsub-{test.subjects[i]}" for i in show],
              out_dir / "reconstructions.png", columns=list(columns),
              title=f"{decoder.modality.upper()} reconstructions ({res}px)",
              note=generator.note)
    choices = choices or {}
    bundle = {"source": "the bundle"}
    out = {"generator": generator.note, "resolution": res, "n_images": len(recon),
           "head": decoder.generation_head, "lowlevel_pathway": coarse is not None,
           "start": start, "retrieval": {
               "k": defaults.retrieval_k, "shortlist": defaults.retrieval_shortlist,
               "lowlevel_rerank": defaults.lowlevel_rerank,
               "lowlevel_rerank_choice": choices.get("lowlevel_rerank") or {
                   "value": defaults.lowlevel_rerank, **bundle}}
           if start == "retrieved" else None,
           "caption_pathway": captions is not None,
           "strength": defaults.strength,
           "strength_choice": choices.get("strength") or {"value": defaults.strength, **bundle},
           "steps": defaults.steps,
           "guidance_scale": defaults.guidance_scale,
           "embedding_scale": info.embedding_scale,
           "embedding_norm": {"conditioning_mean": round(float(np.linalg.norm(conditioning(
               pred, scale=info.embedding_scale, target_norm=info.target_norm),
               axis=1).mean()), 4), "training_targets_mean": round(info.target_norm, 4)},
           "generator_training": info.training, "seconds_per_image": round(per_image, 4),
           "metrics": metrics, "per_subject_brain": per_subject,
           "seconds": round(time.perf_counter() - t0, 1), "grid": "reconstructions.png"}
    (out_dir / "reconstruction.json").write_text(json.dumps(out, indent=2, default=str))
    return out


def choose_strength(cfg: DictConfig, val: ValidationTrials, *, rerank: float) -> dict:
    """``reconstruct.strength`` of a run: the configured number, or with ``auto`` the img2img
    strength chosen on the validation trials ``val`` by generating for them.

    The encoder has not seen them (as for :func:`lowlevel_rerank`), nor has the generator
    seen their images (it trains on the train images,
    :func:`~..reconstruct.generation.generator_rows`): the choice is made on images new to
    both, as the test images are. A validation trial is a single trial where a test row
    averages its repeats, so its predictions (embeddings and thumbnail) are first made as good
    as a test row's would be (:meth:`~..reconstruct.generation.ValidationTrials.test_like`):
    the generator's pull toward the decoded embedding can mend a poor start and blur a good
    one. Each validation trial then gets its start as a test trial does (its own image
    excluded from the candidates, re-ranked with ``rerank``); each strength of
    :data:`~..reconstruct.generation.STRENGTH_GRID` generates from it (0: the start itself),
    scored per trial by AlexNet(2) and AlexNet(5) two-way identification among the validation
    trials (their mean); :func:`~..reconstruct.generation.one_standard_error` picks, within
    :data:`~..reconstruct.generation.STRENGTH_N_SE` standard errors, so a generator that adds
    nothing measurable to its start is not run.
    """
    from ..train.ridge import flat_targets

    rcfg = cfg.reconstruct
    if str(rcfg.strength) != "auto":
        return {"value": float(rcfg.strength)}
    start = str(rcfg.start)
    if start == "noise" or (start == "lowlevel" and not rcfg.lowlevel):
        return {"value": 1.0, "reason": "no start image: the whole schedule"}
    dm, images, trials = val.dm, val.stim_images, val.split
    if len(trials) < 4:
        return {"value": 0.0, "validation": {}, "n_trials": len(trials),
                "reason": "fewer than 4 validation trials: the start itself"}
    emb = flat_targets(dm)
    fit, candidates = generator_rows(dm), start_rows(dm)
    generator, _ = build_generator(rcfg.generator, images=[images[i] for i in fit],
                                   embeddings=emb[fit], cache_dir=cfg.paths.cache_dir)
    res = generator.resolution
    coarse = (thumbnails_to_images(val.test_like(val.predicted, val.thumbnails[trials.target]),
                                   resolution=res) if rcfg.lowlevel else None)
    starts = coarse
    if start == "retrieved":
        starts = retrieved_starts(
            val.test_like(val.embeddings(), emb[trials.target]),
            emb[candidates], [images[i] for i in candidates],
            k=int(rcfg.retrieval_k), resolution=res, coarse=coarse, rerank=rerank,
            shortlist=int(rcfg.retrieval_shortlist),
            exclude=np.searchsorted(candidates, trials.target))
    cond = conditioning(val.test_like(val.embeddings(str(rcfg.head)), emb[trials.target]),
                        scale=generator.embedding_scale,
                        target_norm=float(np.linalg.norm(emb[fit], axis=1).mean()))
    truth = [images[t].resize((res, res), Image.BICUBIC) for t in trials.target]
    made = [starts if strength == 0 else generator.generate(
        cond, init_images=starts, strength=strength, steps=int(rcfg.steps),
        guidance_scale=float(rcfg.guidance_scale), seed=int(rcfg.seed),
        batch_size=int(rcfg.batch_size)) for strength in STRENGTH_GRID]
    scores = alexnet_two_way_sets(made, truth, layers=(2, 5))
    per_trial = {strength: (rows[2] + rows[5]) / 2
                 for strength, rows in zip(STRENGTH_GRID, scores, strict=True)}
    return {**one_standard_error(per_trial, what="img2img strength", n_se=STRENGTH_N_SE),
            "test_repeats": val.test_repeats}


def validation_choices(cfg: DictConfig, net, dm, *, stim_images: list[Image.Image]
                       ) -> dict[str, dict]:
    """The generation settings a run chooses on its validation trials, with ``net`` (a model
    that has not seen them): ``{"lowlevel_rerank": ..., "strength": ...}``
    (:func:`~..reconstruct.generation.lowlevel_rerank`, :func:`choose_strength`), the trials'
    embeddings and low-level thumbnails computed once for both."""
    val = ValidationTrials(cfg, net, dm, stim_images=stim_images)
    rerank = lowlevel_rerank(cfg, net, dm, stim_images=stim_images, val=val)
    return {"lowlevel_rerank": rerank,
            "strength": choose_strength(cfg, val, rerank=rerank["value"])}


def run_captions(cfg: DictConfig, dm, decoder: Decoder) -> tuple[np.ndarray, np.ndarray] | None:
    """The caption pathway of a training run's data module for :func:`reconstruct`
    (``reconstruct.captions``), row-aligned with its test split; None when off."""
    if not cfg.reconstruct.captions:
        return None
    text, true = caption_pathway(dm, decoder.generator,
                                 stim_root=Path(cfg.data.root) / cfg.data.stim_dir,
                                 captions=cfg.reconstruct.get("captions_table"))
    return text, true[dm.splits["test"].target]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Stage entry point (Hydra root config ``reconstruct.yaml``):
    ``neurorecon reconstruct bundle=<dir>`` reconstructs ``data``'s test trials through the
    bundle's :class:`~..inference.Decoder`; ``checkpoint=<ckpt>`` builds that decoder first
    from the checkpoint and its training data, with this command's ``reconstruct`` settings.

    Writes the reconstructions, ``metrics.json`` (``{"modality", "n_test", "bundle" or
    "checkpoint", "reconstruction"}``) and ``report.md`` in the run directory; returns the
    reconstruction block.
    """
    from ..config_checks import check_config
    from ..export import build_decoder, data_of_checkpoint
    from ..train.checkpoint import choice_encoder

    check_config(cfg)  # e.g. captions with a generator that takes no text
    bundle, checkpoint = cfg.get("bundle"), cfg.get("checkpoint")
    if bool(bundle) == bool(checkpoint):
        raise DataError("give bundle=<bundle dir> (or checkpoint=<ckpt>, a decoder built from "
                        "it first)")
    if cfg.reconstruct.captions:
        raise DataError("reconstruct.captions=true: the caption pathway is fitted on a "
                        "training run's trials, and a decoder holds none",
                        hint="neurorecon run ... reconstruct.captions=true")
    choices = None
    if bundle:
        decoder = Decoder.from_pretrained(bundle, device=str(cfg.get("device") or "cpu"))
    else:
        net, dm, job, _ = data_of_checkpoint(checkpoint, cfg)
        with open_dict(job):
            job.reconstruct = cfg.reconstruct
        images = stimulus_images(dm, Path(job.data.root) / job.data.stim_dir)
        choices = validation_choices(job, choice_encoder(checkpoint, net, dm), dm,
                                     stim_images=images)
        decoder = build_decoder(net, dm, cfg=job, generator=True, images=images,
                                rerank=choices["lowlevel_rerank"]["value"],
                                strength=choices["strength"]["value"])
    test = TestTrials.of_dataset(*prepare_dataset(decoder, cfg.data), root=cfg.data.root)
    emb, ids, _ = candidate_embeddings(decoder, cfg, test.stim_files)
    row_of = {s: i for i, s in enumerate(ids)}
    out_dir = Path(cfg.paths.output_dir)
    out = reconstruct(decoder, test, cfg=cfg, out_dir=out_dir,
                      stim_root=Path(cfg.data.root) / cfg.data.stim_dir,
                      true_embeddings=emb[[row_of[f] for f in test.stim_files]],
                      choices=choices)
    metrics = {"modality": decoder.modality, "n_test": out["n_images"],
               "n_test_images": len(set(test.stim_files)),
               "subjects": sorted(test.trials),
               "embedder": decoder.config.embedder.name,
               "embedder_note": decoder.config.embedder.substitute_note,
               **({"bundle": str(bundle)} if bundle else {"checkpoint": str(checkpoint)}),
               "reconstruction": out}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    logger.info("reconstruct: %s", write_report(out_dir, metrics))
    return out
