"""Averaging of test repeats (the step both modalities share)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neurorecon.models.common.checks import DataError
from neurorecon.pipelines.preprocess.store import average_repeats


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
