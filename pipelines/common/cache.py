"""Content-addressed cache: a directory per (stage, parameters, inputs), written atomically.

A cache entry is a directory ``<root>/<stage>/<name>-<key>/`` holding the stage's files and a
``manifest.json``. Entries are built in a hidden temporary sibling and renamed into place only
after every file (manifest last) has been written, so a failed or interrupted run never leaves
an entry that a later run trusts. The key hashes the stage name, its JSON-able parameters, the
fingerprints (path, size, mtime) of its input files, the keys of upstream entries and
:data:`CACHE_VERSION`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurorecon.models.common.logging import logger

#: Bump when the on-disk layout or the computation of a stage changes.
CACHE_VERSION = 2
MANIFEST = "manifest.json"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Identity of an input file that changes when the file does (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(
    stage: str,
    params: Mapping[str, Any],
    *,
    inputs: Iterable[str | Path] = (),
    upstream: Iterable[str] = (),
) -> str:
    """Return a 12-hex-digit key for a stage's parameters, input files and upstream keys."""
    payload = {
        "stage": stage,
        "version": CACHE_VERSION,
        "params": _jsonable(params),
        "inputs": sorted((file_fingerprint(p) for p in inputs), key=lambda d: d["path"]),
        "upstream": sorted(upstream),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class CacheEntry:
    """One keyed cache directory."""

    root: Path
    stage: str
    name: str
    key: str

    @property
    def path(self) -> Path:
        return self.root / self.stage / f"{self.name}-{self.key}"

    def exists(self) -> bool:
        """True if a complete entry (with its manifest) is in place."""
        return (self.path / MANIFEST).is_file()

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text())

    @contextlib.contextmanager
    def writing(
        self, params: Mapping[str, Any], *, inputs: Iterable[str | Path] = ()
    ) -> Iterator[Path]:
        """Yield a temporary directory; on success it atomically becomes :attr:`path`.

        On any exception the temporary directory is removed and nothing is left at
        :attr:`path`. An existing complete entry is never overwritten.
        """
        if self.exists():
            raise FileExistsError(f"cache entry already complete: {self.path}")
        final = self.path
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
        try:
            yield tmp
            files = sorted(
                str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()
            )
            manifest = {
                "stage": self.stage,
                "name": self.name,
                "key": self.key,
                "cache_version": CACHE_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "params": _jsonable(params),
                "inputs": [file_fingerprint(p) for p in inputs],
                "files": files,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            if final.exists():  # an incomplete leftover without manifest: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("cache: wrote %s", final)


def cache_entry(
    root: str | Path,
    stage: str,
    name: str,
    params: Mapping[str, Any],
    *,
    inputs: Iterable[str | Path] = (),
    upstream: Iterable[str] = (),
) -> CacheEntry:
    """Build the :class:`CacheEntry` for these parameters and inputs."""
    key = cache_key(stage, params, inputs=list(inputs), upstream=upstream)
    return CacheEntry(Path(root), stage, name, key)
