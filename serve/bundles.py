"""The bundles a service serves: loaded once at start-up, each under a stable id."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from neurorecon.models.common.checks import DataError
from neurorecon.pipelines.inference import CONFIG, Decoder

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def bundle_id(path: Path, modality: str) -> str:
    """``<modality>-<first 10 hex of sha256(config.json)>``: the same bundle keeps its id
    across restarts (jobs refer to it), another bundle gets another."""
    digest = hashlib.sha256((path / CONFIG).read_bytes()).hexdigest()[:10]
    return f"{modality}-{digest}"


def load_bundles(entries: list[str], *, generators: bool = False) -> dict[str, Decoder]:
    """``serve.bundles`` entries (``<dir>`` or ``<id>=<dir>``) -> decoders by id.

    ``generators``: load each bundle's generator now (the processes that generate images),
    not at the first job. A bundle that does not load, or a repeated id, is a
    :class:`DataError` naming it.
    """
    decoders: dict[str, Decoder] = {}
    for entry in entries:
        name, sep, path = str(entry).partition("=")
        name, path = (name, Path(path)) if sep else (None, Path(entry))
        if name is not None and not _ID.match(name):
            raise DataError(f"serve.bundles: invalid id {name!r} (letters, digits, _.-)")
        try:
            decoder = Decoder.from_pretrained(path)
        except DataError as exc:
            where = ""  # the file inside the bundle, when the error names one
            if exc.path is not None and exc.path != path:
                inner = exc.path.relative_to(path) if exc.path.is_relative_to(path) else exc.path
                where = f"{inner}: "
            raise DataError(f"serve.bundles: cannot load bundle {path}: {where}{exc.problem}"
                            ) from None
        key = name or bundle_id(path, decoder.modality)
        if key in decoders:
            raise DataError(f"serve.bundles: id {key!r} given twice ({path})")
        if generators and decoder.config.generator is not None:
            try:
                decoder.generator  # noqa: B018 - loads it
            except DataError as exc:
                raise DataError(f"serve.bundles: cannot load the generator of bundle {path}: "
                                f"{exc.problem}") from None
        decoders[key] = decoder
    return decoders
