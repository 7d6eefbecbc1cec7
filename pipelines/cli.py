"""The ``neurorecon`` console entry point: ``neurorecon <stage> [hydra overrides]``.

Each stage has a root config ``configs/<stage>.yaml`` and a ``run(cfg)`` function; Hydra
handles overrides, ``--help``, ``--cfg job`` and ``--multirun``.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

#: stage name -> (module with ``run(cfg)``, one-line description)
STAGES: dict[str, tuple[str, str]] = {
    "sample": ("neurorecon.pipelines.sample.run", "write the embedded sample BIDS datasets"),
    "preprocess": ("neurorecon.pipelines.preprocess.run", "BIDS MEG/fMRI -> trial arrays cache"),
    "embed": ("neurorecon.pipelines.embed.run", "stimulus images -> embeddings cache"),
    "train": ("neurorecon.pipelines.run",
              "train an encoder (preprocess + embed if needed), evaluate it, write its bundle"),
    "evaluate": ("neurorecon.pipelines.evaluate.stage",
                 "score a bundle (or checkpoint) on a dataset with its fitted statistics"),
    "reconstruct": ("neurorecon.pipelines.evaluate.reconstruction",
                    "test-set reconstructions from a checkpoint (diffusion generator)"),
    "export": ("neurorecon.pipelines.export",
               "checkpoint -> self-contained decoder bundle (Decoder.from_pretrained)"),
    "run": ("neurorecon.pipelines.run",
            "every stage on a BIDS dataset -> metrics.json + bundle (the external contract)"),
}

USAGE = """usage: neurorecon <stage> [hydra overrides] [--help] [--cfg job] [--multirun]

stages:
{stages}

examples:
  neurorecon sample
  neurorecon preprocess data=sample_fmri preprocess.fmri.glm=lss
  neurorecon embed data=bids data.root=/data/things-meg embedder=alexnet
  neurorecon preprocess --cfg job        # print the composed config
"""


def _usage(stages: dict[str, tuple[str, str]]) -> str:
    width = max(len(s) for s in stages)
    lines = [f"  {name:<{width}}  {desc}" for name, (_, desc) in stages.items()]
    return USAGE.format(stages="\n".join(lines))


def main(argv: list[str] | None = None, *,
         stages: dict[str, tuple[str, str]] | None = None) -> None:
    """Dispatch to a stage; the rest of the command line goes to Hydra.

    ``stages``: the stage table (default :data:`STAGES`; the service layer's command adds
    its own stages, whose modules the pipelines may not import).
    """
    import hydra

    stages = STAGES if stages is None else stages
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(stages))
        return
    stage, rest = argv[0], argv[1:]
    if stage not in stages:
        print(f"neurorecon: unknown stage {stage!r}\n\n{_usage(stages)}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(stages[stage][0])

    def task(cfg):
        from neurorecon.models.common.checks import DataError
        from neurorecon.models.common.logging import configure_cli_logging, logger

        from .config_checks import check_config

        configure_cli_logging()
        try:
            check_config(cfg)
            return module.run(cfg)
        except DataError as exc:  # bad input: a clear message, no traceback
            logger.error("error: %s", exc)
            raise SystemExit(2) from None

    # argv[0] names the stage by itself (the per-stage script), so that processes re-launched
    # from sys.argv (Lightning's DDP launcher) run the same stage
    sys.argv = [_stage_script(stage), *rest]
    hydra.main(config_path="pkg://neurorecon.configs", config_name=stage, version_base="1.3")(
        task
    )()


def _stage_script(stage: str) -> str:
    """Absolute path of the ``neurorecon-<stage>`` script of this installation."""
    name = f"neurorecon-{stage}"
    for folder in (Path(sys.argv[0]).resolve().parent, Path(sys.executable).parent):
        if (folder / name).is_file():
            return str(folder / name)
    return shutil.which(name) or name


def stage_main(stages: dict[str, tuple[str, str]] | None = None) -> None:
    """Entry point of the per-stage scripts ``neurorecon-<stage>``."""
    stages = STAGES if stages is None else stages
    name = Path(sys.argv[0]).name
    stage = name.removeprefix("neurorecon-")
    if stage not in stages:
        raise SystemExit(f"{name}: not a neurorecon stage script")
    main([stage, *sys.argv[1:]], stages=stages)


if __name__ == "__main__":  # pragma: no cover
    main()
