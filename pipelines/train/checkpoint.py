"""Use a trained checkpoint on its own: rebuild the encoder and check data against it.

A checkpoint written by ``neurorecon train`` carries ``checkpoint["neurorecon"]``: the model
type and constructor config, the embedder spec, the preprocessing recipe, per-subject channel
names / 2D positions (MEG) or voxel counts (fMRI), and the resolved config. That is enough to
rebuild the encoder without Hydra or Lightning (``models.registry``) and to refuse data that
does not fit, with a message saying what differs and what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the encoder of a checkpoint; return it (eval mode) and its description."""
    from neurorecon.models.registry import build

    path = Path(path)
    if not path.is_file():
        raise DataError("checkpoint not found", path=path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    desc = ckpt.get("neurorecon")
    if not desc or not desc.get("model_config"):
        raise DataError("not a neurorecon checkpoint (no 'neurorecon' description)", path=path,
                        hint="use a checkpoint written by `neurorecon train`")
    net = build(desc["model_type"], desc["model_config"])
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()
             if k.startswith("net.")}
    net.load_state_dict(state)
    return net.eval(), desc


def selected_before_refit(path: str | Path) -> Path | None:
    """The validation-selected checkpoint that a refit checkpoint ``path`` (``refit.ckpt``,
    :func:`~.fit.refit`) was refitted from, a model that has not seen the validation trials:
    the one its run recorded (``metrics.json`` ``training.selected_checkpoint``, beside the
    ``checkpoints`` folder), else the one other checkpoint of its folder. None when ``path``
    is not a refit or that checkpoint is gone."""
    import json

    path = Path(path)
    if path.name != "refit.ckpt":
        return None
    run_metrics = path.resolve().parent.parent / "metrics.json"
    if run_metrics.is_file():
        try:
            recorded = json.loads(run_metrics.read_text()).get("training", {}).get(
                "selected_checkpoint")
        except (json.JSONDecodeError, AttributeError):
            recorded = None
        if recorded and (path.parent / Path(recorded).name).is_file():
            return path.parent / Path(recorded).name
    others = [p for p in path.parent.glob("*.ckpt") if p.name != path.name]
    if len(others) == 1:
        return others[0]
    logger.warning("%s: the checkpoint it was refitted from is not found beside it (nor in "
                   "its run's metrics.json); choices on validation trials use the refitted "
                   "model, which has seen them", path)
    return None


def check_compatible(desc: dict[str, Any], dm, *, path: str | Path) -> None:
    """Raise :class:`DataError` if the data of ``dm`` does not fit the checkpoint ``desc``."""
    trained = desc["data"]
    problems = []
    if dm.modality != trained["modality"]:
        problems.append(f"modality {dm.modality!r}, the checkpoint is for {trained['modality']!r}")
    if dm.emb_dim != trained["emb_dim"] or dm.embedder_spec.get("name") != trained["embedder"].get(
            "name"):
        problems.append(
            f"embedder {dm.embedder_spec.get('name')} (dim {dm.emb_dim}); the checkpoint was "
            f"trained on {trained['embedder'].get('name')} (dim {trained['emb_dim']}) -> embed "
            "the stimuli with that embedder")
    unknown = [s for s in dm.labels if s not in trained["subjects"]]
    if unknown:
        problems.append(f"subject(s) {unknown} unknown to the checkpoint (it knows "
                        f"{sorted(trained['subjects'])}) -> select known subjects with "
                        "data.subjects, or adapt a new subject (evaluate.adaptation)")
    params, new_params = trained["preprocessing"].get("params"), dm.recipe.get("params")
    if dm.modality == "meg" and params and new_params:
        for key in ("sfreq", "tmin", "tmax"):
            if params[key] != new_params[key]:
                problems.append(f"preprocessing {key}={new_params[key]}, the checkpoint expects "
                                f"{params[key]} -> preprocess with the checkpoint's recipe")
    for label in dm.labels:
        if label in trained["subjects"]:
            problems += dm.subjects[label].problems(trained["subjects"][label])
    if problems:
        raise DataError("data does not fit the checkpoint: " + "; ".join(problems), path=path)


def choice_encoder(checkpoint: str | Path, net, dm):
    """The encoder that makes choices on validation trials for a bundle of ``checkpoint``
    (``net`` on ``dm``, the data module it was trained on): the checkpoint its run selected
    on them before the refit, where one is found beside a ``refit.ckpt``
    (:func:`selected_before_refit`; a refitted model has seen them), else ``net``."""
    selected = selected_before_refit(checkpoint)
    if selected is None:
        return net
    logger.info("reconstruct: choices on validation trials with %s (before the refit)",
                selected)
    before, desc = load_checkpoint(selected)
    if list(desc["data"]["subjects"]) != dm.labels:
        raise DataError(f"the checkpoint it was refitted from has subjects "
                        f"{desc['data']['subjects']}, the refit {dm.labels}", path=selected)
    check_compatible(desc, dm, path=selected)
    return before
