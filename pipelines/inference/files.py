"""The bundle's files: names, the config reader, weights, masks, gallery, low-level maps,
normalisation statistics and the model card (:mod:`neurorecon.pipelines.inference`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from neurorecon.models.bundle import (
    FORMAT,
    FORMAT_VERSION,
    BundleConfig,
    FmriSubject,
    ValidationError,
    problems,
)
from neurorecon.models.common.checks import DataError

CONFIG, WEIGHTS, MASKS, GALLERY, GENERATOR = (
    "config.json", "model.safetensors", "masks", "gallery", "generator")
LOWLEVEL = "lowlevel.safetensors"
NORMALISATION = "normalisation.safetensors"
#: a model file's metadata key: ``{"copy": "stored tensor"}`` for tensors stored once
TIED = "neurorecon.tied"
TIE_MIN_NUMEL = 1 << 16
THUMBNAIL_SIZE = 96


class BundleError(DataError):
    """A bundle directory that cannot be used: the message names the file and the problem."""



@dataclass
class Gallery:
    """Candidate images of retrieval: embeddings, an index table and thumbnails.

    ``index`` columns: ``image_id`` (the stimulus file, relative to the stimuli folder),
    ``concept``, ``split`` (``train``, ``val``, ``test`` or ``unused`` in the training run) and
    ``thumbnail`` (PNG path inside the bundle).
    """

    embeddings: np.ndarray  # (n_images, emb_dim) float32
    index: pd.DataFrame
    root: Path | None = None  # bundle gallery folder (thumbnails are read from it)
    images: Sequence[Image.Image] | None = None  # in-memory thumbnails (before saving)

    def __len__(self) -> int:
        return len(self.index)

    def thumbnail(self, i: int) -> Image.Image:
        """The thumbnail of gallery row ``i``."""
        if self.images is not None:
            return self.images[i]
        if self.root is None:
            raise BundleError("this gallery has no thumbnails")
        path = self.root / self.index["thumbnail"].iloc[i]
        if not path.is_file():
            raise BundleError("gallery thumbnail missing", path=path)
        with Image.open(path) as im:
            return im.convert("RGB")

    def rows(self, split: str | None = None) -> np.ndarray:
        """Gallery rows of ``split`` (all rows for None)."""
        if split is None:
            return np.arange(len(self))
        rows = np.flatnonzero(self.index["split"].to_numpy() == split)
        if not len(rows):
            raise DataError(f"the gallery has no {split!r} images; splits: "
                            f"{sorted(set(self.index['split']))}")
        return rows


def read_bundle_config(root: Path) -> BundleConfig:
    """``config.json`` of a bundle, checked for format and version, then against the schema
    (:class:`~neurorecon.models.bundle.BundleConfig`)."""
    if not root.is_dir():
        raise BundleError("not a bundle directory", path=root)
    path = root / CONFIG
    if not path.is_file():
        raise BundleError("config.json missing: not a neurorecon bundle", path=root)
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"unreadable JSON ({exc})", path=path) from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise BundleError(f"not a neurorecon decoder config (format {config.get('format')!r})"
                          if isinstance(config, dict) else "not a JSON object", path=path)
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle format version {version}; this neurorecon reads version "
                          f"{FORMAT_VERSION} (re-export it: neurorecon export checkpoint=<ckpt> "
                          "export.out=<dir>)", path=path)
    try:
        return BundleConfig.model_validate(config)
    except ValidationError as exc:
        raise BundleError(f"config.json does not fit the bundle schema ({problems(exc)})",
                          path=path) from exc


def _load_net(root: Path, model_type: str, net_config: dict[str, Any], weights: str):
    """A model of the bundle: built from its config, its weights from ``root / weights``."""
    from safetensors import SafetensorError, safe_open

    from neurorecon.models.registry import build

    try:
        net = build(model_type, net_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"cannot rebuild the model ({exc})", path=root / CONFIG) from exc
    path = root / weights
    if not path.is_file():
        raise BundleError("model weights missing", path=path)
    try:
        with safe_open(path, framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            tied = json.loads((f.metadata() or {}).get(TIED, "{}"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"unreadable or truncated safetensors file ({exc}); re-export "
                          "the bundle", path=path) from exc
    if not isinstance(tied, dict) or any(not isinstance(src, str) or src not in state
                                         for src in tied.values()):
        raise BundleError(f"metadata {TIED!r} names tensors the file lacks", path=path)
    state.update({copy: state[src] for copy, src in tied.items()})
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BundleError(f"weights do not fit the model in config.json ({first})",
                          path=path) from exc
    return net


def _save_net(net: torch.nn.Module, path: Path) -> None:
    """``net``'s state in ``path``; a large tensor equal to an earlier one (an ensemble's
    members share their MEG read-out) is stored once, the copies named in the metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tied: dict[str, str] = {}
    kept: dict[tuple, list[str]] = {}
    for key, value in state.items():
        if value.numel() < TIE_MIN_NUMEL:
            continue
        same = kept.setdefault((value.dtype, tuple(value.shape)), [])
        src = next((k for k in same if torch.equal(state[k], value)), None)
        if src is None:
            same.append(key)
        else:
            tied[key] = src
    save_file({k: v for k, v in state.items() if k not in tied}, path,
              metadata={TIED: json.dumps(tied)} if tied else None)


def _load_mask(root: Path, label: str, info: FmriSubject):
    import nibabel as nib

    path = root / info.mask
    if not path.is_file():
        raise BundleError(f"voxel mask of sub-{label} missing", path=path)
    try:
        mask = nib.load(path)
        inside = np.asarray(mask.dataobj) > 0
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise BundleError(f"unreadable mask ({exc})", path=path) from exc
    if int(inside.sum()) != info.n_voxels:
        raise BundleError(f"mask has {int(inside.sum())} voxels, the model's sub-{label} "
                          f"adapter takes {info.n_voxels}", path=path)
    return mask


def _save_gallery(gallery: Gallery, folder: Path) -> None:
    from safetensors.torch import save_file

    (folder / "thumbnails").mkdir(parents=True)
    index = gallery.index.copy()
    index["thumbnail"] = [f"thumbnails/{i:05d}.png" for i in range(len(index))]
    for i in range(len(index)):
        im = gallery.thumbnail(i).copy()
        im.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        im.save(folder / index["thumbnail"].iloc[i])
    save_file({"embeddings": torch.from_numpy(np.ascontiguousarray(gallery.embeddings,
                                                                   np.float32))},
              folder / "embeddings.safetensors")
    index.to_csv(folder / "index.tsv", sep="\t", index=False)


def _load_gallery(folder: Path) -> Gallery:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        emb = load_file(folder / "embeddings.safetensors")["embeddings"]
        index = pd.read_csv(folder / "index.tsv", sep="\t", dtype=str, keep_default_na=False)
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise BundleError(f"unreadable gallery ({exc})", path=folder) from exc
    if len(index) != len(emb):
        raise BundleError(f"{len(emb)} gallery embeddings but {len(index)} index rows",
                          path=folder)
    return Gallery(embeddings=emb, index=index, root=folder)


def _load_lowlevel(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        return {}
    try:
        arrays = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"unreadable low-level pathway ({exc})", path=path) from exc
    labels = sorted({k.split(".")[0].removeprefix("sub-") for k in arrays})
    return {lab: (arrays[f"sub-{lab}.weight"], arrays[f"sub-{lab}.bias"]) for lab in labels}


def _load_voxel_stats(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        return {}
    try:
        return {k.removeprefix("sub-"): v for k, v in load_file(path).items()}
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"unreadable normalisation statistics ({exc})", path=path) from exc


def model_card(config: BundleConfig) -> str:
    """The bundle's README.md: data, subjects, metrics beside chance and ridge, substitutes."""
    prov, metrics, embedder = config.provenance, config.metrics, config.embedder
    lines = [f"# neurorecon {config.modality.upper()} decoder ({config.model_type})", "",
             "Load with `neurorecon.pipelines.inference.Decoder.from_pretrained(<this dir>)`.",
             "", "## Data", "",
             f"- dataset: `{prov.dataset.name}` (fingerprint `{prov.dataset.fingerprint}`)",
             f"- subjects: {', '.join('sub-' + s for s in config.subjects)}",
             f"- embedder: {embedder.name} (weights `{embedder.weights}`, dim "
             f"{embedder.emb_dim})"]
    prep = config.preprocessing
    if config.modality == "meg":
        p = prep["params"]
        lines.append(f"- preprocessing: {p['l_freq']}-{p['h_freq']} Hz band-pass "
                     f"(phase **{p['phase']}**), {p['sfreq']:g} Hz, epochs "
                     f"[{p['tmin']}, {p['tmax']}] s; "
                     + ("streamable (causal)" if p["phase"] == "causal" else
                        "not streamable (zero-phase: train with preprocess.meg.phase=causal)"))
        if config.focus is not None:
            f = config.focus
            lines.append(f"- temporal focus: [{f.tmin:.3f}, {f.tmax:.3f}] s ({f.reason})")
    else:
        delays = ", ".join(f"sub-{label} {entry.hrf_onset:+g} s"
                           for label, entry in config.subjects.items()
                           if entry.hrf_onset is not None)
        lines.append(f"- preprocessing: {prep.get('glm')} single-trial GLM, "
                     f"{prep.get('hrf_model')} HRF"
                     + (f" delayed ({prep.get('hrf_onset')}: {delays})" if delays else "")
                     + f", per-voxel z-score: {prep.get('zscore')}; masks in `masks/`")
    retrieval = metrics.get("retrieval")
    if retrieval:
        lines += ["", f"## Test-set retrieval ({metrics.get('n_test')} rows, "
                  f"{metrics.get('n_test_images')} images)", "",
                  "| decoder | top-1 | top-5 | median rank |", "|---|---|---|---|"]
        for name, m in retrieval.items():
            lines.append(f"| {name} | {m['top1']:.3f} | {m['top5']:.3f} | "
                         f"{m.get('median_rank', float('nan')):.1f} |")
    gen = config.generator
    lines += ["", "## Substitutes", "",
              f"- embedder: {embedder.substitute_note or 'none'}",
              f"- generator: {gen.note if gen else 'no generator in this bundle'}"]
    if gen:
        d = gen.defaults
        lines.append(f"- generation: start {d.start}, low-level re-ranking weight "
                     f"{d.lowlevel_rerank:g}, strength {d.strength:g}"
                     + (" (no sampler step: the images are their starts)"
                        if d.strength == 0 else ""))
    lines += ["", "## Provenance", "",
              f"- neurorecon {prov.version} (commit {prov.commit}), created {prov.created}", ""]
    return "\n".join(lines)
