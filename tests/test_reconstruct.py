"""Reconstruction: the embedded generator and the reconstruct step of `run`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neurorecon.models.common.checks import DataError

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
    # epsilon-prediction: after 10 steps its noise estimate is near-useless, so img2img from a
    # coloured start keeps that colour, a property the tests can check on an untrained model
    pipe, info = train_embedding_diffusion(photos, emb, resolution=16,
                                           block_out_channels=(8, 16, 16), steps=10,
                                           batch_size=4, prediction_type="epsilon")
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


def test_retrieved_starts_blend_the_nearest_training_images():
    """One clear neighbour gives its image; two equally near ones are averaged."""
    from neurorecon.models.generators.base import retrieved_starts

    images = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    candidates = np.eye(3, 4)
    clear, tie = retrieved_starts(np.array([[1.0, 0.1, 0, 0], [1.0, 1.0, 0, 0]]), candidates,
                                  images, k=2, resolution=8)
    assert clear.size == (8, 8) and clear.getpixel((4, 4)) == (255, 0, 0)
    r, g, b = tie.getpixel((4, 4))
    assert abs(r - g) <= 1 and 120 <= r <= 130 and b == 0
    with pytest.raises(ValueError, match="3 candidate embeddings for 2 images"):
        retrieved_starts(candidates[:1], candidates, images[:2], k=1, resolution=8)


def _rerank_validation(predicted_from_truth: bool):
    """Validation trials for the re-ranking choice: 8 concepts of 4 exemplars, one exemplar
    of each a validation trial whose embedding is its concept's. Of the other three, one is
    the trial's image lightly changed, two are mostly noise: cosine cannot tell them apart,
    a thumbnail of the true image can."""
    from types import SimpleNamespace

    import torch

    from neurorecon.models.generators.base import image_thumbnails

    rng = np.random.default_rng(0)
    images, emb = [], []
    for _ in range(8):
        base = rng.uniform(0, 255, (32, 32, 3))
        code = rng.standard_normal(16)
        for mix in (1.0, 0.9, 0.25, 0.25):  # the trial, its near twin, two far exemplars
            images.append(Image.fromarray(np.uint8(
                mix * base + (1 - mix) * rng.uniform(0, 255, (32, 32, 3)))))
            emb.append(code + 0.01 * rng.standard_normal(16))
    emb = np.asarray(emb, np.float32)
    val_rows = np.arange(0, 32, 4)
    thumbs = image_thumbnails(images)
    predicted = (thumbs[val_rows] if predicted_from_truth
                 else rng.standard_normal(thumbs[val_rows].shape))
    class Split(SimpleNamespace):
        def __len__(self):
            return len(self.target)

    splits = {"train": Split(target=np.setdiff1d(np.arange(32), val_rows)),
              "val": Split(target=val_rows)}
    dm = SimpleNamespace(embeddings=torch.from_numpy(emb), splits=splits)
    return SimpleNamespace(split=splits["val"], dm=dm,
                           embeddings=lambda head="clip": emb[val_rows],
                           test_like=lambda pred, truth: pred,  # test rows of 1 trial each
                           thumbnails=thumbs, predicted=predicted, stim_images=images)


def test_rerank_weight_is_chosen_by_identification_of_its_picks():
    """lowlevel_rerank=auto: a low-level pathway whose thumbnails pick the exemplars that
    AlexNet identifies with their stimuli gets a weight; one that predicts noise gets 0 (the
    floor's retrieval)."""
    from neurorecon.pipelines.reconstruct.generation import RERANK_GRID, choose_lowlevel_rerank

    good = choose_lowlevel_rerank(_rerank_validation(True), shortlist=3, size=32)
    _check_one_standard_error(good, RERANK_GRID, min_trials=8)
    assert good["value"] > 0 and good["validation"][str(good["value"])] > good["validation"]["0.0"]
    noise = choose_lowlevel_rerank(_rerank_validation(False), shortlist=3, size=32)
    assert noise["value"] == 0.0


def test_lowlevel_pathway_reranks_the_retrieved_shortlist():
    """Of the training images the embedding points to, the low-level pathway's thumbnail picks
    the one whose layout it predicts; outside the shortlist it changes nothing."""
    from neurorecon.models.generators.base import retrieved_starts

    def halves(top, bottom):  # bright above / below: two layouts of one "concept"
        a = np.zeros((16, 16, 3), np.uint8)
        a[:8], a[8:] = top, bottom
        return Image.fromarray(a)

    images = [halves(250, 10), halves(10, 250), halves(128, 128)]
    candidates = np.array([[1.0, 0.0], [0.97, 0.24], [0.0, 1.0]])  # image 1 a bit farther
    query = np.array([[1.0, 0.0]])
    predicted = [halves(110, 140)]  # shrunk to the mean, but brighter below, as image 1
    plain = retrieved_starts(query, candidates, images, k=1, resolution=16)[0]
    assert np.asarray(plain)[0, 0, 0] == 250  # cosine alone: image 0
    kw = dict(k=1, resolution=16, coarse=predicted, rerank=1.0)
    chosen = retrieved_starts(query, candidates, images, shortlist=2, **kw)[0]
    assert np.asarray(chosen)[0, 0, 0] == 10  # re-ranked: image 1, bright below
    alone = retrieved_starts(query, candidates, images, shortlist=1, **kw)[0]
    assert np.asarray(alone)[0, 0, 0] == 250  # a shortlist of one: nothing to re-rank
    with pytest.raises(ValueError, match="2 low-level images for 1 queries"):
        retrieved_starts(query, candidates, images, k=1, resolution=16,
                         coarse=predicted * 2, rerank=1.0)


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


def _check_one_standard_error(choice: dict, grid: tuple, *, min_trials: int) -> None:
    """A choice on validation trials: every candidate scored, and the smallest one within one
    standard error (``n_se`` of them where recorded) of the best validation score kept."""
    assert choice["n_trials"] >= min_trials
    assert [float(c) for c in choice["validation"]] == list(grid)
    best, n_se = max(choice["validation"].values()), choice.get("n_se", 1)
    chosen = str(choice["value"])
    se = {c: n_se * v for c, v in choice["standard_error"].items()}
    assert choice["validation"][chosen] >= best - se[chosen] - 1e-4
    assert all(choice["validation"][c] < best - se[c] + 1e-4
               for c in choice["validation"] if float(c) < choice["value"])


def test_a_strength_must_beat_its_start_by_two_standard_errors():
    """The img2img strength's rule (``STRENGTH_N_SE``): a gain of 1.5 standard errors over the
    start itself moves a one-standard-error choice, not the strength's; 3 moves both."""
    from neurorecon.models.retrieval import one_standard_error
    from neurorecon.pipelines.reconstruct.generation import STRENGTH_N_SE

    rng = np.random.default_rng(0)
    start, z = rng.uniform(0.4, 0.8, 50), rng.standard_normal(50)
    z = (z - z.mean()) / z.std(ddof=1)  # the per-trial differences: mean 0, sd 1 exactly
    se = 0.02 / np.sqrt(50)
    for gain, moved in ((1.5, (0.1, 0.0)), (3.0, (0.1, 0.1))):
        trials = {0.0: start, 0.1: start + gain * se + 0.02 * z}
        assert (one_standard_error(trials)["value"],
                one_standard_error(trials, n_se=STRENGTH_N_SE)["value"]) == moved, gain


def test_validation_trials_made_as_good_as_averaged_test_rows():
    """``as_repeat_averaged``: single-trial predictions become what averages of ``repeats``
    trials give, per subject: their noise divided by sqrt(repeats), their signal kept, so
    retrieval among the images improves as averaging repeats would improve it; one repeat
    leaves them as they are, and predictions that carry nothing of the truth shrink to
    their mean."""
    from neurorecon.pipelines.reconstruct.generation import as_repeat_averaged

    rng = np.random.default_rng(1)
    n, d = 120, 32
    truth = rng.standard_normal((n, d))
    groups = np.repeat([0, 1], n // 2)
    slope = np.where(groups == 0, 0.5, 0.2)[:, None]  # subjects decode unequally well
    offset = np.where(groups == 0, 1.0, -1.0)[:, None]
    noise = rng.standard_normal((n, d))

    def correct(pred):  # nearest truth by correlation, within each subject
        hits = []
        for g in (0, 1):
            p, t = (a[groups == g] - a[groups == g].mean(0) for a in (pred, truth))
            hits.append(np.argmax(p @ t.T, 1) == np.arange(len(p)))
        return np.concatenate(hits).mean()

    single = offset + slope * truth + noise
    assert as_repeat_averaged(single, truth, groups=groups, repeats=1) is single
    made = as_repeat_averaged(single, truth, groups=groups, repeats=16)
    averaged = offset + slope * truth + rng.standard_normal((n, d)) / 4  # 16 true repeats
    signal = offset + slope * truth
    for g in (0, 1):  # the noise about the signal: 1 -> about 1/4 (plus the fit's own error)
        rows = groups == g
        assert np.std(single[rows] - signal[rows]) == pytest.approx(1, abs=0.05)
        assert 0.2 < np.std(made[rows] - signal[rows]) < 0.32, g
    assert correct(single) < 0.5 < correct(made)
    assert correct(made) == pytest.approx(correct(averaged), abs=0.1)
    flat = as_repeat_averaged(noise, truth, groups=groups, repeats=100)
    assert np.abs(flat - noise.mean(0)).max() < 0.5 * np.abs(noise - noise.mean(0)).max()


@pytest.mark.slow
def test_run_with_reconstruction(sample_root, tmp_path):
    from neurorecon.pipelines.run import run

    overrides = ["data=bids", f"data.root={sample_root / 'meg'}", *FAST, *SMALL_MEG,
                 "reconstruct.enabled=true", *TINY_GEN]
    cfg = compose_stage("run", tmp_path, overrides)
    metrics = run(cfg)
    rec = metrics["reconstruction"]
    assert rec["n_images"] == metrics["n_test"] and rec["resolution"] == 16
    # the embedded generator is trained on unit-normalised embeddings and conditioned on them
    assert rec["embedding_scale"] == "unit"
    assert rec["embedding_norm"]["conditioning_mean"] == pytest.approx(1.0, abs=1e-4)
    assert set(rec["metrics"]) == {"brain", "floor_retrieved", "ceiling", "lowlevel_only",
                                   "start_only"}
    # the retrieved start's low-level re-ranking weight was chosen on the validation trials
    from neurorecon.pipelines.reconstruct.generation import (
        RERANK_GRID,
        STRENGTH_GRID,
        STRENGTH_N_SE,
    )

    found = rec["retrieval"]
    assert rec["start"] == "retrieved" and found["k"] == 1
    assert found["lowlevel_rerank"] == found["lowlevel_rerank_choice"]["value"]
    _check_one_standard_error(found["lowlevel_rerank_choice"], RERANK_GRID, min_trials=2)
    # and so was the img2img strength, by generating for those trials (0: the start itself)
    assert rec["strength"] == rec["strength_choice"]["value"]
    _check_one_standard_error(rec["strength_choice"], STRENGTH_GRID, min_trials=4)
    assert rec["strength_choice"]["n_se"] == STRENGTH_N_SE  # the sampler must earn its run
    for name, m in rec["metrics"].items():
        assert -1 <= m["pixcorr"] <= 1 and 0 <= m["alexnet2"] <= 1, name
        assert 0 <= m["inception"] <= 1 and 0 <= m["effnet"] <= 2, name
        assert m["swav"] is None  # no offline weights: reported unavailable, never faked
    # scored per subject (two-way identification within a subject's test images), averaged
    per = rec["per_subject_brain"]
    assert set(per) == {"01", "02"}
    assert rec["metrics"]["brain"]["ssim"] == pytest.approx(
        np.mean([per[s]["ssim"] for s in per]))
    # the generator never saw the test or validation images: trained on the train stimuli
    from neurorecon.pipelines.export import data_of_checkpoint

    _, dm, _, _ = data_of_checkpoint(metrics["training"]["best_checkpoint"], cfg)
    train, val = (set(dm.splits[name].target.tolist()) for name in ("train", "val"))
    assert val and not train & val
    # the strength was chosen for test rows' quality: the repeats a test row averages
    repeats = dm.splits["test"].trials["n_repeats"]
    assert repeats.min() > 1
    assert rec["strength_choice"]["test_repeats"] == float(np.median(repeats))
    assert rec["generator_training"]["n_images"] == len(train)
    assert rec["seconds_per_image"] > 0
    out = Path(cfg.paths.output_dir)
    assert (out / "reconstructions.png").stat().st_size > 10_000
    assert len(list((out / "reconstructions").glob("*.png"))) == rec["n_images"]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert "stand-in" in on_disk["reconstruction"]["generator"]
    report = (out / "report.md").read_text()
    assert "## Reconstruction" in report and "![" in report and "(reconstructions.png)" in report
    assert "stand-in" in report and "| brain-decoded |" in report
    # the trained generator is cached (v-prediction, the default): a second run reuses it
    cached = list((tmp_path / "cache" / "generators").glob("embedded-*"))
    assert len(cached) == 1
    scheduler = json.loads((cached[0] / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    mtime = (cached[0] / "manifest.json").stat().st_mtime_ns
    run(compose_stage("run", tmp_path, overrides))
    assert (cached[0] / "manifest.json").stat().st_mtime_ns == mtime


@pytest.fixture(scope="module")
def meg_checkpoint(sample_root, tmp_path_factory) -> str:
    from neurorecon.pipelines.run import run

    cfg = compose_stage("train", tmp_path_factory.mktemp("train"), [
        "data=bids", f"data.root={sample_root / 'meg'}", "evaluate.ridge=false", *FAST,
        *SMALL_MEG])
    return run(cfg)["training"]["best_checkpoint"]


def test_reconstruct_stage_from_checkpoint(sample_root, meg_checkpoint, tmp_path):
    from neurorecon.pipelines.evaluate.reconstruction import run as reconstruct

    ckpt = meg_checkpoint
    rc = compose_stage("reconstruct", tmp_path / "r", [
        f"checkpoint={ckpt}", "data=bids", f"data.root={sample_root / 'meg'}", *TINY_GEN,
        "reconstruct.lowlevel=false", "reconstruct.skip_metrics=[inception]"])
    out = reconstruct(rc)
    assert out["n_images"] == 8  # 2 subjects x 4 test images
    run_dir = Path(rc.paths.output_dir)
    saved = json.loads((run_dir / "reconstruction.json").read_text())
    assert set(saved["metrics"]) == {"brain", "floor_retrieved", "ceiling", "start_only"}
    # without a low-level pathway to re-rank it, the retrieved start is the floor's image
    assert saved["retrieval"]["lowlevel_rerank"] == 0.0
    for metric in ("pixcorr", "ssim", "alexnet2", "alexnet5", "effnet"):
        assert saved["metrics"]["start_only"][metric] == pytest.approx(
            saved["metrics"]["floor_retrieved"][metric]), metric
    assert saved["metrics"]["brain"]["inception"] is None
    assert saved["metrics"]["brain"]["_notes"]["inception"].startswith("skipped")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(ckpt) and metrics["n_test"] == 8
    assert "Checkpoint:" in (run_dir / "report.md").read_text()


def test_reconstruct_bad_generator_config(sample_root, meg_checkpoint, tmp_path):
    """A pretrained backend whose local directory is missing: a clear error, no download."""
    from neurorecon.pipelines.evaluate.reconstruction import run as reconstruct

    ckpt = meg_checkpoint
    missing = tmp_path / "no-such-unclip"
    rc = compose_stage("reconstruct", tmp_path / "r", [
        f"checkpoint={ckpt}", "data=bids", f"data.root={sample_root / 'meg'}",
        "reconstruct/generator=stable_unclip", f"reconstruct.generator.path={missing}"])
    with pytest.raises(DataError, match="no-such-unclip"):
        reconstruct(rc)


def test_captions_need_a_text_backend(sample_root, meg_checkpoint, tmp_path):
    """The caption pathway with the embedded generator fails before anything is trained."""
    from neurorecon.pipelines.evaluate.reconstruction import run as reconstruct

    rc = compose_stage("reconstruct", tmp_path, [
        f"checkpoint={meg_checkpoint}", "data=bids", f"data.root={sample_root / 'meg'}",
        "reconstruct.captions=true", *TINY_GEN])
    with pytest.raises(DataError, match="embedded generator takes no text"):
        reconstruct(rc)
    assert not (tmp_path / "cache" / "generators").exists()
