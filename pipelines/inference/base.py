"""The decoder's shared base (:class:`Decoder`) and batched encoding, one implementation for
training runs, evaluation, serving and streaming (:mod:`neurorecon.pipelines.inference`)."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from neurorecon.models.bundle import BundleConfig
from neurorecon.models.common.checks import DataError
from neurorecon.models.retrieval import CandidateIndex

from .files import (
    CONFIG,
    GALLERY,
    GENERATOR,
    LOWLEVEL,
    MASKS,
    NORMALISATION,
    WEIGHTS,
    BundleError,
    Gallery,
    _load_gallery,
    _load_lowlevel,
    _load_net,
    _load_voxel_stats,
    _save_gallery,
    _save_net,
    model_card,
    read_bundle_config,
)

#: the decoder class of each modality, filled as they are defined (``Decoder(...)`` and
#: :meth:`Decoder.from_pretrained` build the one of the bundle's modality)
DECODERS: dict[str, type[Decoder]] = {}


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
        self._stats: dict[str, dict[str, np.ndarray]] = {}
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
        for cls in DECODERS.values():
            if name in cls.METHODS and not isinstance(self, cls):
                raise DataError(f"{name} needs a {cls.MODALITY.upper()} decoder; this bundle "
                                f"decodes {self.modality.upper()}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # the per-modality parts (MegDecoder, FmriDecoder)
    MODALITY: str = ""
    METHODS: tuple[str, ...] = ()  # public methods of this modality alone

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.MODALITY:
            DECODERS[cls.MODALITY] = cls

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
            from neurorecon.models.registry import build_generator

            gen = self._generator_info
            if gen.kind == "embedded":
                if self.generator_dir is None:
                    raise BundleError("generator directory missing", path=self.root)
                self._generator = build_generator(gen.cls, {"path": self.generator_dir})
            else:
                self._generator = build_generator(gen.cls, gen.config or {})
        return self._generator

    @property
    def _generator_info(self):
        """The bundle's generator description (``config.json`` ``generator``), checked."""
        if self.config.generator is None:
            raise BundleError("this bundle has no generator (trained with "
                              "reconstruct.enabled=false)", path=self.root,
                              hint="export with a generator to reconstruct images")
        return self.config.generator

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
        ``retrieval_k``) gallery images of the run's train and validation splits
        nearest to each embedding, blended; with ``coarse`` (the low-level pathway's images of
        the same trials) chosen among the run's ``retrieval_shortlist`` nearest with its
        ``lowlevel_rerank`` weight
        (:func:`~neurorecon.models.generators.base.retrieved_starts`)."""
        from neurorecon.models.generators.base import retrieved_starts

        defaults = self._generator_info.defaults
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
        """The start candidates in the gallery (its train and validation images): embeddings and
        thumbnails, read from the bundle once."""
        if self.gallery is None:
            raise BundleError("this bundle has no gallery to start sampling from",
                              path=self.root)
        split = self.gallery.index["split"].to_numpy()
        rows = np.flatnonzero((split == "train") | (split == "val"))
        return (self.gallery.embeddings[rows],
                [self.gallery.thumbnail(int(i)) for i in rows])

    def start_images(self, embeddings: np.ndarray, *, subject: str | None = None,
                     lowlevel=None, coarse: list[Image.Image] | None = None,
                     retrieval: np.ndarray | None = None, start: str | None = None
                     ) -> list[Image.Image] | None:
        """The img2img starting images of :meth:`reconstruct` (None: it starts from noise).

        ``start`` (default the training run's ``reconstruct.start``): ``retrieved``, the
        training images nearest to ``retrieval`` (default ``embeddings``), re-ranked by
        ``coarse`` (the low-level pathway's images of the same trials) where given
        (:meth:`retrieved_starts`); ``lowlevel``, ``coarse`` itself; ``noise``. ``lowlevel``
        (the prepared trials, with ``subject``) makes ``coarse`` where the bundle has that
        subject's pathway (:meth:`lowlevel_images`).
        """
        from neurorecon.models.generators.base import START_IMAGES

        start = self._generator_info.defaults.start if start is None else start
        if start not in START_IMAGES:
            raise DataError(f"start={start!r}: one of {list(START_IMAGES)}")
        if lowlevel is not None and coarse is not None:
            raise DataError("reconstruct: give lowlevel= (trials) or coarse= (images), not both")
        if lowlevel is not None:
            if subject is None:
                raise DataError("reconstruct(lowlevel=...) needs subject=")
            if start == "lowlevel" or self._label(subject) in self.lowlevel:
                coarse = self.lowlevel_images(lowlevel, subject=subject)
        if start == "retrieved":
            emb = np.asarray(embeddings if retrieval is None else retrieval, np.float32)
            return self.retrieved_starts(emb[None] if emb.ndim == 1 else emb, coarse=coarse)
        return coarse if start == "lowlevel" else None

    def reconstruct(self, embeddings: np.ndarray, *, subject: str | None = None,
                    lowlevel=None, coarse: list[Image.Image] | None = None,
                    retrieval: np.ndarray | None = None, seed: int | None = None,
                    steps: int | None = None, guidance: float | None = None,
                    strength: float | None = None, start: str | None = None,
                    starts: list[Image.Image] | None = None,
                    text_embeddings: np.ndarray | None = None, batch_size: int | None = None
                    ) -> list[Image.Image]:
        """Embeddings (from :attr:`generation_head`) -> PIL images.

        Embeddings reach the generator in the scale it was trained on (``config.json``
        ``generator.embedding_scale``: unit rows, or ``raw`` CLIP ``image_embeds`` with the
        training targets' mean norm ``generator.target_norm``), as in the training run.

        ``lowlevel``: the prepared trials the embeddings came from (needs ``subject``), for the
        low-level pathway where the bundle has one for that subject; or ``coarse``: that
        pathway's images already made (e.g. of several subjects' trials). ``start``,
        ``retrieval``: the img2img starting image (:meth:`start_images`); or ``starts``: those
        images already made by it (the caller keeps them). ``seed`` (image ``i`` uses
        ``seed + i``), ``steps``, ``guidance`` and ``strength`` default to the training run's
        (strength 0: the start images themselves, no sampler step). ``text_embeddings``:
        caption conditioning for a diffusers backend; ``batch_size``: images per sampler batch
        (default the generator's). Every image carries the generator's stand-in note in
        ``image.info["neurorecon_note"]``.
        """
        from neurorecon.models.generators.base import conditioning

        generator = self.generator  # loaded once; a bundle without one says so here
        gen = self.config.generator
        defaults = gen.defaults
        emb = np.asarray(embeddings, np.float32)
        emb = emb[None] if emb.ndim == 1 else emb
        if starts is None:
            starts = self.start_images(emb, subject=subject, lowlevel=lowlevel, coarse=coarse,
                                       retrieval=retrieval, start=start)
        strength = float(defaults.strength if strength is None else strength)
        if strength == 0:  # the start itself (the run found that generating added nothing)
            if starts is None:
                raise DataError("strength=0 keeps the start image, but start='noise' has none",
                                hint="use start=retrieved or lowlevel, or strength > 0")
            images = [im.copy() for im in starts]
        else:
            images = generator.generate(
                conditioning(emb, scale=gen.embedding_scale, target_norm=gen.target_norm),
                seed=int(defaults.seed if seed is None else seed),
                steps=int(defaults.steps if steps is None else steps),
                guidance_scale=float(defaults.guidance_scale if guidance is None else guidance),
                init_images=starts, text_embeddings=text_embeddings, strength=strength,
                **({} if batch_size is None else {"batch_size": int(batch_size)}))
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
        loaded = {m.weights: _load_net(root, m.model_type or config.model_type, m.net_config,
                                       m.weights).to(device)
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
