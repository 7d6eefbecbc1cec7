"""API keys: a text file of ``<name> sha256:<hex of the key>`` lines; keys are never stored or
logged in clear. ``neurorecon key key.name=<name> [key.file=<file>]`` creates one."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from neurorecon.models.common.checks import DataError

_LINE = re.compile(r"^(?P<name>[A-Za-z0-9_.@-]{1,64})\s+sha256:(?P<hex>[0-9a-f]{64})$")
PREFIX = "nr_"


def hash_key(key: str) -> str:
    """``sha256:<hex>`` of a key (the form the key file holds)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The service's API keys, as hashes, by name."""

    def __init__(self, hashes: dict[str, str]):
        self._hashes = dict(hashes)  # name -> hex digest

    @classmethod
    def load(cls, path: str | Path) -> KeyRing:
        """Parse a key file; a malformed line is a :class:`DataError` naming file and line."""
        path = Path(path)
        if not path.is_file():
            raise DataError("API key file not found", path=path,
                            hint="create a key with: neurorecon key key.name=<name> "
                                 f"key.file={path}")
        hashes: dict[str, str] = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = _LINE.match(line)
            if not m:
                raise DataError(f"line {n}: expected '<name> sha256:<64 hex digits>'",
                                path=path)
            if m["name"] in hashes:
                raise DataError(f"line {n}: key name {m['name']!r} appears twice", path=path)
            hashes[m["name"]] = m["hex"]
        if not hashes:
            raise DataError("the API key file holds no keys", path=path)
        return cls(hashes)

    @property
    def names(self) -> list[str]:
        return sorted(self._hashes)

    def identify(self, key: str | None) -> str | None:
        """The name of ``key``'s owner, or None (compared in constant time)."""
        if not key:
            return None
        digest = hashlib.sha256(key.encode()).hexdigest()
        found = None
        for name, known in self._hashes.items():
            if hmac.compare_digest(digest, known):
                found = name
        return found


def create_key(path: str | Path, name: str) -> str:
    """Append a new key's hash for ``name`` to the key file (created 0600); return the key."""
    path = Path(path)
    if not _LINE.match(f"{name} sha256:{'0' * 64}"):
        raise DataError(f"invalid key name {name!r}: 1-64 letters, digits or _.@-")
    if path.is_file() and name in KeyRing.load(path).names:
        raise DataError(f"a key named {name!r} exists already", path=path,
                        hint="pick another name, or delete its line to revoke it")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = PREFIX + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(f"{name} {hash_key(key)}\n")
    return key


def run(cfg) -> None:
    """Stage entry point (root config ``key.yaml``): print the new key once."""
    key = create_key(cfg.key.file, str(cfg.key.name))
    print(f"API key for {cfg.key.name} (shown once; its hash is in {cfg.key.file}):\n{key}")
