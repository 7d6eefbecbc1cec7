"""The steps both modalities share: averaging of test repeats, and writing and reading the
cache in blocks (bounded memory) with the same results as in memory."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neurorecon.models.common.checks import DataError
from neurorecon.pipelines.preprocess.fmri import Moments, zscore_within
from neurorecon.pipelines.preprocess.meg import fit_robust_scaler
from neurorecon.pipelines.preprocess.store import (
    RowFile,
    TrialAssembler,
    average_repeats,
    repeat_plan,
)


def test_average_repeats_means_and_counts():
    trials = pd.DataFrame({"stim_file": ["a", "b", "t1", "t2", "t1", "t2", "t1"],
                           "split": ["train", "train", "test", "test", "test", "test", "test"]})
    X = np.arange(7, dtype=float)[:, None] * np.ones((1, 3))
    Xa, ta = average_repeats(X, trials)
    assert list(ta["stim_file"]) == ["a", "b", "t1", "t2"]
    assert list(ta["n_repeats"]) == [1, 1, 3, 2]
    np.testing.assert_allclose(Xa[2], np.mean([2, 4, 6]))
    np.testing.assert_allclose(Xa[3], np.mean([3, 5]))


def test_test_set_without_repeats_is_a_clear_error():
    trials = pd.DataFrame({"stim_file": ["a", "t1", "t2"], "split": ["train", "test", "test"]})
    with pytest.raises(DataError, match="(?s)no repeats.*average_test_repeats=false"):
        average_repeats(np.zeros((3, 2)), trials)


# ------------------------------------------------------------------ streamed cache writing


def _trials(n_train=9, n_test=3, repeats=3, seed=0):
    rng = np.random.default_rng(seed)
    stims = [f"a{i}" for i in range(n_train)] + [f"t{i}" for i in range(n_test)] * repeats
    split = ["train"] * n_train + ["test"] * (n_test * repeats)
    order = rng.permutation(len(stims))
    return pd.DataFrame({"stim_file": np.array(stims)[order], "split": np.array(split)[order]})


def test_row_file_reads_what_numpy_wrote(tmp_path):
    X = np.random.default_rng(0).standard_normal((11, 3, 5)).astype(np.float32)
    np.save(tmp_path / "X.npy", X)
    f = RowFile(tmp_path / "X.npy")
    assert f.shape == X.shape and len(f) == 11
    np.testing.assert_array_equal(f[4], X[4])
    np.testing.assert_array_equal(f[2:7], X[2:7])
    rows = np.array([9, 1, 2, 3, 0, 10])
    np.testing.assert_array_equal(f.rows(rows), X[rows])
    np.testing.assert_array_equal(np.asarray(f), X)
    import pickle

    again = pickle.loads(pickle.dumps(f))
    np.testing.assert_array_equal(again[10], X[10])
    with (tmp_path / "X.npy").open("r+b") as fh:  # a truncated file is a clear error
        fh.truncate(fh.seek(0, 2) - 100)
    with pytest.raises(DataError, match="truncated"):
        RowFile(tmp_path / "X.npy")[10]


@pytest.mark.parametrize("average", [True, False])
def test_assembler_in_blocks_equals_average_repeats(tmp_path, average):
    trials = _trials()
    X = np.random.default_rng(1).standard_normal((len(trials), 2, 4))
    plan = repeat_plan(trials, average=average)
    asm = TrialAssembler(tmp_path / "X.npy", plan, (2, 4), average=average)
    for start, stop in ((0, 5), (5, 6), (6, len(trials))):  # uneven blocks
        asm.add(np.arange(start, stop), X[start:stop])
    out = asm.close()
    got = np.load(tmp_path / "X.npy")
    if average:
        want, want_trials = average_repeats(X, trials)
    else:
        want, want_trials = X, trials.assign(n_repeats=1)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6)
    pd.testing.assert_frame_equal(out.reset_index(drop=True), want_trials)
    a, b = asm.halves()  # split halves: alternate repeats in presentation order
    for g, rows in enumerate(plan.groups):
        np.testing.assert_allclose(a[g], X[rows[0::2]].mean(0))
        np.testing.assert_allclose(b[g], X[rows[1::2]].mean(0))
    with pytest.raises(ValueError, match="in order"):
        TrialAssembler(tmp_path / "Y.npy", plan, (2, 4), average=average).add(
            np.arange(3, 5), X[3:5])


def test_streamed_scaler_equals_sklearn_robust_scaler():
    from sklearn.preprocessing import RobustScaler

    rng = np.random.default_rng(2)
    X = (rng.standard_t(3, (40, 6, 25)) * 1e-13).astype(np.float32)
    X[:, 2] = 3.0  # a constant channel: range 0 -> scale 1
    X[5:9, 4] = 1e-10  # a burst of outliers widens the histogram range
    center, scale = fit_robust_scaler(lambda: (X[i : i + 7] for i in range(0, 40, 7)), 6)
    ref = RobustScaler().fit(np.moveaxis(X.astype(np.float64), 1, -1).reshape(-1, 6))
    np.testing.assert_array_equal(center, ref.center_)
    np.testing.assert_array_equal(scale, np.where(ref.scale_ > 0, ref.scale_, 1.0))


def test_moments_in_blocks_and_zscore_within():
    X = np.random.default_rng(3).normal(5.0, 2.0, (50, 7)).astype(np.float32)
    X[:, 3] = 1.5
    m = Moments(7)
    for k in range(0, 50, 13):
        m.add(X[k : k + 13])
    mean, sd = m.stats()
    np.testing.assert_allclose(mean, X.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sd, np.where(X.std(0) > 0, X.std(0), 1.0), rtol=1e-5)
    groups = np.repeat(["r1", "r2"], 25)
    Z = zscore_within(X, groups)
    for g in ("r1", "r2"):
        np.testing.assert_allclose(Z[groups == g][:, [0, 1, 2, 4]].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(Z[groups == g][:, [0, 1, 2, 4]].std(0), 1, atol=1e-5)
    assert np.all(Z[:, 3] == 0)
