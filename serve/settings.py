"""Service settings: one pydantic-settings class, validated when the app is built (never at
import). Values come from the Hydra ``serve`` group; keys left unset there fall back to
``NEURORECON_SERVE_<NAME>`` environment variables, the key file also to
``NEURORECON_API_KEYS_FILE``."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from neurorecon.models.common.checks import DataError


class StreamSettings(BaseModel):
    """``serve.stream``: the real-time MEG decoder (off while ``source`` is unset); also set
    per session with ``PUT /v1/meg/session``."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(None, max_length=200, description="LSL stream name")
    subject: str | None = Field(None, max_length=64, description="subject label of the bundle")
    markers: str | None = Field(None, max_length=200, description="LSL marker stream name "
                                "(event mode); without it, the stream's stim channel")
    model: str | None = Field(None, max_length=80, description="MEG bundle id (optional "
                              "when one is loaded)")
    hop: float = Field(0.1, ge=0, le=10, description="s between sliding windows (0: off)")
    top_k: int = Field(5, ge=1, le=50)
    preview_every: int = Field(0, ge=0, le=10_000, description="a reconstruction every n "
                               "messages (0: none)")
    ring_s: float = Field(10.0, ge=2, le=120, description="s of filtered data kept")
    warmup_s: float = Field(1.0, ge=0, le=60)
    stale_s: float = Field(1.0, gt=0, le=60)
    reconnect_s: float = Field(3.0, gt=0, le=600)
    outlet: str = Field("neurorecon-decoded", max_length=200)
    client_queue: int = Field(16, ge=1, le=10_000)
    embeddings: bool = Field(False, description="include each window's embedding")
    threads: int = Field(1, ge=1, le=64, description="torch threads of the decoder (1 "
                         "leaves a core to acquisition and the API on a 2-core machine)")
    split: str | None = Field(None, max_length=20, description="gallery split of the "
                              "candidates (default: all images)")

    @model_validator(mode="after")
    def _subject_with_source(self):
        if self.source and not self.subject:
            raise ValueError("serve.stream.subject is required with serve.stream.source")
        return self


class ServeSettings(BaseSettings):
    """``neurorecon serve`` settings (see ``configs/serve/default.yaml`` for each)."""

    model_config = SettingsConfigDict(env_prefix="NEURORECON_SERVE_", extra="forbid",
                                      populate_by_name=True, env_nested_delimiter="__")

    bundles: list[str] = Field(min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Path("serve-data")
    api_keys_file: Path | None = Field(
        None, validation_alias=AliasChoices("api_keys_file", "NEURORECON_API_KEYS_FILE",
                                            "NEURORECON_SERVE_API_KEYS_FILE"))
    executor: Literal["local", "ray"] = "local"
    workers: int = Field(1, ge=1, le=64)
    ray_address: str | None = None
    max_upload_mb: float = Field(512, gt=0)
    retention_days: float = Field(7, gt=0)
    rate_limit_per_minute: int = Field(120, ge=1)
    lease_s: float = Field(60, gt=0)
    max_attempts: int = Field(3, ge=1)
    max_trials: int = Field(2000, ge=1)
    batch_size: int = Field(8, ge=1, le=256)
    stream: StreamSettings = StreamSettings()

    @field_validator("host")
    @classmethod
    def _known_host(cls, host: str) -> str:
        if host != "localhost":
            try:
                ipaddress.ip_address(host)
            except ValueError as exc:
                raise ValueError(f"not an IP address: {host!r}") from exc
        return host

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def load_settings(values: dict) -> ServeSettings:
    """Validate ``values`` (the ``serve`` config block; None entries: use the default or the
    environment); a bad setting is a :class:`DataError` naming it."""
    from pydantic import ValidationError

    values = {k: v for k, v in values.items() if v is not None}
    if isinstance(values.get("stream"), dict):
        values["stream"] = {k: v for k, v in values["stream"].items() if v is not None}
    try:
        settings = ServeSettings(**values)
    except ValidationError as exc:
        problems = "; ".join(f"serve.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in exc.errors())
        raise DataError(f"invalid service settings: {problems}") from None
    if settings.api_keys_file is None:
        raise DataError("no API key file: set serve.api_keys_file (or NEURORECON_API_KEYS_FILE)",
                        hint="create a key with: neurorecon key key.name=<name> "
                             "key.file=<file>")
    return settings
