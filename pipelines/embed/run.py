"""The embed stage: stimulus images (or their captions) -> keyed embeddings cache + a figure.

``neurorecon embed [data=...] [embedder=...] [embed.images=events|all]``

Which stimuli: ``embed.images=events`` takes the images named in the events files of the
recordings of ``data`` (the stimuli the brain data can be matched to); ``all`` takes every
image under ``<data.root>/<data.stim_dir>``. Rows are sorted by ``stim_file``.

Cache layout (one entry per embedder spec, weights, image set and image files; see
:mod:`neurorecon.pipelines.common.cache`)::

    <paths.cache_dir>/embeddings/<name>@<revision>/<layer>-<pooling>/<images|captions>-<key>/
        embeddings.npy   float32, (n, emb_dim) -- or (n, n_tokens, dim) for CLIP tokens
        index.tsv        stim_file (row order), concept ("" if unknown), caption (text only)
        spec.json        the embedder's spec (name, source, weights, layer, ..., substitute_note)
        embeddings.png   similarity matrix by concept + 2-D PCA map
        manifest.json    written last by the cache

``<revision>`` is the start of the weights' sha256 (or of a local model directory's identity).
Training reads an entry with :func:`load_embeddings`. The run directory gets
``embed_summary.json`` and a copy of the figure.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurorecon.models.common.checks import DataError, check_columns, check_option, read_tsv
from neurorecon.models.common.logging import logger, progress

from ..common.cache import MANIFEST, cache_entry
from ..data.events import EventSpec, read_events
from ..data.studies import find_recordings

#: file extensions taken as images under the stimulus folder (``embed.images=all``)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: images decoded at a time (bounds memory on large stimulus sets)
CHUNK = 256
#: which stimuli the embed stage embeds: those the events name, or every image found
IMAGE_SELECTIONS = ("events", "all")
FIGURE = "embeddings.png"
SUMMARY = "embed_summary.json"


# ----------------------------------------------------------------------------- stimuli
def select_stimuli(data, *, images: str) -> tuple[Path, list[str]]:
    """Return the stimulus folder and the sorted stimulus paths (relative to it) to embed.

    Parameters
    ----------
    data : DictConfig
        The ``data`` config (``root``, ``modality``, ``subjects``, ``sessions``, ``tasks``,
        ``missing_runs``, ``stim_dir``, ``stim_column``, ``split_column``, ``test_value``).
    images : str
        ``events`` (stimuli named in the recordings' events files) or ``all``.
    """
    check_option("embed.images", images, IMAGE_SELECTIONS)
    root = Path(str(data.root))
    stim_root = root / str(data.stim_dir)
    if images == "all":
        if not stim_root.is_dir():
            raise DataError("stimulus folder does not exist", path=stim_root,
                            hint="set data.stim_dir to the folder holding the stimulus images")
        files = sorted(
            p.relative_to(stim_root).as_posix()
            for p in stim_root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(stim_root).parts)
        )
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found", path=stim_root)
        return stim_root, files

    spec = EventSpec.from_config(data)
    recordings = find_recordings(
        root, modality=str(data.modality), subjects=_list(data.get("subjects")),
        sessions=_list(data.get("sessions")), tasks=_list(data.get("tasks")),
        missing_runs=str(data.get("missing_runs", "error")))  # older saved configs lack it
    stims: set[str] = set()
    for rec in recordings:
        stims.update(read_events(rec.events_path, bids_root=root, spec=spec)[spec.stim_column])
    return stim_root, sorted(stims)


def _list(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def stimulus_table(stim_root: Path, stim_files: list[str], *,
                   captions: str | Path | None = None, need_captions: bool = False
                   ) -> tuple[pd.DataFrame, list[Path]]:
    """Index table of the stimuli (stim_file, concept[, caption]) and the tables it read.

    ``concept`` comes from ``<stim_root>/stimuli.tsv`` when it has that column, else from the
    image's folder (THINGS layout ``<concept>/<concept>_NN.jpg``), else "". Captions come from
    ``captions`` (a TSV with ``stim_file`` and ``caption``) or ``<stim_root>/stimuli.tsv``;
    with ``need_captions`` a missing table or caption raises :class:`DataError`.
    """
    index = pd.DataFrame({"stim_file": stim_files})
    index["concept"] = [Path(s).parent.name if Path(s).parent.name else "" for s in stim_files]
    used: list[Path] = []
    default_table = stim_root / "stimuli.tsv"
    if default_table.is_file():
        table = read_tsv(default_table, what="stimulus table", columns=["stim_file"], text=True)
        used.append(default_table)
        if "concept" in table.columns:
            known = dict(zip(table["stim_file"], table["concept"].astype(str), strict=True))
            index["concept"] = [known.get(s, c) for s, c in zip(stim_files, index["concept"],
                                                                   strict=True)]
    if need_captions:
        path = Path(captions) if captions else default_table
        if not path.is_file():
            raise DataError(
                "captions table not found", path=path,
                hint="text embedders need a TSV with columns stim_file and caption: put it at "
                "<data.root>/<data.stim_dir>/stimuli.tsv or set embed.captions=<path>")
        table = read_tsv(path, what="stimulus table", columns=["stim_file"], text=True)
        check_columns(table, ["caption"], path=path)
        if path not in used:
            used.append(path)
        text = dict(zip(table["stim_file"], table["caption"].fillna("").astype(str), strict=True))
        missing = [s for s in stim_files if not text.get(s, "").strip()]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise DataError(f"no caption for {len(missing)} of {len(stim_files)} stimuli: {shown}",
                            path=path, hint="every embedded stimulus needs a non-empty caption")
        index["caption"] = [text[s] for s in stim_files]
    return index, used


def check_images(files: list[Path]) -> None:
    """Raise :class:`DataError` naming the first file that is not a readable image (header)."""
    from PIL import Image, UnidentifiedImageError

    for f in progress(files, desc="check images", total=len(files)):
        try:
            with Image.open(f) as im:
                im.size  # noqa: B018 - header parsed
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"not a readable image ({exc.__class__.__name__}: {exc})",
                            path=f) from exc


def load_images(files: list[Path]) -> list:
    """Decode ``files`` as RGB PIL images; :class:`DataError` names a broken or truncated one."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"not a readable image ({exc.__class__.__name__}: {exc})",
                            path=f) from exc
    return images


# ----------------------------------------------------------------------------- cache I/O
def load_embeddings(path: str | Path) -> tuple[np.ndarray, pd.DataFrame, dict[str, Any]]:
    """Read an embeddings cache entry.

    Parameters
    ----------
    path : str | Path
        The entry directory (``embed_summary.json["cache"]``).

    Returns
    -------
    embeddings : np.ndarray
        float32, ``(n, emb_dim)`` (or ``(n, n_tokens, dim)``), row ``i`` = ``index`` row ``i``.
    index : pandas.DataFrame
        ``stim_file``, ``concept`` (and ``caption`` for text embeddings).
    spec : dict
        The embedder spec, including ``substitute_note``.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise DataError("not a complete embeddings cache entry (no manifest.json)", path=path,
                        hint="run `neurorecon embed` and use the cache path it reports")
    emb = np.load(path / "embeddings.npy")
    index = read_tsv(path / "index.tsv", what="embeddings index", text=True)
    spec = json.loads((path / "spec.json").read_text())
    if len(index) != len(emb):
        raise DataError(f"{len(emb)} embeddings but {len(index)} index rows", path=path)
    return emb, index, spec


def _compute(embedder, stim_root: Path, index: pd.DataFrame, *, batch_size: int
             ) -> tuple[np.ndarray, list]:
    """Embed the indexed stimuli chunk by chunk; also return small thumbnails for the figure."""
    if embedder.input_kind == "text":
        emb = embedder.embed(list(index["caption"]), batch_size=batch_size)
        return emb, []
    files = [stim_root / s for s in index["stim_file"]]
    parts, thumbs = [], []
    starts = range(0, len(files), CHUNK)
    for start in progress(starts, desc="embed images", total=len(starts)):
        images = load_images(files[start : start + CHUNK])
        parts.append(embedder.embed(images, batch_size=batch_size))
        for im in images:
            im.thumbnail((40, 40))
            thumbs.append(im)
    return np.concatenate(parts), thumbs


# ----------------------------------------------------------------------------- figure
def plot_embeddings(emb: np.ndarray, index: pd.DataFrame, spec: dict[str, Any], path: Path, *,
                    thumbs: list | None = None, max_items: int = 1500) -> dict[str, float]:
    """Save a figure: cosine similarity sorted by concept, and a 2-D PCA map of the items.

    Returns the mean within- and between-concept cosine similarities shown in the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    n = len(emb)
    rows = np.arange(n)
    if n > max_items:  # keep the figure readable: an even subsample
        rows = np.linspace(0, n - 1, max_items).round().astype(int)
    concepts = index["concept"].astype(str).to_numpy()[rows]
    order = np.lexsort((index["stim_file"].to_numpy()[rows], concepts))
    rows, concepts = rows[order], concepts[order]
    x = emb[rows].reshape(len(rows), -1).astype(np.float64)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T

    same = concepts[:, None] == concepts[None, :]
    off = ~np.eye(len(rows), dtype=bool)
    stats = {  # None when undefined (one item per concept, or a single concept)
        "within_concept_cosine": float(sim[same & off].mean()) if (same & off).any() else None,
        "between_concept_cosine": float(sim[~same].mean()) if (~same).any() else None,
    }

    names, first = np.unique(concepts, return_index=True)
    names = names[np.argsort(first)]
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    color = {c: cmap(i % cmap.N) for i, c in enumerate(names)}

    fig, (ax_sim, ax_map) = plt.subplots(1, 2, figsize=(13, 6.2))
    im = ax_sim.imshow(sim, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax_sim, fraction=0.046, pad=0.04, label="cosine similarity")
    bounds = [int(np.flatnonzero(concepts == c)[0]) for c in names] + [len(rows)]
    for b in bounds[1:-1]:
        ax_sim.axhline(b - 0.5, color="w", lw=0.6)
        ax_sim.axvline(b - 0.5, color="w", lw=0.6)
    if 1 < len(names) <= 40:
        centers = [(a + b - 1) / 2 for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        ax_sim.set_xticks(centers, names, rotation=90, fontsize=7)
        ax_sim.set_yticks(centers, names, fontsize=7)
    fmt = {k: "n/a" if v is None else f"{v:.2f}" for k, v in stats.items()}
    ax_sim.set_title(
        f"{len(rows)} stimuli sorted by concept\nmean cosine within concept "
        f"{fmt['within_concept_cosine']} vs between {fmt['between_concept_cosine']}", fontsize=10)

    centered = unit - unit.mean(axis=0)
    if len(rows) >= 2 and np.abs(centered).sum() > 0:
        u, s, _ = np.linalg.svd(centered, full_matrices=False)
        xy = u[:, :2] * s[:2] if u.shape[1] >= 2 else np.c_[u[:, 0] * s[0], np.zeros(len(rows))]
        explained = s[:2] ** 2 / np.sum(s**2)
    else:
        xy, explained = np.zeros((len(rows), 2)), np.zeros(2)
    ax_map.scatter(xy[:, 0], xy[:, 1], c=[color[c] for c in concepts], s=28,
                   edgecolors="k", linewidths=0.3)
    if thumbs and len(rows) <= 80:
        for (px, py), r, c in zip(xy, rows, concepts, strict=True):
            box = AnnotationBbox(OffsetImage(np.asarray(thumbs[r]), zoom=0.6), (px, py),
                                 frameon=True, pad=0.1, bboxprops={"edgecolor": color[c]})
            ax_map.add_artist(box)
    if 1 < len(names) <= 20:
        handles = [plt.Line2D([], [], ls="", marker="o", color=color[c], label=c or "(none)")
                   for c in names]
        ax_map.legend(handles=handles, fontsize=7, loc="best", framealpha=0.7)
    ax_map.set_xlabel(f"PC1 ({explained[0]:.0%})")
    ax_map.set_ylabel(f"PC2 ({explained[1]:.0%})")
    ax_map.set_title("PCA of the L2-normalized embeddings", fontsize=10)
    ax_map.margins(0.12)

    fig.suptitle(f"{spec['name']} @ {spec['revision']} - {spec['layer']} ({spec['pooling']}), "
                 f"dim {spec['emb_dim']}", fontsize=12)
    note = spec.get("substitute_note") or ""
    fig.text(0.5, 0.01, "\n".join(textwrap.wrap(note, 150)), ha="center", va="bottom",
             fontsize=8, style="italic", color="0.3")
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return stats


# ----------------------------------------------------------------------------- stage
def make_embedder(cfg):
    """Instantiate ``cfg.embedder`` on ``cfg.embed.device``; bad paths surface as DataError."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    missing = [f"embedder.{k}" for k in cfg.embedder if OmegaConf.is_missing(cfg.embedder, k)]
    if missing:
        target = str(cfg.embedder.get("_target_", "?")).rsplit(".", 1)[-1]
        raise DataError(
            f"{target} needs {', '.join(missing)}",
            hint="set it on the command line, e.g. embedder.path=<local directory written by "
            "save_pretrained()>; nothing is downloaded")
    try:
        return instantiate(cfg.embedder, device=str(cfg.embed.device))
    except InstantiationException as exc:  # Hydra wraps constructor errors; keep ours clear
        if isinstance(exc.__cause__, DataError):
            raise exc.__cause__ from None
        raise


def run(cfg) -> dict[str, Any]:
    """Run the embed stage for a composed ``configs/embed.yaml``; return the summary dict."""
    from omegaconf import OmegaConf

    t0 = time.perf_counter()
    stim_root, stim_files = select_stimuli(cfg.data, images=str(cfg.embed.images))
    embedder = make_embedder(cfg)
    spec = embedder.spec
    kind = "captions" if embedder.input_kind == "text" else "images"
    index, tables = stimulus_table(stim_root, stim_files, captions=cfg.embed.get("captions"),
                                   need_captions=kind == "captions")
    files = [stim_root / s for s in stim_files]
    check_images(files)
    logger.info("embed: %d stimuli from %s with %s", len(files), stim_root, spec["name"])

    params = {
        "embedder": OmegaConf.to_container(cfg.embedder, resolve=True),
        "spec": spec,
        "n_items": len(files),
    }
    inputs = [*files, *tables]
    name = f"{spec['name']}@{spec['revision']}/{spec['layer']}-{spec['pooling']}/{kind}"
    entry = cache_entry(cfg.paths.cache_dir, "embeddings", name, params, inputs=inputs)
    reused = entry.exists()
    if reused:
        logger.info("cache: reusing %s (created %s)", entry.path, entry.manifest()["created"])
    else:
        with entry.writing(params, inputs=inputs) as tmp:
            emb, thumbs = _compute(embedder, stim_root, index, batch_size=int(cfg.embed.batch_size))
            np.save(tmp / "embeddings.npy", emb)
            index.to_csv(tmp / "index.tsv", sep="\t", index=False)
            (tmp / "spec.json").write_text(json.dumps(spec, indent=2))
            stats = plot_embeddings(emb, index, spec, tmp / FIGURE, thumbs=thumbs)
            (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    emb, index, spec = load_embeddings(entry.path)

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(entry.path / FIGURE, out_dir / FIGURE)
    summary = {
        "cache": str(entry.path),
        "reused_cache": reused,
        "input": kind,
        "images": str(cfg.embed.images),
        "n_items": int(len(emb)),
        "emb_dim": int(spec["emb_dim"]),
        "shape": list(emb.shape),
        "seconds": round(time.perf_counter() - t0, 3),
        "figure": FIGURE,
        "stats": json.loads((entry.path / "stats.json").read_text()),
        "spec": spec,
    }
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    logger.info("embed: %d x %s %s -> %s (%.1f s)%s", len(emb), list(emb.shape[1:]),
                spec["name"], entry.path, summary["seconds"], " [cached]" if reused else "")
    if spec.get("substitute_note"):
        logger.info("embed: note: %s", spec["substitute_note"])
    return summary
