"""Reconstruction: the embedded generator and the reconstruct step of `run`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neurorecon.pipelines.common.checks import DataError

from .conftest import compose_stage
from .test_train import FAST, SMALL_MEG

TINY_GEN = ["reconstruct.generator.resolution=16", "reconstruct.generator.train_steps=20",
            "reconstruct.generator.block_out_channels=[8,16,16]", "reconstruct.steps=3"]


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory) -> Path:
    """An embedded generator trained for a few steps on real photos, saved with save_pretrained."""
    import skimage.data

    from neurorecon.pipelines.reconstruct.train_generator import train_embedding_diffusion

    photos = [Image.fromarray(getattr(skimage.data, n)()[:256, :256]).convert("RGB")
              for n in ("astronaut", "chelsea", "coffee", "rocket")]
    emb = np.eye(4, 8, dtype=np.float32)
    pipe, info = train_embedding_diffusion(photos, emb, resolution=16,
                                           block_out_channels=(8, 16, 16), steps=10,
                                           batch_size=4)
    assert info["steps"] == 10 and np.isfinite(info["final_loss"])
    path = tmp_path_factory.mktemp("gen") / "embedded"
    pipe.save_pretrained(path)
    return path


def test_embedded_generator_round_trip(tiny_generator):
    from neurorecon.models.generators.base import Generator
    from neurorecon.models.generators.embedding_diffusion import EmbeddingDiffusionGenerator

    gen = EmbeddingDiffusionGenerator(path=tiny_generator)
    assert isinstance(gen, Generator) and gen.emb_dim == 8 and gen.resolution == 16
    assert "stand-in" in gen.note
    emb = np.eye(3, 8, dtype=np.float32)
    a = gen.generate(emb, seed=5, steps=3)
    b = gen.generate(emb, seed=5, steps=3, batch_size=1)  # batch size does not matter
    c = gen.generate(emb, seed=6, steps=3)
    assert [im.size for im in a] == [(16, 16)] * 3
    for x, y in zip(a, b, strict=True):  # equal up to float rounding of batched convolutions
        np.testing.assert_allclose(np.asarray(x, float), np.asarray(y, float), atol=2)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    # img2img from a low-level initial image
    init = [Image.new("RGB", (16, 16), (200, 30, 30))] * 3
    d = gen.generate(emb, seed=5, steps=3, init_images=init, strength=0.3)
    assert np.asarray(d[0])[..., 0].mean() > np.asarray(d[0])[..., 2].mean()


def test_embedded_generator_bad_input(tiny_generator, tmp_path):
    from neurorecon.models.generators.embedding_diffusion import EmbeddingDiffusionGenerator

    with pytest.raises(DataError, match="model_index.json missing"):
        EmbeddingDiffusionGenerator(path=tmp_path)
    gen = EmbeddingDiffusionGenerator(path=tiny_generator)
    with pytest.raises(DataError, match=r"shape \(n, 8\); got \(2, 5\)"):
        gen.generate(np.zeros((2, 5), np.float32))
    mixed = [Image.new("RGB", (16, 16)), Image.new("RGB", (20, 20))]
    with pytest.raises(DataError, match="mixed sizes"):
        gen.generate(np.eye(2, 8, dtype=np.float32), init_images=mixed)


def test_run_with_reconstruction(sample_root, tmp_path):
    from neurorecon.pipelines.train.run import run

    overrides = ["data=bids", f"data.root={sample_root / 'meg'}", *FAST, *SMALL_MEG,
                 "reconstruct.enabled=true", *TINY_GEN]
    cfg = compose_stage("run", tmp_path, overrides)
    metrics = run(cfg)
    rec = metrics["reconstruction"]
    assert rec["n_images"] == metrics["n_test"] and rec["resolution"] == 16
    for name in ("brain", "floor_retrieved", "ceiling"):
        m = rec["metrics"][name]
        assert -1 <= m["pixcorr"] <= 1 and 0 <= m["alexnet2"] <= 1
        assert m["swav"] is None  # no offline weights: reported unavailable, never faked
    out = Path(cfg.paths.output_dir)
    assert (out / "reconstructions.png").stat().st_size > 10_000
    assert len(list((out / "reconstructions").glob("*.png"))) == rec["n_images"]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert "stand-in" in on_disk["reconstruction"]["generator"]
    # the trained generator is cached: a second run reuses it
    cached = list((tmp_path / "cache" / "generators").glob("embedded-*"))
    assert len(cached) == 1
    mtime = (cached[0] / "manifest.json").stat().st_mtime_ns
    run(compose_stage("run", tmp_path, overrides))
    assert (cached[0] / "manifest.json").stat().st_mtime_ns == mtime


def test_reconstruct_stage_from_checkpoint(sample_root, tmp_path):
    from neurorecon.pipelines.reconstruct.stage import run as reconstruct
    from neurorecon.pipelines.train.run import run

    cfg = compose_stage("train", tmp_path / "t", ["data=bids", f"data.root={sample_root / 'meg'}",
                                                  "evaluate.ridge=false", *FAST, *SMALL_MEG])
    ckpt = run(cfg)["training"]["best_checkpoint"]
    rc = compose_stage("reconstruct", tmp_path / "r", [
        f"checkpoint={ckpt}", "data=bids", f"data.root={sample_root / 'meg'}", *TINY_GEN])
    out = reconstruct(rc)
    assert out["n_images"] == 8  # 2 subjects x 4 test images
    saved = json.loads((Path(rc.paths.output_dir) / "reconstruction.json").read_text())
    assert set(saved["metrics"]) == {"brain", "floor_retrieved", "ceiling"}
