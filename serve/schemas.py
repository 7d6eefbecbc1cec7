"""Request and response models of the HTTP API (pydantic; they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .settings import StreamSettings

#: a job's states, in the job table and the API
STATES = ("queued", "running", "succeeded", "failed", "cancelled")


class JobOptions(BaseModel):
    """The ``options`` form field of ``POST /v1/fmri/jobs`` (JSON)."""

    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(None, ge=1, le=200,
                              description="diffusion steps (default: the training run's)")
    guidance: float | None = Field(None, ge=0, le=30,
                                   description="classifier-free guidance scale")
    strength: float | None = Field(None, ge=0, le=1,
                                   description="img2img strength: the share of the steps run "
                                   "from the start image (default: the training run's choice; "
                                   "0: the start itself)")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="sampling seed")
    lowlevel: bool | None = Field(None, description="use the low-level pathway: it re-ranks "
                                  "the retrieved start (or is the start, as the bundle's "
                                  "generator defaults say); default: the training run's choice")
    top_k: int = Field(5, ge=1, le=100, description="retrieved gallery images per trial")
    trials: Literal["all", "test"] | list[int] = Field(
        "all", description="'all' events rows, 'test' (trial_type == test) or 0-based rows")
    reconstruct: bool = Field(True, description="generate images (false: retrieval only)")
    full_metrics: bool = Field(False, description="with ground truth: also the Inception "
                               "metric (about 0.5 s per image on CPU)")


class JobSpec(BaseModel):
    """What a job decodes, as the submission checked it (:mod:`.submission`); stored with the
    job, read by the worker and the executors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["bold", "betas"]
    subject: str = Field(description="the bundle's subject label")
    tr: float | None = Field(description="repetition time of a bold run (s)")
    inputs: dict[str, str] = Field(description="upload field -> stored file name (made here)")
    filenames: dict[str, str | None] = Field(description="upload field -> the client's name")
    rows: list[int] = Field(description="0-based rows of the events / trials table to decode")
    n_rows: int = Field(description="rows of the events / trials table")
    options: JobOptions


class Links(BaseModel):
    self: str
    result: str
    page: str


class JobCreated(BaseModel):
    id: str
    status: Literal[STATES]  # type: ignore[valid-type]
    links: Links


class Progress(BaseModel):
    stage: str
    done: int
    total: int


class JobStatus(BaseModel):
    id: str
    status: Literal[STATES]  # type: ignore[valid-type]
    model: str
    subject: str
    input: Literal["bold", "betas"]
    n_trials: int
    attempts: int
    created: float
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    progress: Progress | None = None
    timings: dict[str, float] | None = None
    links: Links


class JobList(BaseModel):
    jobs: list[JobStatus]


class Hit(BaseModel):
    id: str = Field(description="gallery image id (the stimulus file, as in events.tsv)")
    score: float = Field(description="cosine similarity")
    concept: str | None = None
    thumbnail: str | None = Field(None, description="URL of the gallery thumbnail")


class TrialResult(BaseModel):
    row: int = Field(description="0-based row of the events (trials) table")
    onset: float | None = None
    trial_type: str | None = None
    stim_file: str | None = None
    topk: list[Hit]
    image: str | None = Field(None, description="URL of the reconstruction (PNG)")


class JobResult(BaseModel):
    id: str
    model: str
    subject: str
    note: str = Field(description="what stands in for the models the papers used")
    trials: list[TrialResult]
    metrics: dict[str, Any] | None = Field(
        None, description="with ground truth (stim_file): retrieval and reconstruction")


class ModelInfo(BaseModel):
    id: str
    modality: str
    subjects: list[str]
    model_type: str
    embedder: dict[str, Any]
    generator: dict[str, Any] | None
    gallery_images: int
    metrics: dict[str, Any] | None
    note: str


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    ready: bool
    models: list[str]
    workers_alive: int
    queued: int


class Problem(BaseModel):
    """Every 4xx/5xx body: one line of text (validation errors too, as ``loc: msg; ...``)."""

    detail: str = Field(description="what is wrong, in words")


class StreamSession(StreamSettings):
    """The body of ``PUT /v1/meg/session``: the ``serve.stream`` settings with the stream
    named (``DELETE /v1/meg/session`` stops decoding). Strict, as its JSON schema reads: a
    value of another JSON type (``true`` for a number, ``"1"`` for a boolean) is refused, not
    coerced; a whole number written ``4.0`` is an integer (JSON Schema's rule)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    source: str = Field(min_length=1, max_length=200, description="LSL stream name")
    subject: str = Field(min_length=1, max_length=64, description="subject label of the "
                         "bundle")

    @field_validator("*", mode="before")
    @classmethod
    def _whole_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if (cls.model_fields[info.field_name].annotation is int and isinstance(value, float)
                and value.is_integer()):
            return int(value)
        return value


class StreamQuality(BaseModel):
    gap: bool = False
    nan_channels: int = 0
    flat_channels: int = 0
    saturated_channels: int = 0
    warmup: bool = True
    missing_channels: int = 0


class StreamStatus(BaseModel):
    state: Literal["idle", "connecting", "connected", "stale", "reconnecting", "error"]
    error: str | None = None
    source: str | None = None
    markers: str | None = None
    subject: str | None = None
    model: str | None = None
    hop: float | None = None
    reconnects: int = 0
    connected_since: float | None = None
    clients: int = 0
    client_drops: int = Field(0, description="messages slow WebSocket clients skipped")
    events_from: str | None = None
    samples: int = 0
    gaps: int = 0
    dropped: int = Field(0, description="input samples missing (from the timestamps)")
    clock_jumps: int = 0
    messages: int = 0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    quality: StreamQuality | None = None
    missing_channels: list[str] = []
    window_s: float | None = None
    sfreq: float | None = None
    pending_markers: int = 0
    process_restarts: int = Field(0, description="times the decoder process died and was "
                                  "restarted")
