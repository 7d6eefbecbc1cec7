"""Evaluation pieces: retrieval / identification metrics, the ridge baseline, figures."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from neurorecon.models.retrieval import (
    chance_metrics,
    cosine_similarity,
    retrieval_metrics,
    retrieval_ranks,
    sliding_windows,
    time_resolved_retrieval,
    two_way_identification,
)
from neurorecon.models.ridge import RidgeDecoder
from neurorecon.pipelines.evaluate import figures as F


def _corr_per_dim(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])]))


# --------------------------------------------------------------------------- metrics
def test_cosine_similarity_values():
    pred = np.array([[1.0, 0.0], [1.0, 1.0]])
    cand = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    sim = cosine_similarity(pred, cand)
    assert sim.shape == (2, 3)
    np.testing.assert_allclose(sim, [[1, 0, -1], [2**-0.5, 2**-0.5, -(2**-0.5)]], atol=1e-12)


def test_perfect_prediction():
    rng = np.random.default_rng(0)
    cand = rng.standard_normal((30, 16))
    idx = rng.permutation(30)[:12]
    m = retrieval_metrics(3.0 * cand[idx], cand, idx)  # scale does not matter for cosine
    assert m == {
        "top1": 1.0,
        "top5": 1.0,
        "median_rank": 1.0,
        "rel_median_rank": 1 / 30,
        "n_candidates": 30,
        "n_queries": 12,
    }


def test_reversed_prediction_known_ranks():
    # five unit vectors 10 degrees apart; prediction i points at candidate 4 - i
    angles = np.deg2rad(10 * np.arange(5))
    cand = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    pred = cand[::-1]
    true = np.arange(5)
    # true candidate i sits |4 - 2i| steps from the predicted direction 4 - i
    np.testing.assert_array_equal(retrieval_ranks(pred, cand, true), [5, 4, 1, 4, 5])
    m = retrieval_metrics(pred, cand, true, ks=(1, 3, 5))
    assert m["top1"] == pytest.approx(0.2)
    assert m["top3"] == pytest.approx(0.2)
    assert m["top5"] == 1.0
    assert m["median_rank"] == 4.0
    assert m["rel_median_rank"] == pytest.approx(0.8)


def test_ties_are_pessimistic():
    cand = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    # equidistant from candidates 0 and 1; candidate 2 duplicates candidate 0
    assert retrieval_ranks([[1.0, 1.0]], cand, [0]).tolist() == [3]
    assert retrieval_ranks([[1.0, 0.0]], cand, [0]).tolist() == [2]
    assert retrieval_ranks([[-1.0, 0.0]], cand, [3]).tolist() == [1]


def test_random_predictions_approach_chance():
    rng = np.random.default_rng(42)
    n_cand, n_queries = 20, 4000
    cand = rng.standard_normal((n_cand, 32))
    pred = rng.standard_normal((n_queries, 32))
    true = rng.integers(0, n_cand, n_queries)
    m = retrieval_metrics(pred, cand, true)
    chance = chance_metrics(n_cand)
    assert m["top1"] == pytest.approx(chance["top1"], abs=0.015)
    assert m["top5"] == pytest.approx(chance["top5"], abs=0.03)
    assert m["median_rank"] == pytest.approx(chance["median_rank"], abs=1.0)
    assert m["rel_median_rank"] == pytest.approx(chance["rel_median_rank"], abs=0.05)


def test_chance_values():
    assert chance_metrics(200) == {
        "top1": 1 / 200,
        "top5": 5 / 200,
        "median_rank": 100.5,
        "rel_median_rank": 100.5 / 200,
        "n_candidates": 200,
    }
    small = chance_metrics(3, ks=(1, 5))
    assert small["top5"] == 1.0 and small["median_rank"] == 2.0
    with pytest.raises(ValueError, match="n_candidates must be >= 1"):
        chance_metrics(0)
    with pytest.raises(ValueError, match="ks must be"):
        chance_metrics(10, ks=(0,))


def test_two_way_identification():
    rng = np.random.default_rng(1)
    true = rng.standard_normal((60, 40))
    assert two_way_identification(true + 0.01 * rng.standard_normal(true.shape), true) == 1.0
    assert two_way_identification(-true, true) == 0.0
    scores = [two_way_identification(rng.standard_normal(true.shape), true) for _ in range(5)]
    assert np.mean(scores) == pytest.approx(0.5, abs=0.03)
    noisy = two_way_identification(true + 1.5 * rng.standard_normal(true.shape), true)
    assert 0.7 < noisy < 1.0
    with pytest.raises(ValueError, match="constant row"):
        two_way_identification(np.ones((3, 4)), true[:3, :4])
    with pytest.raises(ValueError, match="row-aligned"):
        two_way_identification(true[:5], true[:6])


def test_input_errors_are_clear():
    rng = np.random.default_rng(2)
    pred, cand = rng.standard_normal((4, 8)), rng.standard_normal((6, 12))
    with pytest.raises(ValueError, match=r"emb_dim=8.*emb_dim=12"):
        retrieval_metrics(pred, cand, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="candidates is empty"):
        retrieval_metrics(pred, np.zeros((0, 8)), [0, 1, 2, 3])
    bad = pred.copy()
    bad[2, 5] = np.nan
    with pytest.raises(ValueError, match=r"pred contains 1 non-finite.*row\(s\) \[2\]"):
        cosine_similarity(bad, pred)
    with pytest.raises(ValueError, match="2-D"):
        cosine_similarity(pred[0], pred)
    with pytest.raises(ValueError, match=r"true_index must have shape \(4,\)"):
        retrieval_metrics(pred, pred, [0, 1])
    with pytest.raises(ValueError, match=r"lie in \[0, 3\]"):
        retrieval_metrics(pred, pred, [0, 1, 2, 4])
    with pytest.raises(ValueError, match="integers"):
        retrieval_metrics(pred, pred, [0.0, 1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="all-zero row"):
        cosine_similarity(np.zeros((1, 8)), pred)


def test_sliding_windows():
    starts, times = sliding_windows(100, sfreq=100.0, tmin=-0.2, width=0.25, step=0.05)
    assert starts[0] == 0 and starts[-1] <= 100 - 25 and np.all(np.diff(starts) == 5)
    assert times[0] == pytest.approx(-0.2 + 0.12)
    with pytest.raises(ValueError, match="longer than the epoch"):
        sliding_windows(20, sfreq=100.0, tmin=0.0, width=0.25)


def test_time_resolved_retrieval_finds_the_informative_window():
    rng = np.random.default_rng(3)
    sfreq, tmin, n_chans, n_times = 100.0, -0.2, 8, 100
    n_stim, emb_dim, n_rep = 20, 6, 6
    emb = rng.standard_normal((n_stim, emb_dim))
    mixing = rng.standard_normal((emb_dim, n_chans))
    times = tmin + np.arange(n_times) / sfreq
    active = (times >= 0.3) & (times < 0.55)

    def epochs(stim: np.ndarray) -> np.ndarray:
        x = rng.standard_normal((stim.size, n_chans, n_times))
        x[:, :, active] += 2.0 * (emb[stim] @ mixing)[:, :, None]
        return x

    train_stim = np.repeat(np.arange(n_stim), n_rep)
    test_stim = np.arange(n_stim)

    def fit_predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        return RidgeDecoder(alphas=np.logspace(-1, 4, 6)).fit(train, emb[train_stim]).predict(test)

    res = time_resolved_retrieval(
        fit_predict, epochs(train_stim), epochs(test_stim), emb, test_stim,
        sfreq=sfreq, tmin=tmin, width=0.25, step=0.1,
    )
    assert set(res) >= {"times", "tstart", "tstop", "top1", "top5", "median_rank"}
    assert res["tstop"] - res["tstart"] == pytest.approx(np.full(res["times"].size, 0.25))
    signal_window = np.argmin(np.abs(res["times"] - 0.42))  # spans 0.3-0.55 s
    assert res["top1"][signal_window] >= 0.8
    assert res["top5"][res["tstop"] <= 0.3].max() <= 0.6  # no signal before 0.3 s
    with pytest.raises(ValueError, match=r"fit_predict returned shape \(3, 6\)"):
        time_resolved_retrieval(
            lambda tr, te: np.zeros((3, emb_dim)), epochs(train_stim), epochs(test_stim),
            emb, test_stim, sfreq=sfreq, tmin=tmin,
        )


# --------------------------------------------------------------------------- ridge
def _planted(rng, n, p, noise, *, latent=None):
    """X (n, p) and Y = X W (+ noise) with a planted map W; low-rank X when ``latent``."""
    if latent:
        z = rng.standard_normal((n, latent))
        X = z @ rng.standard_normal((latent, p)) + 0.3 * rng.standard_normal((n, p))
    else:
        X = rng.standard_normal((n, p))
    clean = X @ rng.standard_normal((p, 10)) / np.sqrt(p) + 5.0  # non-zero offset
    Y = clean + noise * clean.std(axis=0) * rng.standard_normal(clean.shape)
    return X, Y, clean


@pytest.mark.parametrize(
    ("n", "shape", "latent", "solver"),
    [(400, (40,), None, "primal"), (100, (12, 150), 6, "dual")],
)
def test_ridge_recovers_planted_map(n, shape, latent, solver):
    rng = np.random.default_rng(4)
    p = int(np.prod(shape))
    X, Y, clean = _planted(rng, n + 100, p, 0.2, latent=latent)
    X = X.reshape(-1, *shape)
    dec = RidgeDecoder().fit(X[:n], Y[:n])
    assert dec.solver_ == solver and dec.input_shape_ == shape and dec.n_features_in_ == p
    pred = dec.predict(X[n:])
    assert pred.shape == (100, 10)
    assert _corr_per_dim(pred, clean[n:]) > 0.9
    np.testing.assert_allclose(pred.mean(axis=0), clean[n:].mean(axis=0), atol=1.0)
    # deterministic, and the same with per-target standardization of Y
    np.testing.assert_array_equal(RidgeDecoder().fit(X[:n], Y[:n]).predict(X[n:]), pred)
    std_y = RidgeDecoder(standardize_y=True).fit(X[:n], Y[:n]).predict(X[n:])
    assert _corr_per_dim(std_y, clean[n:]) > 0.9


def test_ridge_picks_larger_alpha_for_noisier_data():
    alphas = {}
    for latent, n, p in ((None, 300, 30), (5, 80, 1000)):
        for noise in (0.1, 3.0):
            X, Y, _ = _planted(np.random.default_rng(5), n, p, noise, latent=latent)
            alphas[(p, noise)] = RidgeDecoder().fit(X, Y).alpha_
    assert alphas[(30, 3.0)] > alphas[(30, 0.1)]
    assert alphas[(1000, 3.0)] > alphas[(1000, 0.1)]


def test_ridge_groups_and_options():
    rng = np.random.default_rng(6)
    X, Y, clean = _planted(rng, 120, 20, 0.3)
    groups = np.repeat(np.arange(30), 4)
    dec = RidgeDecoder(cv=3).fit(X, Y, groups=groups)
    assert dec.alpha_ in RidgeDecoder().alphas
    assert _corr_per_dim(dec.predict(X), clean) > 0.9
    per_target = RidgeDecoder(alpha_per_target=True).fit(X, Y)
    assert np.shape(per_target.alpha_) == (10,)
    with pytest.raises(ValueError, match="alpha_per_target"):
        RidgeDecoder(alpha_per_target=True).fit(X, Y, groups=groups)
    with pytest.raises(ValueError, match="distinct value"):
        RidgeDecoder(cv=5).fit(X, Y, groups=np.arange(120) % 2)


def test_ridge_input_errors():
    rng = np.random.default_rng(7)
    X, Y = rng.standard_normal((20, 3, 4)), rng.standard_normal((20, 5))
    dec = RidgeDecoder().fit(X, Y)
    with pytest.raises(ValueError, match=r"per-sample shape \(4, 3\).*fitted on \(3, 4\)"):
        dec.predict(rng.standard_normal((2, 4, 3)))
    with pytest.raises(ValueError, match="n_samples=20"):
        RidgeDecoder().fit(X, Y[:10])
    bad = X.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        RidgeDecoder().fit(bad, Y)
    with pytest.raises(ValueError, match="alphas"):
        RidgeDecoder(alphas=[0.0, 1.0]).fit(X, Y)


# --------------------------------------------------------------------------- figures
@pytest.fixture(scope="module")
def photo_paths(tmp_path_factory) -> list:
    from skimage import data

    out = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry"):
        im = Image.fromarray(getattr(data, name)())
        im.thumbnail((64, 64))
        paths.append(out / f"{name}.png")
        im.save(paths[-1])
    return paths


def _pixels_of(path, color: str) -> int:
    """Pixels of ``path`` within a small distance of ``color`` (``#rrggbb``)."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    target = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    return int((np.abs(rgb - target).sum(axis=-1) < 30).sum())


def _green_pixels(path) -> int:
    return _pixels_of(path, "#1a9850")


#: matplotlib's first two cycle colours: the first two curves of a figure
_C0, _C1 = "#1f77b4", "#ff7f0e"


def test_plot_retrieval_examples(tmp_path, photo_paths):
    rng = np.random.default_rng(8)
    cand = rng.standard_normal((len(photo_paths), 16))
    true = np.array([0, 2, 4, 5])
    pred = cand[true] + 0.3 * rng.standard_normal((4, 16))
    out = F.plot_retrieval_examples(
        [photo_paths[i] for i in true], pred, cand, photo_paths, true,
        n_examples=3, path=tmp_path / "fig" / "retrieval.png",
        note="embedder: EfficientNet-Lite0 (substitute for CLIP)",
    )
    w, h = Image.open(out).size
    assert w > h > 200  # 3 rows x 6 columns
    assert _green_pixels(out) > 100  # the true stimuli are outlined
    with pytest.raises(ValueError, match="one row per candidate path"):
        F.plot_retrieval_examples(
            photo_paths[:4], pred, cand[:3], photo_paths, true, path=tmp_path / "x.png"
        )


def test_plot_curves(tmp_path):
    times = np.linspace(-0.1, 0.7, 9)
    out = F.plot_time_resolved(
        times, {"encoder": np.linspace(0.02, 0.4, 9), "ridge": np.linspace(0.02, 0.2, 9)},
        0.025, tmp_path / "time.png", note="embedder: EfficientNet-Lite0 (substitute)",
    )
    assert _pixels_of(out, _C0) > 200 and _pixels_of(out, _C1) > 200  # both curves drawn
    out = F.plot_adaptation_curve(
        [0.1, 0.25, 1.0], {"adapter": [0.3, 0.45, 0.6], "from scratch": [0.05, 0.15, 0.5]},
        0.05, tmp_path / "adapt.png",
    )
    assert _pixels_of(out, _C0) > 100 and _pixels_of(out, _C1) > 100
    banded = F.plot_adaptation_curve(  # the sd over seeds as a band around its curve
        [0.1, 0.25, 1.0], {"adapter": [0.3, 0.45, 0.6], "from scratch": [0.05, 0.15, 0.5]},
        0.05, tmp_path / "adapt-sd.png", spread={"adapter": [0.1, 0.1, 0.1]})
    band = "#" + "".join(f"{round(255 - 0.15 * (255 - int(_C0[i:i + 2], 16))):02x}"
                         for i in (1, 3, 5))  # C0 at alpha 0.15 on white
    assert _pixels_of(banded, band) > _pixels_of(out, band) + 5000
    # a curve that picks among the others (best on validation) lies on the one it picked:
    # drawn dashed with open markers, the picked curve stays visible beneath it
    same = {"adapter": [0.3, 0.45, 0.6], "from scratch": [0.05, 0.15, 0.5],
            "best on validation": [0.3, 0.45, 0.6]}
    covered = F.plot_adaptation_curve([0.1, 0.25, 1.0], same, 0.05, tmp_path / "covered.png")
    shown = F.plot_adaptation_curve([0.1, 0.25, 1.0], same, 0.05, tmp_path / "shown.png",
                                    selections=["best on validation"])
    assert _pixels_of(shown, _C0) > 2 * _pixels_of(covered, _C0) + 100  # 395 against 78
    with pytest.raises(ValueError, match=r"curve 'ridge' has shape \(2,\)"):
        F.plot_time_resolved(times, {"ridge": [0.1, 0.2]}, None, tmp_path / "bad.png")


def test_streamed_gram_ridge_equals_ridge_decoder():
    """Ridge from Gram matrices summed over feature chunks == RidgeDecoder on all features
    (the same alpha by leave-one-out, the same predictions), in the dual and primal regimes."""
    from neurorecon.models.ridge import StandardGram, gram_ridge_predict

    rng = np.random.default_rng(0)
    for n, p in ((60, 400), (150, 40)):
        X = (rng.standard_normal((n + 12, p)) * rng.uniform(0.5, 3, p)
             + rng.uniform(-2, 2, p)).astype(np.float32)
        X[:, 5] = 1.5  # a constant feature
        Y = X @ rng.standard_normal((p, 6)) * 0.1 + 3 * rng.standard_normal((n + 12, 6))
        ref = RidgeDecoder().fit(X[:n], Y[:n])
        gram = StandardGram(n, 12)
        for cols in np.array_split(np.arange(p), 5):
            gram.add(X[:n, cols].copy(), X[n:, cols].copy())
        pred, alpha = gram_ridge_predict(gram, Y[:n])
        assert alpha == ref.alpha_
        np.testing.assert_allclose(pred, ref.predict(X[n:]), rtol=1e-4, atol=1e-4)


def test_gram_folds_equal_ridge_fitted_on_the_fold():
    """A fold cut from one Gram over all rows (features standardized with all rows'
    statistics) predicts what a ridge with intercept fitted on the fold's rows alone does."""
    from sklearn.linear_model import Ridge

    from neurorecon.models.ridge import StandardGram, gram_ridge_predict

    rng = np.random.default_rng(1)
    n, p = 80, 300
    X = (rng.standard_normal((n, p)) * rng.uniform(0.5, 3, p) + rng.uniform(-2, 2, p))
    Y = X @ rng.standard_normal((p, 4)) * 0.1 + rng.standard_normal((n, 4))
    Z = (X - X.mean(0)) / X.std(0)
    gram = StandardGram(n, 0)
    gram.add(X.copy(), X[:0].copy())
    held = np.arange(0, n, 5)
    fit = np.setdiff1d(np.arange(n), held)
    pred, alpha = gram_ridge_predict(gram.folds(fit, held), Y[fit], alphas=[30.0])
    ref = Ridge(alpha=30.0).fit(Z[fit], Y[fit]).predict(Z[held])
    np.testing.assert_allclose(pred, ref, rtol=1e-6, atol=1e-8)
    assert gram.K is not None  # the full Gram is left for the other folds


def test_gram_linear_map_equals_ridge_decoder():
    """The dual-form ridge's weights, recovered chunk by chunk from the raw features, are
    RidgeDecoder's affine map (same alpha, scalers folded in)."""
    from neurorecon.models.ridge import StandardGram, gram_ridge_solve

    rng = np.random.default_rng(2)
    n, p = 70, 250
    X = (rng.standard_normal((n, p)) * rng.uniform(0.5, 3, p) + rng.uniform(-2, 2, p)
         ).astype(np.float32)
    Y = X @ rng.standard_normal((p, 5)) * 0.1 + rng.standard_normal((n, 5))
    ref = RidgeDecoder().fit(X, Y)
    chunks = np.array_split(np.arange(p), 4)
    gram = StandardGram(n, 0)
    for cols in chunks:
        gram.add(X[:, cols].copy(), X[:0, cols].copy())
    solution = gram_ridge_solve(gram, Y)
    assert solution.alpha == ref.alpha_
    weight, bias = gram.linear_map((X[:, cols] for cols in chunks), solution)
    w_ref, b_ref = ref.linear_map()
    np.testing.assert_allclose(weight, w_ref, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(X @ weight.T + bias, ref.predict(X), rtol=1e-3, atol=1e-3)


def test_streamed_baselines_equal_in_memory_ridge(sample_root, tmp_path):
    """The run's ridge baseline and window ridge (read from the cache a slice at a time) give
    what RidgeDecoder gives on the stacked trials."""
    from neurorecon.pipelines.train.fit import build_datamodule, prepare_caches
    from neurorecon.pipelines.train.ridge import (
        flat_targets,
        ridge_predictions,
        streamed_ridge,
        subject_arrays,
        window_ridge,
    )

    from .conftest import compose_stage

    cfg = compose_stage("train", tmp_path, ["data=bids", f"data.root={sample_root / 'meg'}"])
    dm = build_datamodule(cfg, *prepare_caches(cfg))
    test = dm.splits["test"]
    pred = ridge_predictions(dm)
    targets = flat_targets(dm)
    for k in np.unique(test.subject):
        fit_X, fit_Y, eval_X, rows = subject_arrays(dm, int(k))
        ref = RidgeDecoder().fit(fit_X, fit_Y).predict(eval_X)
        np.testing.assert_allclose(pred[rows], ref, rtol=1e-3, atol=1e-3)
    cand = targets[np.unique(test.target)]
    true = np.searchsorted(np.unique(test.target), test.target)
    res, rows = window_ridge(dm, 0, cand, true, step=0.25)
    fit_X, fit_Y, eval_X, _ = subject_arrays(dm, 0)
    windows = []
    ref = time_resolved_retrieval(
        lambda a, b: windows.append(RidgeDecoder().fit(a, fit_Y).predict(b)) or windows[-1],
        fit_X, eval_X, cand, true[rows], sfreq=dm.recipe["params"]["sfreq"],
        tmin=dm.recipe["params"]["tmin"], step=0.25)
    np.testing.assert_allclose(res["times"], ref["times"])
    n_win = int(round(0.25 * dm.recipe["params"]["sfreq"]))
    for start, expected in zip((0, 60), (windows[0], windows[2]), strict=True):
        got, _ = streamed_ridge(dm, 0, targets, fit_splits=("train", "val"), eval_split="test",
                                slices=[slice(start, start + n_win)])
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
