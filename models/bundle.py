"""The trained-decoder bundle's ``config.json``: one versioned, typed schema (pydantic).

Written by ``neurorecon export`` / training runs (:func:`neurorecon.pipelines.export.bundle_config`)
and read by :meth:`neurorecon.pipelines.inference.Decoder.from_pretrained`; every stage after
training (evaluate, reconstruct, serve, stream) reads it through the ``Decoder`` as attributes,
so a field renamed on one side fails at load, not as a silently missing key.

Each part is its own model: the embedder, one subject per modality (its channels and frozen
scaler, or its voxel grid and mask), the generator, the temporal focus and the provenance.
Free-form parts stay dictionaries on purpose: the model constructor arguments (the registry's
``from_config`` checks them), the preprocessing recipe (``MegParams`` / the fMRI recipe check
it), the run config and the headline metrics.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "BundleConfig", "Embedder", "FmriSubject", "Focus",
           "Generator", "MegSubject", "OwnModel", "Provenance", "ValidationError", "problems"]

FORMAT, FORMAT_VERSION = "neurorecon-decoder", 1


class _Part(BaseModel):
    """A part of the schema: unknown keys are an error (a writer and a reader disagree)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Embedder(_Part):
    """The image embedder the encoder was trained to predict."""

    name: str | None
    weights: str | None
    revision: str | None
    emb_dim: int = Field(gt=0)
    n_tokens: int | None = None
    unit_normalised_targets: bool
    substitute_note: str | None = None
    spec: dict[str, Any]


class OwnModel(_Part):
    """A subject decoded by a model of its own (``neurorecon adapt``): the bundle's model
    fine-tuned on the subject's trials (``adapt.way=finetune``) or one trained on them alone
    (``adapt.way=scratch``); the subject's ``index`` is its index in this model. The bundle's
    own model, and so its other subjects, are unchanged. ``model_type``: when it differs from
    the bundle's (a single model trained from scratch beside an ensemble); None: the
    bundle's."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)

    model_type: str | None = None
    net_config: dict[str, Any] = Field(alias="model_config")
    weights: str = Field(pattern=r"^subjects/[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors$")


class MegSubject(_Part):
    """One MEG subject: its channels (bundle order), layout and frozen scaler statistics."""

    index: int = Field(ge=0)
    n_trials: int | None = Field(default=None, ge=0)  # train + validation trials trained on
    n_chans: int = Field(gt=0)
    n_times: int = Field(gt=0)
    ch_names: list[str]
    positions: list[list[float]]
    good: list[bool]
    kinds: list[str]
    orientation: list[list[float]]
    bads: list[str]
    sfreq_in: float = Field(gt=0)
    scaler_center: list[float]
    scaler_scale: list[float]
    ssp: list[list[float]] = []  # artifact projectors: orthonormal vectors over the channels
    model: OwnModel | None = None

    @model_validator(mode="after")
    def _one_entry_per_channel(self) -> MegSubject:
        lengths = {name: len(getattr(self, name)) for name in (
            "ch_names", "positions", "good", "kinds", "orientation", "scaler_center",
            "scaler_scale")}
        lengths.update({f"ssp[{k}]": len(vector) for k, vector in enumerate(self.ssp)})
        for name, n in lengths.items():
            if n != self.n_chans:
                raise ValueError(f"{name} has {n} entries for {self.n_chans} channels")
        return self


class Grid(_Part):
    shape: list[int] = Field(min_length=3, max_length=3)
    affine: list[list[float]]
    voxel_size: list[float] = Field(min_length=3, max_length=3)


class FmriSubject(_Part):
    """One fMRI subject: its voxel grid, the mask file (bundle-relative) and normalisation."""

    index: int = Field(ge=0)
    n_trials: int | None = Field(default=None, ge=0)  # train + validation trials trained on
    n_voxels: int = Field(gt=0)
    mask: str
    grid: Grid
    normalisation: str
    tr: float | list[float] | None = None  # a list when the runs differ
    n_runs: int | None = None
    voxel_size: list[float] | None = None
    hrf_onset: float | None = None  # s, the HRF delay chosen for it (preprocessing hrf_onset=auto)
    model: OwnModel | None = None


def _subject_kind(value: Any) -> str:
    fields = value if isinstance(value, dict) else vars(value)
    return "fmri" if "n_voxels" in fields or "mask" in fields else "meg"


Subject = Annotated[Annotated[MegSubject, Tag("meg")] | Annotated[FmriSubject, Tag("fmri")],
                    Discriminator(_subject_kind)]


class GeneratorDefaults(_Part):
    head: Literal["clip", "mse"] = "mse"
    strength: float = 0.85
    steps: int = 20
    guidance_scale: float = 1.5
    seed: int = 0
    lowlevel: bool = False
    start: Literal["lowlevel", "retrieved", "noise"] = "lowlevel"
    retrieval_k: int = Field(default=3, gt=0)
    retrieval_shortlist: int = Field(default=8, gt=0)
    lowlevel_rerank: float = Field(default=0.0, ge=0)


class Generator(_Part):
    """The reconstruction generator: embedded (a directory in the bundle) or a diffusers
    pipeline named by its local config."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(),
                              populate_by_name=True)

    cls: str = Field(alias="class")
    kind: Literal["embedded", "diffusers"]
    note: str | None = None
    embedding_scale: str = "unit"
    target_norm: float = 1.0
    resolution: int = Field(gt=0)
    emb_dim: int = Field(gt=0)
    defaults: GeneratorDefaults = GeneratorDefaults()
    training: dict[str, Any] | None = None  # the embedded generator's training figures
    path: str | None = None
    config: dict[str, Any] | None = None
    lowlevel: str | None = None


class Focus(BaseModel):
    """The MEG encoder's temporal focus (the search curve that chose it is kept as extra keys)."""

    model_config = ConfigDict(extra="allow")

    tmin: float
    tmax: float
    samples: list[int] = Field(min_length=2, max_length=2)
    reason: str | None = None


class Dataset(_Part):
    name: str
    modality: Literal["meg", "fmri"]
    fingerprint: str
    preprocessing_cache: str
    embeddings_cache: str


class Provenance(_Part):
    dataset: Dataset
    version: str | None = None
    commit: str | None = None
    created: str | None = None
    config: dict[str, Any] = {}
    #: one record per ``neurorecon adapt`` that added subjects (their labels, the dataset, when,
    #: the training time and epochs)
    adaptations: list[dict[str, Any]] = []


class BundleConfig(_Part):
    """``config.json`` of a bundle (format ``neurorecon-decoder``, version 1)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(),
                              populate_by_name=True)

    format: Literal["neurorecon-decoder"] = FORMAT
    format_version: Literal[1] = FORMAT_VERSION
    modality: Literal["meg", "fmri"]
    model_type: str
    net_config: dict[str, Any] = Field(alias="model_config")
    embedder: Embedder
    preprocessing: dict[str, Any]
    subjects: dict[str, Subject] = Field(min_length=1)
    focus: Focus | None = None
    generator: Generator | None = None
    provenance: Provenance
    metrics: dict[str, Any] = {}

    @model_validator(mode="after")
    def _subjects_of_the_modality(self) -> BundleConfig:
        kind = MegSubject if self.modality == "meg" else FmriSubject
        wrong = [label for label, s in self.subjects.items() if not isinstance(s, kind)]
        if wrong:
            raise ValueError(f"subjects {wrong} are not {self.modality.upper()} subjects")
        if self.focus is not None and self.modality != "meg":
            raise ValueError("a temporal focus is for MEG bundles only")
        return self

    def to_json(self) -> str:
        """The JSON text of ``config.json`` (field names as written: ``model_config``,
        ``class``)."""
        return self.model_dump_json(by_alias=True, indent=1)


def problems(exc: ValidationError, *, limit: int = 5) -> str:
    """A validation error as one line per problem: ``field.path: message``."""
    lines = [f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}"
             for e in exc.errors()[:limit]]
    more = len(exc.errors()) - limit
    return "; ".join(lines) + (f"; and {more} more" if more > 0 else "")
