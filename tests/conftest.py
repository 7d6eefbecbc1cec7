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
    """Compose the real root config of ``stage`` with all paths under ``root`` (the command
    line completed as the CLI completes it: ``data.modality=<m>`` chooses ``modality=<m>``)."""
    from neurorecon.pipelines.cli import modality_overrides

    with initialize_config_module("neurorecon.configs", version_base="1.3"):
        cfg = compose(
            config_name=stage,
            overrides=modality_overrides([f"paths.root_dir={root}", *overrides]),
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(root / "runs" / stage)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    Path(cfg.hydra.runtime.output_dir).mkdir(parents=True, exist_ok=True)
    return cfg


def scored_sample(root: Path, overrides: list[str] = ()) -> Path:
    """A sample large enough to score retrieval (8 concepts x 8 train exemplars, 16 test
    images repeated 3 times; the tiny session sample has 4 test images, which makes top-5
    chance 1.0), written under ``root``."""
    from neurorecon.pipelines.sample.run import make_sample

    cfg = compose_stage("sample", root, [
        "sample=tiny", "sample.stimuli.n_concepts=8", "sample.stimuli.n_train_exemplars=8",
        "sample.stimuli.n_test_exemplars=2", "sample.stimuli.n_test_repeats=3", *overrides])
    return make_sample(cfg.sample, root / "data" / "sample")


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """The tiny sample dataset (MEG + fMRI BIDS roots), generated once per test session."""
    from neurorecon.pipelines.sample.run import make_sample

    root = tmp_path_factory.mktemp("nr")
    cfg = compose_stage("sample", root, ["sample=tiny"])
    return make_sample(cfg.sample, root / "data" / "sample")


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-config CLIP vision and DINOv2 models + processors saved with save_pretrained."""
    import torch
    from transformers import (
        BitImageProcessor,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Config,
        Dinov2Model,
    )

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, image_size=32, patch_size=8)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**small, projection_dim=16)).save_pretrained(
        root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    Dinov2Model(Dinov2Config(**small)).save_pretrained(root / "dinov2")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                      ).save_pretrained(root / "dinov2")
    return {"clip": root / "clip", "dinov2": root / "dinov2"}


@pytest.fixture(scope="session")
def fmri_bundle(sample_root, tmp_path_factory) -> Path:
    """A tiny fMRI bundle with a generator and a low-level pathway (the service's tests)."""
    from neurorecon.pipelines.run import run

    from .test_bundle import FAST, TINY_GENERATOR
    from .test_train import SMALL_FMRI

    cfg = compose_stage("train", tmp_path_factory.mktemp("svc-fmri"), [
        "data=bids", f"data.root={sample_root / 'fmri'}", "data.modality=fmri",
        *FAST, *SMALL_FMRI, *TINY_GENERATOR, "trainer.max_epochs=6"])
    run(cfg)
    return Path(cfg.paths.output_dir) / "bundle"


@pytest.fixture(scope="session")
def meg_run(sample_root, tmp_path_factory):
    """A causal MEG run with a generator (its bundle streams): directory, config, metrics."""
    from neurorecon.pipelines.run import run

    from .test_bundle import FAST, TINY_GENERATOR
    from .test_train import SMALL_MEG

    cfg = compose_stage("train", tmp_path_factory.mktemp("meg"), [
        "data=bids", f"data.root={sample_root / 'meg'}", "preprocess.meg.phase=causal",
        *FAST, *SMALL_MEG, *TINY_GENERATOR])
    metrics = run(cfg)
    return Path(cfg.paths.output_dir), cfg, metrics
