"""Shared fixtures: real Hydra configs composed for a temporary root, a tiny sample dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("LSLAPICFG", str(REPO.parent / "shared" / "lsl_api.cfg"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def compose_stage(stage: str, root: Path, overrides: list[str] = ()) -> DictConfig:
    """Compose the real root config of ``stage`` with all paths under ``root``."""
    with initialize_config_module("neurorecon.configs", version_base="1.3"):
        cfg = compose(
            config_name=stage,
            overrides=[f"paths.root_dir={root}", *overrides],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(root / "runs" / stage)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    Path(cfg.hydra.runtime.output_dir).mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """The tiny sample dataset (MEG + fMRI BIDS roots), generated once per test session."""
    from neurorecon.pipelines.sample.run import make_sample

    root = tmp_path_factory.mktemp("nr")
    cfg = compose_stage("sample", root, ["sample=tiny"])
    return make_sample(cfg.sample, root / "data" / "sample")
