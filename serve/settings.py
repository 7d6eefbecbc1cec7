"""Service settings: one pydantic-settings class, validated when the app is built (never at
import). Values come from the Hydra ``serve`` group; keys left unset there fall back to
``NEURORECON_SERVE_<NAME>`` environment variables, the key file also to
``NEURORECON_API_KEYS_FILE``."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from neurorecon.models.common.checks import DataError


class ServeSettings(BaseSettings):
    """``neurorecon serve`` settings (see ``configs/serve/default.yaml`` for each)."""

    model_config = SettingsConfigDict(env_prefix="NEURORECON_SERVE_", extra="forbid",
                                      populate_by_name=True)

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
