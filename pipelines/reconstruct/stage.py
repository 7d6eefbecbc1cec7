"""``neurorecon reconstruct checkpoint=<ckpt>``: reconstruct a dataset's test images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


def run(cfg: DictConfig) -> dict[str, Any]:
    """Stage entry point (Hydra root config ``reconstruct.yaml``).

    Writes the reconstructions, ``metrics.json`` (``{"modality", "n_test", "checkpoint",
    "reconstruction"}``) and ``report.md`` in the run directory; returns the reconstruction
    block.
    """
    from ..common.logging import logger
    from ..evaluate.summary import write_report
    from ..train.evaluate import from_checkpoint
    from .run import reconstruct

    lit, dm, job = from_checkpoint(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out = reconstruct(lit, dm, cfg=job, out_dir=out_dir,
                      stim_root=Path(cfg.data.root) / cfg.data.stim_dir)
    metrics = {"modality": dm.modality, "n_test": out["n_images"],
               "n_test_images": len(set(dm.splits["test"].target.tolist())),
               "subjects": dm.labels,
               "embedder": dm.embedder_spec.get("name"),
               "embedder_note": dm.embedder_spec.get("substitute_note"),
               "checkpoint": str(cfg.checkpoint), "reconstruction": out}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    logger.info("reconstruct: %s", write_report(out_dir, metrics))
    return out
