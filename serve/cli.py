"""The ``neurorecon`` command of an installation: the pipeline stages plus the service's.

The service layer sits above the pipelines (they never import it), so it owns the command and
adds its stages to the pipelines' table: ``serve`` (the HTTP service and streaming decoder),
``key`` (create an API key) and ``replay`` (a recording as a live LSL stream).
"""

from __future__ import annotations

from neurorecon.pipelines import cli as pipeline_cli

STAGES: dict[str, tuple[str, str]] = {
    **pipeline_cli.STAGES,
    "serve": ("neurorecon.serve.run",
              "HTTP service: batch fMRI-to-image jobs on trained bundles (FastAPI + uvicorn)"),
    "key": ("neurorecon.serve.keys",
            "create an API key for the service: print it once, append its hash to the key file"),
    "replay": ("neurorecon.serve.replay",
               "replay a recording as a live LSL stream (+ its events as a marker stream)"),
}


def main(argv: list[str] | None = None) -> None:
    """``neurorecon <stage> [hydra overrides]``."""
    pipeline_cli.main(argv, stages=STAGES)


def stage_main() -> None:
    """``neurorecon-<stage>`` scripts of the service's stages."""
    pipeline_cli.stage_main(STAGES)


if __name__ == "__main__":  # pragma: no cover
    main()
