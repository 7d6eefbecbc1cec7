"""Per-subject ridge decoders fitted on a data module's splits (the linear baselines).

The retrieval baseline, the time-resolved (sliding-window) decoders, the temporal-focus search
and the low-level / caption pathways of reconstruction all fit a
:class:`~neurorecon.models.ridge.RidgeDecoder` per subject on that subject's train (+ val)
rows and predict its test (or val) rows; this module is the one place those rows are gathered.
"""

from __future__ import annotations

import numpy as np

from neurorecon.models.common.logging import logger
from neurorecon.models.retrieval import time_resolved_retrieval
from neurorecon.models.ridge import RidgeDecoder


def flat_targets(dm) -> np.ndarray:
    """Image embeddings as ``(n_images, dim)``; token-level targets are flattened."""
    emb = dm.embeddings.numpy()
    return emb.reshape(len(emb), -1)


def subject_arrays(dm, k: int, targets: np.ndarray | None = None, *,
                   fit_splits: tuple[str, ...] = ("train", "val"), eval_split: str = "test"
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Subject ``k``'s fit rows (default train + val), their targets, its rows of
    ``eval_split`` (default test) and their indices in that split.

    ``targets`` ``(n_stimuli, n_features)``: per-stimulus targets (default: the embeddings).
    """
    Y = flat_targets(dm) if targets is None else targets
    fit_X, fit_Y = [], []
    for name in fit_splits:
        X, s, t = dm.split_arrays(name)
        fit_X += [x for x, sk in zip(X, s, strict=True) if sk == k]
        fit_Y.append(Y[t[s == k]])
    X, s, _ = dm.split_arrays(eval_split)
    rows = np.flatnonzero(s == k)
    eval_X = np.stack([X[i] for i in rows]) if len(rows) else np.zeros((0, *fit_X[0].shape))
    return np.stack(fit_X), np.concatenate(fit_Y), eval_X, rows


def window_ridge(dm, k: int, candidates: np.ndarray, true_index: np.ndarray, *,
                 fit_splits: tuple[str, ...] = ("train", "val"), eval_split: str = "test",
                 alphas=None, step: float = 0.05) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Ridge refitted on sliding 250 ms windows of subject ``k``'s ``fit_splits`` rows, scored
    on its ``eval_split`` rows; ``true_index`` has one entry per row of ``eval_split``.

    Returns the :func:`~neurorecon.models.retrieval.time_resolved_retrieval` result and the
    scored rows.
    """
    fit_X, fit_Y, eval_X, rows = subject_arrays(dm, k, fit_splits=fit_splits,
                                                eval_split=eval_split)
    kwargs = {} if alphas is None else {"alphas": tuple(alphas)}

    def fit_predict(a, b):
        return RidgeDecoder(**kwargs).fit(a, fit_Y).predict(b)

    params = dm.recipe["params"]
    res = time_resolved_retrieval(fit_predict, fit_X, eval_X, candidates,
                                  np.asarray(true_index)[rows], sfreq=params["sfreq"],
                                  tmin=params["tmin"], step=step)
    return res, rows


def fit_ridges(dm, *, targets: np.ndarray | None = None, alphas=None,
               subjects=None) -> dict[int, RidgeDecoder]:
    """Per-subject ridge fitted on the train + val rows: ``{subject index: decoder}``.

    ``targets`` ``(n_stimuli, n_features)`` in the data module's stimulus order; default: the
    image embeddings (the retrieval baseline). ``subjects``: indices to fit (default: those
    with test rows).
    """
    Y = flat_targets(dm) if targets is None else np.asarray(targets, np.float32)
    kwargs = {} if alphas is None else {"alphas": tuple(alphas)}
    ks = np.unique(dm.splits["test"].subject) if subjects is None else subjects
    models = {}
    for k in ks:
        fit_X, fit_Y, _, _ = subject_arrays(dm, int(k), Y)
        models[int(k)] = RidgeDecoder(**kwargs).fit(fit_X, fit_Y)
        logger.info("ridge sub-%s: alpha=%g (%s form)", dm.labels[int(k)],
                    models[int(k)].alpha_, models[int(k)].solver_)
    return models


def ridge_predictions(dm, *, targets: np.ndarray | None = None, alphas=None) -> np.ndarray:
    """Per-subject ridge fitted on the train + val rows, predicting the test rows (row order).

    ``targets`` as in :func:`fit_ridges`; reconstruction passes thumbnails and caption
    embeddings (its low-level and caption pathways).
    """
    test = dm.splits["test"]
    n_out = (flat_targets(dm) if targets is None else np.asarray(targets)).shape[1]
    pred = np.zeros((len(test), n_out), np.float32)
    X, s, _ = dm.split_arrays("test")
    for k, model in fit_ridges(dm, targets=targets, alphas=alphas).items():
        rows = np.flatnonzero(s == k)
        pred[rows] = model.predict(np.stack([X[i] for i in rows]))
    return pred
