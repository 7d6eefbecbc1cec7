"""The ``neurorecon`` console entry point: ``neurorecon <stage> [hydra overrides]``.

Each stage has a root config ``configs/<stage>.yaml`` and a ``run(cfg)`` function; Hydra
handles overrides, ``--help``, ``--cfg job`` and ``--multirun``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path

#: stage name -> (module with ``run(cfg)``, one-line description)
STAGES: dict[str, tuple[str, str]] = {
    "sample": ("neurorecon.pipelines.sample.run", "write the embedded sample BIDS datasets"),
    "validate": ("neurorecon.pipelines.data.validate",
                 "the official BIDS validator on data.root, before a long run"),
    "preprocess": ("neurorecon.pipelines.preprocess.run", "BIDS MEG/fMRI -> trial arrays cache"),
    "embed": ("neurorecon.pipelines.embed.run", "stimulus images -> embeddings cache"),
    "train": ("neurorecon.pipelines.run",
              "train an encoder (preprocess + embed if needed), evaluate it, write its bundle"),
    "evaluate": ("neurorecon.pipelines.evaluate.stage",
                 "score a bundle (or checkpoint) on a dataset with its fitted statistics"),
    "reconstruct": ("neurorecon.pipelines.evaluate.reconstruction",
                    "test-set reconstructions through a bundle (or checkpoint), floor, ceiling"),
    "export": ("neurorecon.pipelines.export",
               "checkpoint -> self-contained decoder bundle (Decoder.from_pretrained)"),
    "adapt": ("neurorecon.pipelines.adapt",
              "add new participants to a trained bundle (shared frozen, fine-tuned copy, "
              "from scratch or the three averaged)"),
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
    from hydra.errors import ConfigCompositionException, OverrideParseException

    from neurorecon.models.common.checks import DataError
    from neurorecon.models.common.logging import configure_cli_logging, logger

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
    try:
        rest = modality_overrides(rest)
    except DataError as exc:
        configure_cli_logging()
        logger.error("error: %s", exc)
        raise SystemExit(2) from None
    # Hydra prints its own errors and exits 1 unless HYDRA_FULL_ERROR is set: it is set while
    # the config is composed, so that a mistyped key or option reaches the handler below in
    # one line (a user who set it gets Hydra's full report); the task unsets it, so that its
    # own errors are reported as they were
    ours = "HYDRA_FULL_ERROR" not in os.environ

    def task(cfg):
        from .config_checks import check_config

        if ours:
            os.environ.pop("HYDRA_FULL_ERROR", None)
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
    if ours:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(config_path="pkg://neurorecon.configs", config_name=stage,
                   version_base="1.3")(task)()
    except (ConfigCompositionException, OverrideParseException) as exc:
        if not ours:
            raise
        configure_cli_logging()
        logger.error("error: %s", composition_error(exc))
        raise SystemExit(2) from None


def modality_overrides(overrides: list[str]) -> list[str]:
    """``overrides`` with ``data.modality=<m>`` turned into the group choice ``modality=<m>``.

    The modality is a config group (``configs/modality``; it sets ``data.modality`` and pulls
    in the modality's own preprocess, encoder and fit options), while ``data.modality=<m>`` is
    the documented way to choose it (``data=bids data.modality=fmri``). Hydra cannot choose a
    group from a value, so the command line is rewritten before composing (the CLI and the
    tests' composition); a sweep (``data.modality=meg,fmri``) becomes a sweep of the group.
    Raises :class:`DataError` for a modality that does not exist or one that disagrees with
    ``modality=``.
    """
    from neurorecon.models.common.checks import DataError, check_option

    from .data.studies import MODALITIES

    keys = [o.split("=", 1)[0].lstrip("+~") if "=" in o else None for o in overrides]
    if "data.modality" not in keys:
        return list(overrides)

    def last(key: str) -> int:  # the last override of a key counts
        return len(keys) - 1 - keys[::-1].index(key)

    at = last("data.modality")
    value = overrides[at].split("=", 1)[1]
    for one in value.split(","):
        check_option("data.modality", one.strip(), MODALITIES)
    if "modality" in keys:
        group = overrides[last("modality")].split("=", 1)[1]
        if group != value:
            raise DataError(f"data.modality={value} disagrees with modality={group}: give "
                            "one of them (either chooses the modality)")
        at = -1  # the group is chosen already
    # in place: Hydra's parser takes the overrides before or after its flags, not both
    return [f"modality={value}" if i == at else o
            for i, (o, key) in enumerate(zip(overrides, keys, strict=True))
            if key != "data.modality" or i == at]


def composition_error(exc: Exception) -> str:
    """One line for an error Hydra raises while composing the config from the command line.

    A config group option that does not exist lists the group's options; a key that does not
    exist suggests the close matches among the keys at its level (:mod:`difflib`); anything
    else is Hydra's message without its config search path.
    """
    import difflib
    import re

    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf import DictConfig
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from .data.studies import MODALITIES

    if isinstance(exc, MissingConfigException) and exc.options and exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(option, exc.options, n=1)
        return (f"config group {group!r} has no option {option!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; available: {', '.join(exc.options)}")
    cause = exc.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        key = str(cause.full_key)
        prefix, _, leaf = key.rpartition(".")
        # the options of the modality this config was not composed for (refit.fmri,
        # focus.meg): the missing key, or the one under it, is a modality
        tried = re.search(r"Could not override '([^']+)'", str(exc))
        below = (tried.group(1).removeprefix(key + ".").split(".")[0]
                 if tried and tried.group(1).startswith(key + ".") else "")
        m = leaf if leaf in MODALITIES else below if below in MODALITIES else None
        if m:
            key = tried.group(1) if tried else key
            return (f"no config key {key!r}: an option of the {m} modality, which "
                    f"modality={m} (or data.modality={m}) chooses")
        parent = cause.parent_node
        keys = [str(k) for k in parent.keys() if k != "hydra"] if isinstance(
            parent, DictConfig) else []
        close = [f"{prefix}.{k}" if prefix else k
                 for k in difflib.get_close_matches(leaf, keys, n=1)]
        if close:
            return f"no config key {key!r}; did you mean {close[0]}?"
        level = f"under {prefix!r}" if prefix else "at the top level"
        known = f"; the keys {level}: {', '.join(keys)}" if keys else ""
        return f"no config key {key!r}{known} (+{key}=<value> adds a new key)"
    lines = str(exc).split("\nConfig search path:")[0].splitlines()
    message = " ".join(line.strip() for line in lines if line.strip())
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the override {exc.override!r}: {message}"
    return message


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
