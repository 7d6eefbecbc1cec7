"""Reconstruction metrics (MindEye protocol) on real photos: identical, noisy, shuffled pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from neurorecon.models.common.checks import DataError
from neurorecon.pipelines.evaluate import recon_metrics as RM

#: skimage.data photos (all bundled with scikit-image, no download)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
CROP = 128
N = len(PHOTOS)
#: a derangement: every reconstruction shows another stimulus
SHUFFLE = [1, 2, 3, 0]
#: two-way ceiling for a derangement: reconstruction i equals stimulus SHUFFLE[i], so it
#: correlates perfectly with that other stimulus and loses at least that comparison
DERANGED_MAX = (N - 2) / (N - 1)
TWO_WAY = ("alexnet2", "alexnet5", "inception", "clip")


def _center_crop(photo: np.ndarray, side: int) -> np.ndarray:
    h, w = photo.shape[:2]
    y, x = (h - side) // 2, (w - side) // 2
    return photo[y : y + side, x : x + side, :3]


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    import skimage.data

    return np.stack([_center_crop(getattr(skimage.data, n)(), CROP) for n in PHOTOS])


@pytest.fixture(scope="module")
def noisy(truth) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(truth + rng.normal(0, 12, truth.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def shuffled(truth) -> np.ndarray:
    return truth[SHUFFLE]


@pytest.fixture(scope="module")
def identical_scores(truth, hf_dirs) -> dict[str, float]:
    """Each public metric function on (truth, truth); the recon batch is a separate copy."""
    recon = truth.copy()
    return {
        "pixcorr": RM.pixcorr(recon, truth),
        "ssim": RM.ssim(recon, truth),
        "alexnet2": RM.alexnet_two_way(recon, truth, layer=2),
        "alexnet5": RM.alexnet_two_way(recon, truth, layer=5),
        "inception": RM.inception_two_way(recon, truth),
        "clip": RM.clip_two_way(recon, truth, path=hf_dirs["clip"]),
        "effnet": RM.effnet_distance(recon, truth),
    }


@pytest.fixture(scope="module")
def noisy_metrics(noisy, truth) -> dict:
    # no CLIP directory; Inception skipped to keep the test short (shuffled pairs cover it)
    return RM.reconstruction_metrics(noisy, truth, skip=["inception"])


@pytest.fixture(scope="module")
def shuffled_metrics(shuffled, truth, hf_dirs) -> dict:
    return RM.reconstruction_metrics(shuffled, truth, clip_path=hf_dirs["clip"])


# --------------------------------------------------------------------------- values
def test_identical_images_are_perfect(identical_scores):
    s = identical_scores
    assert s["pixcorr"] == pytest.approx(1.0, abs=1e-9)
    assert s["ssim"] == pytest.approx(1.0, abs=1e-9)
    for name in TWO_WAY:
        assert s[name] == 1.0, name
    assert s["effnet"] == pytest.approx(0.0, abs=1e-6)


def test_shuffled_pairs_score_low(shuffled_metrics):
    m = shuffled_metrics
    assert m["pixcorr"] < 0.3
    assert m["ssim"] < 0.6
    for name in TWO_WAY:
        assert 0.0 <= m[name] <= DERANGED_MAX, name
    assert m["effnet"] > 0.5  # correlation distance of unrelated photos (~1)


def test_noisy_images_score_between(noisy_metrics, shuffled_metrics):
    noisy, shuf = noisy_metrics, shuffled_metrics
    for name in ("pixcorr", "ssim"):
        assert shuf[name] + 0.2 < noisy[name] < 1.0 - 1e-3, name
    for name in ("alexnet2", "alexnet5"):
        assert DERANGED_MAX < noisy[name] <= 1.0, name
    assert 1e-4 < noisy["effnet"] < shuf["effnet"] - 0.2


def test_result_layout_notes_and_unavailable(noisy_metrics, shuffled_metrics, hf_dirs):
    for m in (noisy_metrics, shuffled_metrics):
        assert list(m) == [*RM.METRICS, "_notes"]
        assert set(m["_notes"]) == set(RM.METRICS)
        assert all(isinstance(note, str) and note for note in m["_notes"].values())
        assert m["swav"] is None and "unavailable" in m["_notes"]["swav"]
        json.dumps(m)  # goes into metrics.json as is
        notes = m["_notes"]
        assert "EfficientNet-Lite0" in notes["effnet"] and "substitute" in notes["effnet"]
        assert "EfficientNet-B1" in notes["effnet"]
    assert noisy_metrics["clip"] is None
    assert noisy_metrics["inception"] is None
    assert noisy_metrics["_notes"]["inception"].startswith("skipped")
    assert "unavailable" in noisy_metrics["_notes"]["clip"]
    assert "clip_path" in noisy_metrics["_notes"]["clip"]
    assert isinstance(shuffled_metrics["clip"], float)
    notes = shuffled_metrics["_notes"]
    assert "pt_inception-2015-12-05" in notes["inception"] and "substitute" in notes["inception"]
    assert all(shuffled_metrics[name] is not None for name in RM.METRICS if name != "swav")
    assert str(hf_dirs["clip"]) in shuffled_metrics["_notes"]["clip"]


def test_aggregate_matches_single_functions(shuffled, truth, shuffled_metrics):
    assert RM.alexnet_two_way(shuffled, truth, layer=5) == shuffled_metrics["alexnet5"]
    assert RM.pixcorr(shuffled, truth) == shuffled_metrics["pixcorr"]


def test_sets_and_groups_equal_separate_calls(noisy, shuffled, truth):
    """Several sets scored at once, per group (e.g. subject), equal one call per set and group.

    The stimuli repeat across the two groups, as a test image does across subjects: each
    distinct image goes through the networks once, and two-way identification only compares
    rows within a group.
    """
    skip = ["inception", "clip"]
    both = np.concatenate([truth, truth])
    groups = np.array(["01"] * N + ["02"] * N)
    sets = {"noisy": np.concatenate([noisy, shuffled]), "shuffled": np.concatenate([shuffled,
                                                                                     shuffled])}
    res = RM.compare_reconstructions(sets, both, groups=groups, skip=skip)
    assert set(res) == {"noisy", "shuffled"}
    sub2 = RM.reconstruction_metrics(shuffled, truth, skip=skip)
    sub1 = RM.reconstruction_metrics(noisy, truth, skip=skip)
    per = res["noisy"]["_per_group"]
    for name in ("pixcorr", "ssim", "alexnet2", "alexnet5", "effnet"):
        assert per["01"][name] == pytest.approx(sub1[name], rel=1e-6), name
        assert per["02"][name] == pytest.approx(sub2[name], rel=1e-6), name
        assert res["noisy"][name] == pytest.approx((sub1[name] + sub2[name]) / 2, rel=1e-6)
        assert res["shuffled"][name] == pytest.approx(sub2[name], rel=1e-6), name
    with pytest.raises(DataError, match="at least 2 pairs per group"):
        RM.compare_reconstructions(sets, both, groups=np.arange(2 * N), skip=skip)


def test_pixcorr_and_ssim_protocol(noisy, truth):
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    # no resize at size == image size: PixCorr is the mean Pearson r of the flattened pixels
    expected = np.mean([np.corrcoef(r.ravel().astype(float), t.ravel().astype(float))[0, 1]
                        for r, t in zip(noisy, truth, strict=True)])
    assert RM.pixcorr(noisy, truth, size=CROP) == pytest.approx(expected, rel=1e-9)
    # SSIM: skimage on rgb2gray images, each pixel column a "channel" (MindEye's quirk)
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    gr, gt = rgb2gray(noisy / 255.0), rgb2gray(truth / 255.0)
    pairs = list(zip(gr, gt, strict=True))
    cols = np.mean([structural_similarity(r, t, channel_axis=-1, **kw) for r, t in pairs])
    full = np.mean([structural_similarity(r, t, **kw) for r, t in pairs])
    assert RM.ssim(noisy, truth, size=CROP) == pytest.approx(cols, rel=1e-6)
    assert RM.ssim(noisy, truth, size=CROP, per_column=False) == pytest.approx(full, rel=1e-6)
    assert abs(cols - full) > 1e-3


def test_inputs_pil_lists_and_sizes(noisy, truth):
    pil = [Image.fromarray(a) for a in noisy]
    np.testing.assert_array_equal(RM.as_image_batch(pil), noisy)
    assert RM.pixcorr(pil, list(truth), size=64) == RM.pixcorr(noisy, truth, size=64)
    gray = RM.as_image_batch([Image.fromarray(truth[0]).convert("L")] * 2)
    assert gray.shape == (2, CROP, CROP, 3) and gray.dtype == np.uint8
    # reconstructions at another resolution (same aspect) are resized like the stimuli
    big = np.stack([np.asarray(Image.fromarray(a).resize((2 * CROP, 2 * CROP))) for a in noisy])
    assert RM.pixcorr(big, truth, size=CROP) > 0.9


# --------------------------------------------------------------------------- bad input
def test_mismatches_raise_data_error(truth, hf_dirs, tmp_path):
    with pytest.raises(DataError, match="recon has 3 images but truth has 4"):
        RM.reconstruction_metrics(truth[:3], truth)
    mixed = [Image.fromarray(a) for a in truth]
    mixed[2] = mixed[2].resize((CROP, CROP - 8))
    with pytest.raises(DataError, match=r"recon: mixed image sizes: .* image 2 is 120x128"):
        RM.reconstruction_metrics(mixed, truth)
    with pytest.raises(DataError, match=r"truth: mixed image sizes"):
        RM.pixcorr(truth, [*truth[:3], truth[3, :64]])
    with pytest.raises(DataError, match="dtype uint8"):
        RM.ssim(truth / 255.0, truth)
    with pytest.raises(DataError, match="which cannot be compared"):
        RM.pixcorr(truth[:, :, :64], truth)
    with pytest.raises(DataError, match="at least 2 image pairs"):
        RM.alexnet_two_way(truth[:1], truth[:1], layer=2)
    flat = truth.copy()
    flat[1] = 128
    with pytest.raises(DataError, match=r"recon image\(s\) \[1\] are constant"):
        RM.pixcorr(flat, truth)
    with pytest.raises(DataError, match="no config.json"):
        RM.reconstruction_metrics(truth, truth, clip_path=tmp_path)
    with pytest.raises(ValueError, match="Invalid value for 'skip'"):
        RM.reconstruction_metrics(truth, truth, skip=["lpips"])
    with pytest.raises(ValueError, match="Invalid value for 'layer'"):
        RM.alexnet_two_way(truth, truth, layer=6)
