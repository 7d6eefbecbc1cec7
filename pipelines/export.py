"""``neurorecon export checkpoint=<ckpt> export.out=<dir>``: a trained decoder as a bundle.

:func:`build_decoder` gathers, from a trained encoder and the data module it was trained on,
everything :class:`~neurorecon.pipelines.inference.Decoder` needs (fitted statistics, masks,
gallery, generator, low-level pathway) into one in memory; :func:`save_bundle` writes it with
:meth:`~neurorecon.pipelines.inference.Decoder.save_pretrained`. Training runs score that
decoder, then save it as ``<run dir>/bundle/``; the stage does both in one step
(:func:`export_bundle`) for a checkpoint, rebuilding its data module from the checkpoint's own
(resolved) config.
"""

from __future__ import annotations

import datetime
import hashlib
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from neurorecon.models.bundle import BundleConfig
from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger

from .inference import Decoder, Gallery
from .train.ridge import flat_targets


def _project_provenance() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("neurorecon")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        ver = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"],
                                cwd=Path(__file__).resolve().parent, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"version": ver, "commit": commit,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}


def _cache_key(path: Path) -> str:
    import json

    manifest = Path(path) / "manifest.json"
    if manifest.is_file():
        return str(json.loads(manifest.read_text()).get("key"))
    return Path(path).name


def _portable(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config without this machine's folders: ``hydra`` dropped, and every
    path under a ``paths`` folder or the dataset root written relative to it
    (``<paths.cache_dir>/...``), so a bundle holds no absolute path of its own run. Paths to
    external local models (a CLIP or diffusers directory) are kept: they name what was used."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    roots = {f"<paths.{k}>": str(v) for k, v in (config.get("paths") or {}).items()
             if isinstance(v, str) and Path(v).is_absolute()}
    if "data" in config:
        roots["<data.root>"] = str(config["data"]["root"])
    # longest first: a folder inside another is named after the inner one
    ordered = sorted(roots.items(), key=lambda kv: -len(kv[1]))

    def relative(value):
        if isinstance(value, dict):
            return {k: relative(v) for k, v in value.items()}
        if isinstance(value, list):
            return [relative(v) for v in value]
        if isinstance(value, str):
            for name, root in ordered:
                if value == root or value.startswith(root.rstrip("/") + "/"):
                    return name + value[len(root.rstrip("/")):]
        return value

    return relative(config)


def localized(config: dict[str, Any], paths) -> dict[str, Any]:
    """A bundle's portable config (:func:`_portable`) with this machine's ``paths`` folders
    in place of its ``<paths.name>`` placeholders (e.g. a local CLIP directory kept under the
    project root), for stages that rerun its recipe on new data (``adapt``, ``evaluate``)."""
    roots = {f"<paths.{k}>": str(v) for k, v in dict(paths).items() if isinstance(v, str)}

    def local(value):
        if isinstance(value, dict):
            return {k: local(v) for k, v in value.items()}
        if isinstance(value, list):
            return [local(v) for v in value]
        if isinstance(value, str) and value.startswith("<paths."):
            name, _, rest = value.partition(">")
            if f"{name}>" in roots:
                return roots[f"{name}>"] + rest
        return value

    return local(config)


def subject_entries(dm, *, index: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """The bundle's ``subjects`` entries of ``dm``'s subjects; ``index``: their indices in the
    model (default: the data module's order)."""
    recipe = dm.recipe.get("subjects", {})
    return {label: dm.subjects[label].bundle_entry(
                index=k if index is None else int(index[label]), recipe=recipe.get(label, {}),
                dm=dm)
            for k, label in enumerate(dm.labels)}


def fmri_subject_files(dm) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """fMRI: each subject's mask image and, with ``zscore=train``, its voxel statistics (the
    bundle's ``masks/`` and ``normalisation.safetensors``); empty for MEG."""
    if dm.modality != "fmri":
        return {}, {}
    subjects = dm.data.subjects
    return ({label: subjects[label].mask_img for label in dm.labels},
            {label: subjects[label].voxel_stats for label in dm.labels
             if subjects[label].voxel_stats is not None})


def lowlevel_maps(dm, images: list[Image.Image]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The low-level pathway of every subject of ``dm``: a ridge from its train + val trials
    to the colour thumbnails of ``images`` (its stimuli), as one affine map per subject."""
    from neurorecon.models.generators.base import image_thumbnails

    from .train.ridge import fit_ridges

    ridges = fit_ridges(dm, targets=image_thumbnails(images), subjects=range(len(dm.labels)))
    return {dm.labels[k]: model.linear_map() for k, model in ridges.items()}


def _gallery(dm, images: list[Image.Image]) -> Gallery:
    """Every stimulus of the data module (``images``, in its embedding order): embeddings,
    split of the run, thumbnails."""
    index = dm.embedding_index
    split = np.full(len(index), "unused", dtype=object)
    for name in ("train", "val", "test"):  # test last: an image is test if tested at all
        split[np.unique(dm.splits[name].target)] = name
    table = pd.DataFrame({"image_id": index["stim_file"].astype(str),
                          "concept": index["concept"] if "concept" in index else "",
                          "split": split})
    return Gallery(embeddings=flat_targets(dm), index=table, images=images)


def _generator(cfg: DictConfig, dm, images: list[Image.Image], *, net, rerank: float | None,
               strength: float | None, fit_rows: np.ndarray | None):
    """(generator description, its directory or None, low-level maps) for the bundle.

    ``rerank`` / ``strength``: the low-level re-ranking weight of retrieved starts and the
    img2img strength, as the run chose them on validation trials; None: the rerank weight
    chosen here with ``net``, the strength configured (or, ``auto`` with no choice made,
    :data:`~.reconstruct.generation.STRENGTH_UNCHOSEN`). ``fit_rows``: the stimuli the embedded
    generator trains on (None: :func:`~.reconstruct.generation.generator_rows` of ``dm``)."""
    from .reconstruct.generation import (
        STRENGTH_UNCHOSEN,
        build_generator,
        generator_rows,
        lowlevel_rerank,
    )

    rcfg = cfg.reconstruct
    gen_cfg = rcfg.generator
    fit_rows = generator_rows(dm) if fit_rows is None else fit_rows
    emb = flat_targets(dm)
    generator, training = build_generator(gen_cfg, images=[images[i] for i in fit_rows],
                                          embeddings=emb[fit_rows],
                                          cache_dir=cfg.paths.cache_dir)
    if rerank is None:
        rerank = lowlevel_rerank(cfg, net, dm, stim_images=images)["value"]
    if strength is None and str(rcfg.strength) == "auto":
        logger.warning("reconstruct.strength=auto, but no choice on validation trials was made "
                       "for this bundle (its run did not reconstruct): strength %g",
                       STRENGTH_UNCHOSEN)
        strength = STRENGTH_UNCHOSEN
    desc = {"class": type(generator).__name__, "note": generator.note,
            "embedding_scale": generator.embedding_scale,
            "target_norm": float(np.linalg.norm(emb[fit_rows], axis=1).mean()),
            "resolution": int(generator.resolution), "emb_dim": int(generator.emb_dim),
            "training": training,
            "defaults": {"head": str(rcfg.head),
                         "strength": float(rcfg.strength if strength is None else strength),
                         "steps": int(rcfg.steps), "guidance_scale": float(rcfg.guidance_scale),
                         "seed": int(rcfg.seed), "lowlevel": bool(rcfg.lowlevel),
                         "start": str(rcfg.start), "retrieval_k": int(rcfg.retrieval_k),
                         "retrieval_shortlist": int(rcfg.retrieval_shortlist),
                         "lowlevel_rerank": float(rerank)}}
    if gen_cfg.get("_target_"):
        config = OmegaConf.to_container(gen_cfg, resolve=True)
        config.pop("_target_")
        desc.update(kind="diffusers", config=config)
        gen_dir = None
    else:
        desc.update(kind="embedded", path="generator")
        gen_dir = Path(generator.path)
    lowlevel = {}
    if rcfg.lowlevel:
        lowlevel = lowlevel_maps(dm, images)
        desc["lowlevel"] = "generator/lowlevel.safetensors"
    return desc, gen_dir, lowlevel


def bundle_config(net, dm, *, cfg: DictConfig, metrics: dict[str, Any] | None = None,
                  focus: dict[str, Any] | None = None,
                  generator: dict[str, Any] | None = None) -> BundleConfig:
    """The bundle's ``config.json`` for ``net`` trained on ``dm`` with ``cfg`` (validated
    against the schema here, so a writer that drifts from it fails at export)."""
    spec = dm.embedder_spec
    emb = flat_targets(dm)
    norms = np.linalg.norm(emb, axis=1)
    fingerprint = hashlib.sha256(
        f"{_cache_key(dm.preproc_dir)}/{_cache_key(dm.embeddings_dir)}".encode()).hexdigest()
    headline = {k: metrics[k] for k in ("n_test", "n_test_images", "retrieval",
                                       "retrieval_all_images") if metrics and k in metrics}
    return BundleConfig.model_validate({
        "modality": dm.modality,
        "model_type": type(net).__name__, "model_config": net.get_config(),
        "embedder": {"name": spec.get("name"), "weights": spec.get("weights"),
                     "revision": spec.get("revision"), "emb_dim": int(dm.emb_dim),
                     "n_tokens": dm.n_tokens,
                     "unit_normalised_targets": bool(np.allclose(norms, 1.0, atol=1e-3)),
                     "substitute_note": spec.get("substitute_note"), "spec": spec},
        "preprocessing": {k: v for k, v in dm.recipe.items() if k != "subjects"},
        "subjects": subject_entries(dm),
        "focus": focus,
        "generator": generator,
        "provenance": {"dataset": {"name": "/".join(Path(str(cfg.data.root)).parts[-2:]),
                                   "modality": dm.modality, "fingerprint": fingerprint[:16],
                                   "preprocessing_cache": _cache_key(dm.preproc_dir),
                                   "embeddings_cache": _cache_key(dm.embeddings_dir)},
                       **_project_provenance(), "config": _portable(cfg)},
        "metrics": headline,
    })


def build_decoder(net, dm, *, cfg: DictConfig, metrics: dict[str, Any] | None = None,
                  focus: dict[str, Any] | None = None, generator: bool | None = None,
                  rerank: float | None = None, strength: float | None = None,
                  images: list[Image.Image] | None = None,
                  generator_fit: np.ndarray | None = None) -> Decoder:
    """The :class:`~.inference.Decoder` of ``net`` (trained on ``dm`` with ``cfg``), in
    memory: what a bundle of it holds, before it is written.

    ``generator``: include the generator and the low-level pathway (default: when
    ``cfg.reconstruct.enabled``; the embedded generator is the cached one of the run);
    ``rerank`` / ``strength``: the low-level re-ranking weight and img2img strength the run
    chose on validation trials (None: as :func:`_generator` says); ``images``: ``dm``'s
    stimulus images where the caller has them; ``generator_fit``: the stimuli the embedded
    generator trains on, where ``dm`` no longer tells them (a refit's data module has no
    validation split: its caller passes the run's train images).
    """
    from .reconstruct.generation import stimulus_images

    if images is None:
        images = stimulus_images(dm, Path(cfg.data.root) / cfg.data.stim_dir)
    if generator is None:
        generator = bool(cfg.get("reconstruct") and cfg.reconstruct.enabled)
    gen_desc, gen_dir, lowlevel = (_generator(cfg, dm, images, net=net, rerank=rerank,
                                              strength=strength, fit_rows=generator_fit)
                                   if generator else (None, None, {}))
    config = bundle_config(net, dm, cfg=cfg, metrics=metrics, focus=focus, generator=gen_desc)
    masks, voxel_stats = fmri_subject_files(dm)
    return Decoder(net=net, config=config, masks=masks, gallery=_gallery(dm, images),
                   lowlevel=lowlevel, generator_dir=gen_dir, voxel_stats=voxel_stats)


def save_bundle(decoder: Decoder, out: str | Path, *, overwrite: bool = False
                ) -> dict[str, Any]:
    """Write ``decoder``'s bundle to ``out``; returns ``{"path", "bytes", "seconds"}``."""
    t0 = time.perf_counter()
    path = decoder.save_pretrained(out, overwrite=overwrite)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    seconds = round(time.perf_counter() - t0, 2)
    logger.info("bundle: %s (%.1f MB, %.1f s)", path, size / 1e6, seconds)
    return {"path": str(path), "bytes": int(size), "seconds": seconds}


def export_bundle(net, dm, *, cfg: DictConfig, out: str | Path,
                  overwrite: bool = False, **kwargs) -> dict[str, Any]:
    """Write the bundle of ``net`` (trained on ``dm`` with ``cfg``) to ``out``
    (:func:`build_decoder`, whose options ``kwargs`` are, then :func:`save_bundle`)."""
    return save_bundle(build_decoder(net, dm, cfg=cfg, **kwargs), out, overwrite=overwrite)


def data_of_checkpoint(checkpoint: str | Path, cfg: DictConfig):
    """A checkpoint's encoder, the data module it was trained on and its resolved config
    (with this command's ``paths``)."""
    from .train.checkpoint import load_checkpoint
    from .train.fit import build_datamodule, prepare_caches

    net, desc = load_checkpoint(checkpoint)
    job = OmegaConf.create(desc["config"])
    with open_dict(job):
        job.paths = cfg.paths
    preproc_dir, emb_dir = prepare_caches(job)
    dm = build_datamodule(job, preproc_dir, emb_dir)
    if dm.labels != list(desc["data"]["subjects"]):
        raise DataError(f"the checkpoint's training data now has subjects {dm.labels}, the "
                        f"checkpoint was trained on {list(desc['data']['subjects'])}",
                        path=checkpoint)
    return net, dm, job, desc


def run(cfg: DictConfig) -> dict[str, Any]:
    """Stage entry point (Hydra root config ``export.yaml``)."""
    import json

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise DataError("needs checkpoint=<path to a .ckpt written by neurorecon train>")
    if OmegaConf.is_missing(cfg.export, "out"):
        raise DataError("needs export.out=<directory for the bundle>")
    net, dm, job, desc = data_of_checkpoint(cfg.checkpoint, cfg)
    run_metrics = Path(cfg.checkpoint).resolve().parent.parent / "metrics.json"
    metrics = json.loads(run_metrics.read_text()) if run_metrics.is_file() else None
    focus = (metrics or {}).get("training", {}).get("focus")
    generator = (bool(job.reconstruct.enabled) if cfg.export.generator is None
                 else bool(cfg.export.generator))
    images, rerank = None, None
    if generator:
        from .reconstruct.generation import lowlevel_rerank, stimulus_images
        from .train.checkpoint import choice_encoder

        images = stimulus_images(dm, Path(job.data.root) / job.data.stim_dir)
        rerank = lowlevel_rerank(job, choice_encoder(cfg.checkpoint, net, dm), dm,
                                 stim_images=images)["value"]
    # the strength its run chose on validation trials (a choice that needs the generator)
    strength = ((metrics or {}).get("reconstruction") or {}).get("strength")
    return export_bundle(net, dm, cfg=job, out=cfg.export.out, metrics=metrics, focus=focus,
                         generator=generator, rerank=rerank, strength=strength, images=images,
                         overwrite=bool(cfg.export.overwrite))
