"""The trained-decoder bundle and :class:`Decoder`, the one way to decode with a trained model.

A bundle is a directory (written by ``neurorecon export`` and by every ``train``/``run``, under
``<run dir>/bundle/``) that loads with no Hydra, no Lightning and no unpickling:

- ``config.json``: format version, modality, ``model_type`` + constructor config, embedder
  identity, preprocessing recipe (including ``phase``), per-subject fitted statistics (MEG
  channels, 2D positions, sensor kinds, bads, input rate, scaler; fMRI voxel count, mask file,
  normalisation), gallery and generator descriptions, provenance and headline metrics;
- ``model.safetensors``: the encoder's weights and buffers (fMRI subspace axes included);
- ``masks/sub-<label>_mask.nii.gz`` (fMRI): each subject's voxel mask on its grid;
- ``gallery/``: candidate embeddings (``embeddings.safetensors``), ``index.tsv`` (image id,
  concept, split, thumbnail) and ``thumbnails/*.png``;
- ``generator/``: the embedded generator's ``save_pretrained`` directory (or, for a diffusers
  backend, its local path in ``config.json``) and ``lowlevel.safetensors``, the low-level
  pathway's per-subject ridge maps;
- ``README.md``: the model card.

The transforms are the offline ones (:mod:`.preprocess.meg`, :mod:`.preprocess.fmri`) with the
bundle's frozen statistics, so decoding the data a run was trained on gives that run's numbers.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
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
from neurorecon.models.common.checks import DataError, check_columns, check_finite, read_tsv
from neurorecon.models.common.logging import logger
from neurorecon.models.retrieval import CandidateIndex

CONFIG, WEIGHTS, MASKS, GALLERY, GENERATOR = (
    "config.json", "model.safetensors", "masks", "gallery", "generator")
LOWLEVEL = "lowlevel.safetensors"
NORMALISATION = "normalisation.safetensors"
THUMBNAIL_SIZE = 96


class BundleError(DataError):
    """A bundle directory that cannot be used: the message names the file and the problem."""


# --------------------------------------------------------------------------------------------
# batched encoding (one implementation for training runs, evaluation, serving, streaming)
# --------------------------------------------------------------------------------------------
@torch.inference_mode()
def encode_batches(net: torch.nn.Module, x: np.ndarray | torch.Tensor, *, subject: int | str,
                   inputs: Mapping[str, torch.Tensor] | None = None, head: str = "clip",
                   batch_size: int = 256) -> np.ndarray:
    """Run ``net`` (eval mode, inference mode) on one subject's trials; ``(n, n_outputs)``.

    Parameters
    ----------
    net : nn.Module
        An encoder: ``net(x, subject=..., **inputs)`` returns ``{"clip", "mse"}``.
    x : array or tensor
        ``(n, n_chans, n_times)`` MEG windows or ``(n, n_voxels)`` fMRI patterns.
    subject : int | str
        The subject's index in the model (a label for fMRI models).
    inputs : mapping of str to tensor
        Per-subject inputs (MEG ``positions``, ``mask``, ``sensors``), without a batch axis.
    head : {"clip", "mse"}
        The contrastive head (retrieval) or the regression head (generation).
    batch_size : int
        Trials per forward pass.
    """
    if head not in ("clip", "mse"):
        raise ValueError(f"head must be 'clip' or 'mse', got {head!r}")
    if any(m.training for m in net.modules()):  # eval() walks every module: not per window
        net.eval()
    x = torch.as_tensor(np.asarray(x, dtype=np.float32) if not torch.is_tensor(x) else x,
                        dtype=torch.float32)
    device = next(net.parameters()).device
    parts = []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device)
        extra = {k: v.to(device).unsqueeze(0).expand(len(xb), *v.shape)
                 for k, v in (inputs or {}).items()}
        sub = subject if isinstance(subject, str) else torch.full((len(xb),), int(subject),
                                                                  device=device)
        out = net(xb, subject=sub, **extra)[head]
        parts.append(out.float().reshape(len(xb), -1).cpu().numpy())
    if not parts:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(parts)


def predict_split(net: torch.nn.Module, dm, name: str, *, head: str = "clip",
                  subject_index: Mapping[str, int] | None = None) -> np.ndarray:
    """Predictions of ``net`` for every row of split ``name`` of a data module (row order).

    ``head``: ``"clip"`` (retrieval) or ``"mse"`` (conditions generation, as in Benchetrit et
    al. 2023). ``subject_index`` maps the data module's labels to the model's subject indices
    (default: the data module's own order).
    """
    split = dm.splits[name]
    out: np.ndarray | None = None
    for k in np.unique(split.subject):
        rows, X = dm.subject_rows(name, int(k))
        label = dm.labels[int(k)]
        sub = int(k) if subject_index is None else subject_index[label]
        pred = encode_batches(net, X, subject=sub, inputs=dm.subject_inputs(int(k)), head=head)
        if out is None:
            out = np.zeros((len(split), pred.shape[1]), np.float32)
        out[rows] = pred
    return np.zeros((0, 0), np.float32) if out is None else out


# --------------------------------------------------------------------------------------------
# the gallery
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# the decoder
# --------------------------------------------------------------------------------------------
class Decoder:
    """A trained brain decoder: prepare data -> encode -> retrieve / reconstruct.

    Build it with :meth:`from_pretrained` (a bundle directory); ``neurorecon export`` and the
    training runs write bundles with :meth:`save_pretrained`. Both give the decoder of the
    bundle's modality, :class:`MegDecoder` or :class:`FmriDecoder`: what is common (subjects,
    encoding, retrieval, reconstruction, files) is here, how a modality's data is prepared and
    fed to the model is theirs.

    Attributes
    ----------
    modality : {"meg", "fmri"}
    subjects : list of str
        Subject labels, in the model's index order.
    gallery : Gallery
        Retrieval candidates.
    config : BundleConfig
        The bundle's ``config.json``, typed (:mod:`neurorecon.models.bundle`).
    """

    def __new__(cls, *args, config: BundleConfig, **kwargs):
        """``Decoder(...)`` builds the decoder of ``config``'s modality (:data:`DECODERS`)."""
        return super().__new__(DECODERS[config.modality] if cls is Decoder else cls)

    def __init__(self, *, net: torch.nn.Module, config: BundleConfig,
                 masks: Mapping[str, Any] | None = None, gallery: Gallery | None = None,
                 lowlevel: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 generator_dir: str | Path | None = None, root: str | Path | None = None,
                 voxel_stats: Mapping[str, np.ndarray] | None = None,
                 subject_nets: Mapping[str, torch.nn.Module] | None = None):
        self.net = net.eval()
        #: subjects decoded by a model of their own (``config.subjects[s].model``: the model
        #: fine-tuned for a new subject by ``neurorecon adapt``), by label
        self.subject_nets = {label: n.eval() for label, n in (subject_nets or {}).items()}
        self.config = config
        self.masks = dict(masks or {})
        self.gallery = gallery
        self.lowlevel = dict(lowlevel or {})
        self.voxel_stats = dict(voxel_stats or {})
        self.generator_dir = None if generator_dir is None else Path(generator_dir)
        self.root = None if root is None else Path(root)
        self._generator = None
        self._inputs: dict[str, dict[str, torch.Tensor]] = {}
        self._stats: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._candidates: dict[str | None, tuple[np.ndarray, CandidateIndex]] = {}
        self._traced: dict[tuple[str, str], tuple[int, Any]] = {}  # (weights version, model)

    # ------------------------------------------------------------------ description
    @property
    def modality(self) -> str:
        return self.config.modality

    @property
    def subjects(self) -> list[str]:
        return list(self.config.subjects)

    @property
    def note(self) -> str:
        """What stands in for the models the papers used (embedder, generator)."""
        gen = self.config.generator
        parts = [self.config.embedder.substitute_note, gen.note if gen else None]
        return " | ".join(p for p in parts if p)

    @property
    def generation_head(self) -> str:
        """The encoder head whose output conditions the generator (training's choice)."""
        gen = self.config.generator
        return gen.defaults.head if gen else "mse"

    def _label(self, subject: str) -> str:
        """The bundle's label for ``subject`` (``"01"`` or ``"sub-01"``), checked."""
        label = str(subject).removeprefix("sub-")
        if label not in self.config.subjects:
            raise DataError(f"unknown subject {label!r}; this decoder knows "
                            f"{self.subjects}", hint="pass one of the bundle's subjects")
        return label

    def subject_info(self, subject: str):
        """``subject``'s part of the bundle (:class:`~neurorecon.models.bundle.MegSubject` or
        :class:`~neurorecon.models.bundle.FmriSubject`), the label checked."""
        return self.config.subjects[self._label(subject)]

    def __getattr__(self, name: str):
        """Only reached for a missing attribute: the other modality's methods say which
        decoder they need (a MEG method called on an fMRI bundle, or the reverse)."""
        for cls in (MegDecoder, FmriDecoder):
            if name in cls.METHODS and not isinstance(self, cls):
                raise DataError(f"{name} needs a {cls.MODALITY.upper()} decoder; this bundle "
                                f"decodes {self.modality.upper()}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # the per-modality parts (MegDecoder, FmriDecoder)
    MODALITY: str = ""
    METHODS: tuple[str, ...] = ()  # public methods of this modality alone

    def _trial_shape(self, info) -> tuple[int, ...]:
        """The shape of one prepared trial of a subject (``info``: its bundle entry)."""
        raise NotImplementedError

    def _model_inputs(self, subject: str) -> dict[str, torch.Tensor]:
        """Per-subject model inputs beside the trials (none by default)."""
        return {}

    def subject_net(self, subject: str) -> torch.nn.Module:
        """The model that decodes ``subject``: its own, or the bundle's."""
        return self.subject_nets.get(self._label(subject), self.net)

    def _net_subject(self, subject: str) -> int | str:
        """How the model names ``subject`` (its index by default)."""
        return self.config.subjects[subject].index

    def stim_column(self, spec) -> str:
        """The trial-table column naming each trial's image (``spec``: the events contract)."""
        return "stim_file"

    @property
    def average_test_repeats(self) -> bool:
        """Whether the recipe averages the test repeats of an image."""
        return bool(self.config.preprocessing.get("average_test_repeats", True))

    def prepare_recording(self, rec, events: pd.DataFrame, spec
                          ) -> tuple[np.ndarray, pd.DataFrame]:
        """One BIDS recording (:class:`~.data.studies.Recording`) and its events table ->
        ``(trials, trial table)`` through the recipe (``neurorecon evaluate``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ encode / retrieve
    def _trials(self, x, subject: str) -> tuple[str, np.ndarray]:
        """``(label, trials)``: the label checked and ``x`` as ``(n, *trial shape)`` float32."""
        subject = self._label(subject)
        want = self._trial_shape(self.config.subjects[subject])
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == len(want):
            x = x[None]
        if x.ndim != len(want) + 1 or x.shape[1:] != want:
            raise DataError(f"sub-{subject} trials must have shape (n, {', '.join(map(str, want))})"
                            f", got {x.shape}", hint="prepare them with the decoder's "
                            f"prepare_{self.modality} method")
        return subject, x

    def encode(self, x, *, subject: str, head: str = "clip", batch_size: int = 256
               ) -> np.ndarray:
        """Prepared trials -> embeddings ``(n, emb_dim)`` (token targets flattened).

        ``x``: ``(n, n_chans, n_times)`` / ``(n_chans, n_times)`` MEG, or ``(n, n_voxels)`` /
        ``(n_voxels,)`` fMRI, from the ``prepare_*`` methods. ``head``: ``"clip"`` for
        retrieval, ``"mse"`` (:attr:`generation_head`) for generation.
        """
        subject, x = self._trials(x, subject)
        return encode_batches(self.subject_net(subject), x,
                              subject=self._net_subject(subject),
                              inputs=self._model_inputs(subject), head=head,
                              batch_size=batch_size)

    def retrieve(self, embeddings: np.ndarray, *, k: int = 5,
                 split: str | None = None) -> list[list[dict[str, Any]]]:
        """Top-``k`` gallery images per embedding, by cosine similarity, best first.

        ``split`` restricts the candidates to gallery images of one split of the training run
        (e.g. ``"test"``: the images the offline test-set retrieval ranked). Each hit:
        ``{"rank", "row", "image_id", "concept", "split", "score"}``.
        """
        if self.gallery is None:
            raise BundleError("this decoder has no gallery", path=self.root)
        if split not in self._candidates:  # normalised once per split (streams query often)
            rows = self.gallery.rows(split)
            self._candidates[split] = (rows, CandidateIndex(self.gallery.embeddings[rows],
                                                            dtype=np.float32))
        rows, index = self._candidates[split]
        emb = np.asarray(embeddings, np.float32)
        emb = emb[None] if emb.ndim == 1 else emb
        idx, score = index.top_k(emb, k)
        table = self._gallery_columns
        return [[{"rank": r + 1, "row": int(rows[j]), "image_id": table["image_id"][rows[j]],
                  "concept": table["concept"][rows[j]], "split": table["split"][rows[j]],
                  "score": float(s)}
                 for r, (j, s) in enumerate(zip(hits, scores, strict=True))]
                for hits, scores in zip(idx, score, strict=True)]

    @functools.cached_property
    def _gallery_columns(self) -> dict[str, list]:
        """The gallery table's columns as lists (per-hit pandas lookups cost ~1 ms a query)."""
        return {c: self.gallery.index[c].astype(str).tolist()
                for c in ("image_id", "concept", "split")}

    # ------------------------------------------------------------------ reconstruct
    @property
    def generator(self):
        """The bundle's generator (loaded on first use)."""
        if self._generator is None:
            gen = self.config.generator
            if gen is None:
                raise BundleError("this bundle has no generator (trained with "
                                  "reconstruct.enabled=false)", path=self.root,
                                  hint="export with a generator to reconstruct images")
            from neurorecon.models.registry import build_generator

            if gen.kind == "embedded":
                if self.generator_dir is None:
                    raise BundleError("generator directory missing", path=self.root)
                self._generator = build_generator(gen.cls, {"path": self.generator_dir})
            else:
                self._generator = build_generator(gen.cls, gen.config or {})
        return self._generator

    def lowlevel_images(self, x, *, subject: str) -> list[Image.Image]:
        """Low-level pathway: prepared trials -> img2img starting images (ridge thumbnails)."""
        from neurorecon.models.generators.base import thumbnails_to_images

        subject = self._label(subject)
        if subject not in self.lowlevel:
            raise BundleError(f"no low-level pathway for sub-{subject} in this bundle",
                              path=self.root)
        weight, bias = self.lowlevel[subject]
        x = np.asarray(x, np.float32)
        flat = x.reshape(len(x), -1)
        if flat.shape[1] != weight.shape[1]:
            raise DataError(f"low-level pathway of sub-{subject} takes {weight.shape[1]} "
                            f"features per trial, got {flat.shape[1]}")
        return thumbnails_to_images(flat @ weight.T + bias, resolution=self.generator.resolution)

    def retrieved_starts(self, embeddings: np.ndarray, *, k: int | None = None,
                         coarse: list[Image.Image] | None = None) -> list[Image.Image]:
        """Retrieval-augmented img2img starts: the ``k`` (default the training run's
        ``retrieval_k``) gallery images of the generator's training split (train + val)
        nearest to each embedding, blended; with ``coarse`` (the low-level pathway's images of
        the same trials) chosen among the run's ``retrieval_shortlist`` nearest with its
        ``lowlevel_rerank`` weight
        (:func:`~neurorecon.models.generators.base.retrieved_starts`)."""
        from neurorecon.models.generators.base import retrieved_starts

        defaults = self.config.generator.defaults
        candidates, images = self._start_candidates
        rerank = defaults.lowlevel_rerank if coarse is not None else 0.0
        return retrieved_starts(
            np.asarray(embeddings, np.float32).reshape(-1, candidates.shape[1]), candidates,
            images, k=int(defaults.retrieval_k if k is None else k),
            resolution=self.generator.resolution, coarse=coarse, rerank=rerank,
            shortlist=defaults.retrieval_shortlist,
            layouts=self._start_layouts if rerank > 0 else None)

    @functools.cached_property
    def _start_layouts(self) -> np.ndarray:
        """The thumbnails the low-level pathway re-ranks the start candidates by (once)."""
        from neurorecon.models.generators.base import image_thumbnails

        return image_thumbnails(self._start_candidates[1])

    @functools.cached_property
    def _start_candidates(self) -> tuple[np.ndarray, list[Image.Image]]:
        """The generator's training images in the gallery (train + val): embeddings and
        thumbnails, read from the bundle once."""
        if self.gallery is None:
            raise BundleError("this bundle has no gallery to start sampling from",
                              path=self.root)
        split = self.gallery.index["split"].to_numpy()
        rows = np.flatnonzero((split == "train") | (split == "val"))
        return (self.gallery.embeddings[rows],
                [self.gallery.thumbnail(int(i)) for i in rows])

    def reconstruct(self, embeddings: np.ndarray, *, subject: str | None = None,
                    lowlevel=None, retrieval: np.ndarray | None = None, seed: int | None = None,
                    steps: int | None = None, guidance: float | None = None,
                    strength: float | None = None, start: str | None = None
                    ) -> list[Image.Image]:
        """Embeddings (from :attr:`generation_head`) -> PIL images.

        Embeddings reach the generator in the scale it was trained on (``config.json``
        ``generator.embedding_scale``: unit rows, or ``raw`` CLIP ``image_embeds`` with the
        training targets' mean norm ``generator.target_norm``), as in the training run.

        ``lowlevel``: the prepared trials the embeddings came from (needs ``subject``), for the
        low-level pathway where the bundle has one for that subject. ``start`` (default the
        training run's ``reconstruct.start``): the img2img starting image. ``retrieved``: the
        training images nearest to each embedding (:meth:`retrieved_starts`), found with
        ``retrieval`` (the ``clip`` head's embeddings of the same trials, as the training run
        retrieves; default ``embeddings``) and re-ranked by the low-level pathway's image;
        ``lowlevel``: the low-level pathway's image (noise without ``lowlevel``); ``noise``.
        ``seed``, ``steps``, ``guidance`` and ``strength`` default to the training run's.
        Every image carries the generator's stand-in note in
        ``image.info["neurorecon_note"]``.
        """
        from neurorecon.models.generators.base import START_IMAGES, conditioning

        generator = self.generator  # loaded once; a bundle without one says so here
        gen = self.config.generator
        defaults = gen.defaults
        start = defaults.start if start is None else start
        if start not in START_IMAGES:
            raise DataError(f"start={start!r}: one of {list(START_IMAGES)}")
        emb = np.asarray(embeddings, np.float32)
        emb = emb[None] if emb.ndim == 1 else emb
        coarse = None
        if lowlevel is not None:
            if subject is None:
                raise DataError("reconstruct(lowlevel=...) needs subject=")
            if start == "lowlevel" or self._label(subject) in self.lowlevel:
                coarse = self.lowlevel_images(lowlevel, subject=subject)
        inits = coarse if start == "lowlevel" else None
        if start == "retrieved":
            inits = self.retrieved_starts(emb if retrieval is None else retrieval,
                                          coarse=coarse)
        cond = conditioning(emb, scale=gen.embedding_scale, target_norm=gen.target_norm)
        images = generator.generate(
            cond, seed=int(defaults.seed if seed is None else seed),
            steps=int(defaults.steps if steps is None else steps),
            guidance_scale=float(defaults.guidance_scale if guidance is None else guidance),
            init_images=inits,
            strength=float(defaults.strength if strength is None else strength))
        for im in images:
            im.info["neurorecon_note"] = generator.note
        return images

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "cpu") -> Decoder:
        """Load a bundle directory (no unpickling; no Hydra or Lightning import)."""
        root = Path(path)
        config = read_bundle_config(root)
        if not issubclass(DECODERS[config.modality], cls):
            raise BundleError(f"{cls.__name__} loads {cls.MODALITY.upper()} bundles; this one "
                              f"decodes {config.modality.upper()}", path=root / CONFIG,
                              hint="load it with Decoder.from_pretrained")
        net = _load_net(root, config.model_type, config.net_config, WEIGHTS).to(device)
        own = {label: info.model for label, info in config.subjects.items() if info.model}
        loaded = {m.weights: _load_net(root, config.model_type, m.net_config, m.weights
                                       ).to(device)
                  for m in {m.weights: m for m in own.values()}.values()}  # a shared file once
        masks = DECODERS[config.modality]._load_masks(root, config)
        gallery = _load_gallery(root / GALLERY) if (root / GALLERY).is_dir() else None
        lowlevel = _load_lowlevel(root / GENERATOR / LOWLEVEL)
        gen_dir = root / GENERATOR if (root / GENERATOR).is_dir() else None
        voxel_stats = _load_voxel_stats(root / NORMALISATION)
        return cls(net=net, config=config, masks=masks, gallery=gallery, lowlevel=lowlevel,
                   generator_dir=gen_dir, root=root, voxel_stats=voxel_stats,
                   subject_nets={label: loaded[m.weights] for label, m in own.items()})

    @staticmethod
    def _load_masks(root: Path, config: BundleConfig) -> dict[str, Any]:
        return {}

    def save_pretrained(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the bundle to ``path`` (built in a temporary sibling, then moved in place:
        an interrupted write never leaves a half bundle; an existing one is kept unless
        ``overwrite``)."""
        from safetensors.torch import save_file

        out = Path(path)
        if out.exists() and not overwrite:
            raise DataError("bundle directory exists", path=out,
                            hint="choose another directory, or replace it: export.overwrite=true "
                                 "(save_pretrained(..., overwrite=True))")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            _save_net(self.net, tmp / WEIGHTS)
            for label, net in self.subject_nets.items():
                path = tmp / self.config.subjects[label].model.weights
                if not path.exists():  # a model fine-tuned for several new subjects: once
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _save_net(net, path)
            if self.masks:
                import nibabel as nib

                (tmp / MASKS).mkdir()
                for label, mask in self.masks.items():
                    nib.save(mask, tmp / MASKS / f"sub-{label}_mask.nii.gz")
            if self.gallery is not None:
                _save_gallery(self.gallery, tmp / GALLERY)
            if self.generator_dir is not None:
                shutil.copytree(self.generator_dir, tmp / GENERATOR,
                                ignore=shutil.ignore_patterns("manifest.json", LOWLEVEL))
            if self.lowlevel:
                (tmp / GENERATOR).mkdir(exist_ok=True)
                save_file({f"sub-{lab}.{name}": torch.from_numpy(np.ascontiguousarray(arr))
                           for lab, (w, b) in self.lowlevel.items()
                           for name, arr in (("weight", w), ("bias", b))},
                          tmp / GENERATOR / LOWLEVEL)
            if self.voxel_stats:
                save_file({f"sub-{lab}": torch.from_numpy(np.ascontiguousarray(st, np.float32))
                           for lab, st in self.voxel_stats.items()}, tmp / NORMALISATION)
            (tmp / CONFIG).write_text(self.config.to_json())
            (tmp / "README.md").write_text(model_card(self.config))
            if out.exists():
                old = out.with_name(f".{out.name}-old")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old)
            else:
                os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return out


class MegDecoder(Decoder):
    """A MEG decoder: continuous recordings or stream windows -> embeddings.

    Adds the MEG recipe (:attr:`meg_params`), :meth:`prepare_meg` (recording + onsets ->
    epochs), the streaming form (:meth:`streaming_filter`, :meth:`meg_window`) and a
    single-window fast path (the traced model) to :class:`Decoder`.
    """

    MODALITY = "meg"
    METHODS = ("meg_params", "prepare_meg", "warm_up", "streaming_filter", "meg_window")

    @functools.cached_property
    def meg_params(self):
        """The MEG recipe (:class:`~.preprocess.meg.MegParams`)."""
        from .preprocess.meg import MegParams

        return MegParams.from_mapping(self.config.preprocessing["params"])

    def _meg_stats(self, subject: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frozen scaler centre, scale and good-channel mask of ``subject`` (built once: the
        streaming decoder asks for them every window)."""
        label = self._label(subject)
        if label not in self._stats:
            info = self.config.subjects[label]
            self._stats[label] = (np.asarray(info.scaler_center, np.float64),
                                  np.asarray(info.scaler_scale, np.float64),
                                  np.asarray(info.good, bool))
        return self._stats[label]

    def prepare_meg(self, raw_or_array, *, subject: str, events=None,
                    sfreq: float | None = None) -> np.ndarray:
        """Continuous MEG -> model-ready epochs ``(n_events, n_chans, n_times)`` float32.

        The offline transform with the bundle's recipe and frozen statistics: band-pass
        (the recipe's ``phase``), decimation, epochs ``[tmin, tmax]`` around each onset,
        baseline, the subject's scaler fitted on its training trials, clamp, bad channels
        zeroed.

        Parameters
        ----------
        raw_or_array : mne.io.Raw | ndarray
            A recording holding (at least) the bundle's channels, or an array
            ``(n_chans, n_samples)`` in the bundle's channel order at ``sfreq`` (default: the
            training recordings' rate).
        subject : str
            Subject label.
        events : DataFrame | sequence of float
            Image onsets in seconds (a table with an ``onset`` column, e.g. BIDS events).
        """
        import mne

        from .preprocess.meg import cut_epochs, filter_and_decimate, scale_epochs

        info = self.subject_info(subject)
        params = self.meg_params
        names = list(info.ch_names)
        if isinstance(raw_or_array, mne.io.BaseRaw):
            raw = raw_or_array
            missing = [c for c in names if c not in raw.ch_names]
            if missing:
                raise DataError(f"the recording lacks {len(missing)} of the decoder's "
                                f"{len(names)} channels (e.g. {missing[:3]})",
                                path=(raw.filenames or [None])[0],
                                hint="use a recording of the same MEG system and channel set")
            raw = raw.copy().pick(names).load_data(verbose=False)
            raw.reorder_channels(names)
            newly_bad = sorted(set(raw.info["bads"]) - set(info.bads))
            if newly_bad:
                logger.warning("channels %s are marked bad in this recording but the decoder "
                               "was trained with them", newly_bad[:5])
            with raw.info._unlock():
                raw.info["bads"] = []
        else:
            data = np.asarray(raw_or_array, dtype=np.float64)
            if data.ndim != 2 or data.shape[0] != len(names):
                raise DataError(f"MEG array must be continuous (n_chans={len(names)}, "
                                f"n_samples), got shape {data.shape}",
                                hint="pass an mne Raw, or the channels in the bundle's order")
            rate = float(sfreq or info.sfreq_in)
            raw = mne.io.RawArray(data, mne.create_info(names, rate, "mag"), verbose=False)
        if events is None:
            raise DataError("prepare_meg needs the image onsets (events=) to cut epochs",
                            hint="pass the events table (onset in s) or a list of onsets")
        table = (events if isinstance(events, pd.DataFrame)
                 else pd.DataFrame({"onset": np.asarray(events, float)}))
        check_columns(table, ["onset"], path=None)
        check_finite(raw.get_data()[:, :: max(1, len(raw.times) // 20000)], path=None,
                     what="MEG data")
        raw = filter_and_decimate(raw, params)
        X = cut_epochs(raw, table, params)
        center, scale, good = self._meg_stats(subject)
        return scale_epochs(X, center=center, scale=scale, good=good,
                            clamp=params.clamp).astype(np.float32)

    def warm_up(self, subject: str, *, mask: np.ndarray | None = None,
                split: str | None = None) -> None:
        """Decode one empty window of ``subject`` (MEG) as :meth:`encode` and :meth:`retrieve`
        would with ``mask`` and ``split``: the traced single-window model and the gallery index
        are built now, and TorchScript's first (profiling) runs done, not in the first live
        windows."""
        info = self.subject_info(subject)
        for _ in range(3):
            emb = self.encode(np.zeros((len(info.ch_names), info.n_times), np.float32),
                              subject=subject, mask=mask)
        if self.gallery is not None:
            self.retrieve(emb, split=split)

    def streaming_filter(self, subject: str, *, sfreq: float | None = None):
        """The causal filter state for one stream of ``subject`` (chunks in, decimated out).

        Raises :class:`DataError` for a bundle trained with zero-phase filtering, which a
        stream cannot reproduce.
        """
        from .preprocess.meg import StreamingMegFilter

        params = self.meg_params
        info = self.subject_info(subject)
        if params.phase != "causal":
            raise DataError(
                "this MEG decoder was trained on zero-phase (non-causal) filtered data, which "
                "a live stream cannot reproduce", path=self.root,
                hint="train a causal one: neurorecon run data=<...> preprocess.meg.phase=causal")
        return StreamingMegFilter(sfreq=float(sfreq or info.sfreq_in),
                                  n_chans=len(info.ch_names), params=params)

    def meg_window(self, window: np.ndarray, *, subject: str) -> np.ndarray:
        """One window ``(n_chans, n_times)`` of :meth:`streaming_filter` output spanning the
        recipe's ``[tmin, tmax]`` around an onset -> the model input (baseline, frozen scaler,
        clamp, bad channels zeroed), equal to the offline causal epoch."""
        from .preprocess.meg import prepare_window

        params = self.meg_params
        info = self.subject_info(subject)
        shape = (len(info.ch_names), info.n_times)
        window = np.asarray(window)
        if window.shape != shape:
            raise DataError(f"MEG window of shape {window.shape}; sub-{subject} needs {shape} "
                            f"(channels x samples of [{params.tmin}, {params.tmax}] s at "
                            f"{params.sfreq:g} Hz)")
        center, scale, good = self._meg_stats(subject)
        return prepare_window(window, params, center=center, scale=scale,
                              good=good).astype(np.float32)

    # ------------------------------------------------------------------ the modality's parts
    def _trial_shape(self, info) -> tuple[int, ...]:
        return (len(info.ch_names), info.n_times)

    def stim_column(self, spec) -> str:
        return spec.stim_column

    @property
    def average_test_repeats(self) -> bool:
        return bool(self.meg_params.average_test_repeats)

    def prepare_recording(self, rec, events: pd.DataFrame, spec
                          ) -> tuple[np.ndarray, pd.DataFrame]:
        from .preprocess.meg import read_raw

        return self.prepare_meg(read_raw(rec), subject=rec.subject, events=events), events

    def _model_inputs(self, subject: str) -> dict[str, torch.Tensor]:
        """The subject's sensor positions, good channels and sensor kinds (built once)."""
        if subject not in self._inputs:
            from neurorecon.models.meg.brain_module import sensor_features

            info = self.subject_info(subject)
            self._inputs[subject] = {
                "positions": torch.tensor(info.positions, dtype=torch.float32),
                "mask": torch.tensor(info.good, dtype=torch.bool),
                "sensors": sensor_features(info.kinds, np.asarray(info.orientation,
                                                                     np.float32)),
            }
        return self._inputs[subject]

    def encode(self, x, *, subject: str, head: str = "clip", batch_size: int = 256,
               mask: np.ndarray | None = None) -> np.ndarray:
        """:meth:`Decoder.encode`, with ``mask``: a bool per bundle channel, False for
        channels to leave out of the spatial attention (missing or faulty in a stream); the
        bundle's bad channels stay out whatever it says. A single window runs the model
        traced for single windows (the real-time decoder's case)."""
        subject, x = self._trials(x, subject)
        inputs = self._model_inputs(subject)
        if mask is not None:
            keep = np.asarray(mask, bool)
            if keep.shape != (x.shape[1],):
                raise DataError(f"mask must hold one bool per channel ({x.shape[1]}), got "
                                f"shape {keep.shape}")
            inputs = {**inputs, "mask": inputs["mask"] & torch.from_numpy(keep)}
        if len(x) == 1 and head in ("clip", "mse") and bool(inputs["mask"].any()) \
                and self._state[0].device.type == "cpu":
            with torch.inference_mode():
                out = self._traced_window(subject, head)(torch.from_numpy(x), inputs["mask"][None])
            return out.reshape(1, -1).numpy()
        return encode_batches(self.subject_net(subject), x, subject=self._net_subject(subject),
                              inputs=inputs, head=head, batch_size=batch_size)

    @functools.cached_property
    def _state(self) -> list[torch.Tensor]:
        """The model's parameters and buffers (listing them walks every module: ~0.3 ms)."""
        nets = [self.net, *self.subject_nets.values()]
        return [t for net in nets for t in (*net.parameters(), *net.buffers())]

    def _traced_window(self, subject: str, head: str):
        """The model traced for single windows of ``subject`` and output ``head`` (the
        real-time decoder's case: :meth:`MegBrainModule.trace_window`), traced again when the
        weights change."""
        version = sum(t._version for t in self._state)
        if self._traced.get((subject, head), (None,))[0] != version:
            t0 = time.perf_counter()
            inputs = self._model_inputs(subject)
            self._traced[subject, head] = (version, self.subject_net(subject).trace_window(
                positions=inputs["positions"], sensors=inputs["sensors"], head=head,
                subject=self.config.subjects[subject].index))
            logger.info("decoder: model traced for single windows of sub-%s (%s head) in "
                        "%.2f s", subject, head, time.perf_counter() - t0)
        return self._traced[subject, head][1]


class FmriDecoder(Decoder):
    """An fMRI decoder: BOLD runs (through the training GLM) or single-trial betas ->
    embeddings; each subject's voxel mask (:meth:`mask`) travels with the bundle."""

    MODALITY = "fmri"
    METHODS = ("mask", "check_fmri_run", "prepare_fmri", "check_betas", "prepare_betas")

    def mask(self, subject: str):
        """The voxel mask (NIfTI image) of ``subject``."""
        return self.masks[self._label(subject)]

    def _fmri_params(self) -> dict[str, Any]:
        prep = dict(self.config.preprocessing)
        for key in ("input", "space", "subjects", "modality"):
            prep.pop(key, None)
        return prep

    def check_fmri_run(self, bold_img, events, *, subject: str, tr: float | None = None):
        """Check one BOLD run and its events against ``subject``'s mask before any GLM; return
        ``(image, events table, tr)``.

        Raises :class:`DataError` naming the file for an unreadable or truncated image, one
        that is not 4D or holds NaN/inf, another voxel grid than the mask (both grids named),
        a missing or non-positive repetition time, a table without ``onset``/``duration``, or
        events that end after the run. The batch service validates uploads with it before
        queueing them; :meth:`prepare_fmri` runs it first.
        """
        from .preprocess.fmri import check_same_grid, load_4d, read_tr

        mask = self.mask(subject)
        path = None
        if isinstance(bold_img, (str, Path)):
            path = Path(bold_img)
            tr = read_tr(path) if tr is None else tr
            img, _ = load_4d(path, what="BOLD image")
        else:
            img = bold_img
            if img.ndim != 4:
                raise DataError(f"BOLD image must be 4D, got shape {img.shape}")
            if tr is None:
                tr = float(img.header.get_zooms()[3])
        if tr is None or not np.isfinite(tr) or not tr > 0:
            raise DataError(f"no usable repetition time ({tr!r}): pass tr= (s)", path=path)
        check_same_grid(img, mask, path=path, what="BOLD image")
        table = _events_table(events)
        n_scans = img.shape[3]
        late = table["onset"].to_numpy() + table["duration"].to_numpy() > n_scans * tr
        if late.any():
            raise DataError(f"{int(late.sum())} events end after the run "
                            f"({n_scans} scans x {tr:g} s = {n_scans * tr:g} s)",
                            path=events if isinstance(events, (str, Path)) else path)
        return img, table, float(tr)

    def prepare_fmri(self, bold_img, events, *, subject: str, tr: float | None = None
                     ) -> np.ndarray:
        """One BOLD run -> single-trial betas ``(n_trials, n_voxels)`` through the training
        GLM (nilearn) inside the subject's mask, normalised as in training.

        Parameters
        ----------
        bold_img : path | nibabel image
            4D run on the mask's grid (refused with both grids named otherwise).
        events : DataFrame | path
            One row per trial with ``onset`` and ``duration`` (s).
        subject : str
            Subject label.
        tr : float | None
            Repetition time (s); default: the JSON sidecar of a path, else the header.
        """
        from .preprocess.fmri import single_trial_betas

        img, table, tr = self.check_fmri_run(bold_img, events, subject=subject, tr=tr)
        betas = single_trial_betas(img, table, tr=tr, mask_img=self.mask(subject),
                                   params=self._fmri_params())
        return self._normalise(np.nan_to_num(betas), subject=subject,
                               runs=np.zeros(len(betas)))

    def check_betas(self, betas_img, trials=None, *, subject: str):
        """Check a 4D single-trial betas image (and its trial table, one row per volume)
        against ``subject``'s mask; return ``(image, data, table or None)``."""
        from .preprocess.fmri import check_same_grid, load_4d

        mask = self.mask(subject)
        path = None
        if isinstance(betas_img, (str, Path)):
            path = Path(betas_img)
            img, data = load_4d(path, what="betas image")
        else:
            img, data = betas_img, np.asarray(betas_img.dataobj, np.float32)
        check_same_grid(img, mask, path=path, what="betas image")
        table = None
        if trials is not None:
            table = (trials if isinstance(trials, pd.DataFrame)
                     else read_tsv(trials, what="trial table"))
            if len(table) != data.shape[3]:
                raise DataError(f"{len(table)} trial rows but the betas image has "
                                f"{data.shape[3]} volumes",
                                path=trials if isinstance(trials, (str, Path)) else path,
                                hint="one row per volume of the betas image, in order")
        return img, data, table

    def prepare_betas(self, betas_img, trials=None, *, subject: str) -> np.ndarray:
        """Precomputed single-trial betas (4D, one volume per trial) -> ``(n_trials,
        n_voxels)`` inside the subject's mask, normalised as in training (per ``run`` or, with
        ``zscore: session``, per ``session`` column of ``trials`` when present, else over the
        whole image)."""
        _, data, table = self.check_betas(betas_img, trials, subject=subject)
        inside = np.asarray(self.mask(subject).dataobj) > 0
        X = data[inside].T.astype(np.float32)
        column = "session" if self._fmri_params().get("zscore") == "session" else "run"
        runs = (table[column].astype(str).to_numpy() if table is not None and column in table
                else np.zeros(len(X)))
        return self._normalise(X, subject=subject, runs=runs)

    def _normalise(self, X: np.ndarray, *, subject: str, runs: np.ndarray) -> np.ndarray:
        """The training recipe's per-voxel z-scoring (``preprocessing.zscore``): within each
        group of ``runs`` (runs, or sessions), with the stored train statistics, or none."""
        from .preprocess.fmri import apply_voxel_stats, zscore_within

        mode = self._fmri_params().get("zscore", "run")
        if mode in ("run", "session"):
            X = zscore_within(X, runs)
        elif mode == "train":
            label = self._label(subject)
            if label not in self.voxel_stats:
                raise BundleError(f"train normalisation statistics of sub-{label} missing",
                                  path=None if self.root is None else self.root / NORMALISATION)
            X = apply_voxel_stats(X, self.voxel_stats[label])
        return np.asarray(X, np.float32)

    # ------------------------------------------------------------------ the modality's parts
    def _trial_shape(self, info) -> tuple[int, ...]:
        return (info.n_voxels,)

    def _net_subject(self, subject: str) -> int | str:
        return subject  # the fMRI encoder's adapters are named by label

    def prepare_recording(self, rec, events: pd.DataFrame, spec
                          ) -> tuple[np.ndarray, pd.DataFrame]:
        from .preprocess.fmri import as_stim_file

        events = as_stim_file(events, spec)
        return self.prepare_fmri(rec.fpath, events, subject=rec.subject), events

    @staticmethod
    def _load_masks(root: Path, config: BundleConfig) -> dict[str, Any]:
        return {label: _load_mask(root, label, info) for label, info in config.subjects.items()}


#: the decoder class of each modality (``Decoder(...)`` and :meth:`Decoder.from_pretrained`
#: build the one of the bundle's modality)
DECODERS: dict[str, type[Decoder]] = {"meg": MegDecoder, "fmri": FmriDecoder}


# --------------------------------------------------------------------------------------------
# bundle files
# --------------------------------------------------------------------------------------------
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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from neurorecon.models.registry import build

    try:
        net = build(model_type, net_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"cannot rebuild the model ({exc})", path=root / CONFIG) from exc
    path = root / weights
    if not path.is_file():
        raise BundleError("model weights missing", path=path)
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"unreadable or truncated safetensors file ({exc}); re-export "
                          "the bundle", path=path) from exc
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BundleError(f"weights do not fit the model in config.json ({first})",
                          path=path) from exc
    return net


def _save_net(net: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, path)


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


def _events_table(events) -> pd.DataFrame:
    if isinstance(events, (str, Path)):
        table, path = read_tsv(events, what="events file"), events
    else:
        table, path = pd.DataFrame(events), None
    check_columns(table, ["onset", "duration"], path=path)
    table = table.assign(onset=pd.to_numeric(table["onset"], errors="coerce"),
                         duration=pd.to_numeric(table["duration"], errors="coerce"))
    if table[["onset", "duration"]].isna().any().any() or (table["onset"] < 0).any():
        raise DataError("onset and duration must be non-negative seconds", path=path)
    if not len(table):
        raise DataError("the events table has no rows", path=path)
    return table.reset_index(drop=True)


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
        lines.append(f"- preprocessing: {prep.get('glm')} single-trial GLM, per-voxel z-score: "
                     f"{prep.get('zscore')}; masks in `masks/`")
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
              f"- generator: {gen.note if gen else 'no generator in this bundle'}",
              "", "## Provenance", "",
              f"- neurorecon {prov.version} (commit {prov.commit}), created {prov.created}", ""]
    return "\n".join(lines)
