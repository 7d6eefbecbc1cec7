"""``neurorecon evaluate checkpoint=<ckpt>``: score a trained encoder on a dataset.

The preprocessing recipe and the embedder are the checkpoint's own (stored in it), so the data
are prepared exactly as for training; only ``data`` (and ``paths``) come from the command line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ..common.checks import DataError
from ..common.logging import logger


def from_checkpoint(cfg: DictConfig):
    """Load ``cfg.checkpoint`` and prepare ``cfg.data`` with the checkpoint's own recipe.

    Returns the LitModule wrapping the encoder, the data module and the merged job config
    (the checkpoint's resolved config with this command's ``data``, ``paths``, ``embed`` and,
    when present, ``reconstruct``).
    """
    from .checkpoint import check_compatible, load_checkpoint
    from .module import ContrastiveLitModule
    from .run import build_datamodule, prepare_caches

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise DataError("needs checkpoint=<path to a .ckpt written by neurorecon train>")
    net, desc = load_checkpoint(cfg.checkpoint)
    trained = OmegaConf.create(desc["config"])
    overrides = {"data": cfg.data, "paths": cfg.paths,
                 "embed": cfg.get("embed") or trained.embed}
    if cfg.get("reconstruct") is not None:
        overrides["reconstruct"] = cfg.reconstruct
    job = trained.copy()
    with open_dict(job):
        for key, value in overrides.items():  # replaced whole: no stale keys from training
            job[key] = value
    preproc_dir, emb_dir = prepare_caches(job)
    dm = build_datamodule(job, preproc_dir, emb_dir)
    check_compatible(desc, dm, path=cfg.checkpoint)
    # the checkpoint's subject indices, whatever subset of subjects this data holds
    order = list(desc["data"]["subjects"])
    lit = ContrastiveLitModule(net=_Reindex(net, [order.index(s) for s in dm.labels]),
                               loss=None, optimizer=None)
    return lit, dm, job


def run(cfg: DictConfig) -> dict[str, Any]:
    """Stage entry point (Hydra root config ``evaluate.yaml``)."""
    from ..evaluate.report import evaluate
    from ..evaluate.summary import write_report

    lit, dm, _ = from_checkpoint(cfg)
    out_dir = Path(cfg.paths.output_dir)
    metrics = evaluate(lit, dm, out_dir=out_dir, stim_root=Path(cfg.data.root) / cfg.data.stim_dir,
                       ridge=bool(cfg.evaluate.ridge), time_resolved=False)
    metrics["checkpoint"] = str(cfg.checkpoint)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    logger.info("evaluate: metrics in %s, report %s", out_dir / "metrics.json",
                write_report(out_dir, metrics))
    return metrics


class _Reindex:
    """Map the data module's subject indices to the checkpoint's before calling the net."""

    def __init__(self, net, mapping: list[int]):
        self.net, self.mapping = net, mapping

    def __call__(self, x, *, subject, **extras):
        import torch

        idx = torch.as_tensor(self.mapping)[torch.as_tensor(subject)]
        return self.net(x, subject=idx, **extras)
