"""``neurorecon reconstruct checkpoint=<ckpt>``: reconstruct a dataset's test images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig


def run(cfg: DictConfig) -> dict[str, Any]:
    """Stage entry point (Hydra root config ``reconstruct.yaml``)."""
    from ..train.evaluate import from_checkpoint
    from .run import reconstruct

    lit, dm, job = from_checkpoint(cfg)
    return reconstruct(lit, dm, cfg=job, out_dir=Path(cfg.paths.output_dir),
                       stim_root=Path(cfg.data.root) / cfg.data.stim_dir)
