"""Per-subject ridge decoders fitted on a data module's splits (the linear baselines).

The retrieval baseline, the time-resolved (sliding-window) decoders, the temporal-focus search
and the low-level / caption pathways of reconstruction all fit a
:class:`~neurorecon.models.ridge.RidgeDecoder` per subject on that subject's train (+ val)
rows and predict its test (or val) rows; this module is the one place those rows are gathered.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from neurorecon.models.common.logging import logger
from neurorecon.models.retrieval import sliding_retrieval
from neurorecon.models.ridge import RidgeDecoder, StandardGram, gram_ridge_predict


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


#: feature values per trial in one chunk of a streamed Gram (8 kB of float32 per trial, so
#: 8 MB per 1000 trials: a 250 ms window of 306 channels at 120 Hz is five chunks)
CHUNK_VALUES = 2048


def time_chunks(dm, k: int, sl: slice = slice(None)) -> list[slice]:
    """``sl`` of the epochs' last (time) axis cut into slices of at most ``CHUNK_VALUES``
    values per trial of subject ``k`` (whole samples of every channel; at least one)."""
    row_shape = dm.subject_row_blocks("train", k).file.row_shape
    start, stop, _ = sl.indices(row_shape[-1])
    width = max(1, CHUNK_VALUES // max(1, int(np.prod(row_shape[:-1]))))
    return [slice(a, min(a + width, stop)) for a in range(start, stop, width)]


def stream_rows(dm, k: int, splits: tuple[str, ...], features,
                keep: np.ndarray | None = None) -> np.ndarray:
    """``features(block)`` of subject ``k``'s rows of ``splits`` (in split order), the cache
    read a block of trials at a time: ``(n, n_features)`` float32 in one array, never the
    trials themselves. ``features`` maps ``(b, *row_shape)`` to ``(b, n_features)``;
    ``keep`` (bool, one per row of ``splits``) selects rows."""
    sources = [dm.subject_row_blocks(name, k) for name in splits]
    n = sum(len(src) for src in sources) if keep is None else int(keep.sum())
    out = None
    i = j = 0  # rows read, rows written
    for src in sources:
        for block in src():
            cut = features(block)
            if keep is not None:
                cut = cut[keep[i:i + len(block)]]
            i += len(block)
            del block  # not held while the next block is read
            if out is None:
                out = np.empty((n, cut.shape[1]), np.float32)
            out[j:j + len(cut)] = cut
            j += len(cut)
    return np.zeros((0, 0), np.float32) if out is None else out


def fit_targets(dm, k: int, splits: tuple[str, ...], Y: np.ndarray) -> np.ndarray:
    """Rows of ``Y`` (per-stimulus targets) for subject ``k``'s rows of ``splits``, in order."""
    return np.concatenate([Y[dm.splits[n].target[dm.splits[n].subject == k]] for n in splits])


def streamed_gram(dm, k: int, features: list[Callable[[np.ndarray], np.ndarray]], *,
                  fit_splits: tuple[str, ...], eval_split: str | None = None,
                  keep: np.ndarray | None = None) -> StandardGram:
    """The :class:`~neurorecon.models.ridge.StandardGram` of subject ``k``'s ``fit_splits``
    rows (those of ``keep``, as in :func:`stream_rows`; default all) and ``eval_split`` rows
    over the union of column chunks ``features`` (each maps a block of trials to its columns,
    as in :func:`stream_rows`), added one chunk at a time: memory holds one chunk of the
    features, never all of them nor the trials."""
    n_eval = 0 if eval_split is None else int((dm.splits[eval_split].subject == k).sum())
    n_fit = (int(sum((dm.splits[n].subject == k).sum() for n in fit_splits)) if keep is None
             else int(keep.sum()))
    gram = StandardGram(n_fit, n_eval)
    for feature in features:
        fit = stream_rows(dm, k, fit_splits, feature, keep)
        gram.add(fit, stream_rows(dm, k, (eval_split,), feature) if n_eval else fit[:0])
        del fit  # not held while the next chunk is read
    return gram


def slice_features(sl: slice) -> Callable[[np.ndarray], np.ndarray]:
    """A column chunk for :func:`streamed_gram`: ``sl`` of the last (time) axis, flattened."""
    return lambda block: block[..., sl].reshape(len(block), -1)


def streamed_ridge(dm, k: int, Y: np.ndarray, *, fit_splits: tuple[str, ...],
                   eval_split: str, slices: list[slice], alphas=None
                   ) -> tuple[np.ndarray, float]:
    """Ridge (as :class:`~neurorecon.models.ridge.RidgeDecoder`: standardized features,
    leave-one-out alpha) from subject ``k``'s ``fit_splits`` rows to ``Y`` (per-stimulus
    targets), predicting its ``eval_split`` rows; the features are the union of ``slices`` of
    the last axis (:func:`streamed_gram`), so memory holds one slice of the trials, not the
    trials."""
    gram = streamed_gram(dm, k, [slice_features(sl) for sl in slices], fit_splits=fit_splits,
                         eval_split=eval_split)
    return gram_ridge_predict(gram, fit_targets(dm, k, fit_splits, Y), alphas=alphas)


def window_ridge(dm, k: int, candidates: np.ndarray, true_index: np.ndarray, *,
                 fit_splits: tuple[str, ...] = ("train", "val"), eval_split: str = "test",
                 alphas=None, step: float = 0.05) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Ridge refitted on sliding 250 ms windows of subject ``k``'s ``fit_splits`` rows, scored
    on its ``eval_split`` rows; ``true_index`` has one entry per row of ``eval_split``.

    Returns the :func:`~neurorecon.models.retrieval.sliding_retrieval` result and the scored
    rows. Each window is read from the cache on its own (:func:`streamed_ridge`).
    """
    Y = flat_targets(dm)
    rows = np.flatnonzero(dm.splits[eval_split].subject == k)
    params = dm.recipe["params"]
    n_times = int(next(iter(dm.subjects.values())).n_times)
    res = sliding_retrieval(
        lambda sl: streamed_ridge(dm, k, Y, fit_splits=fit_splits, eval_split=eval_split,
                                  slices=time_chunks(dm, k, sl), alphas=alphas)[0],
        n_times, candidates, np.asarray(true_index)[rows], sfreq=params["sfreq"],
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


def ridge_predictions(dm, *, targets: np.ndarray | None = None, alphas=None,
                      fit_splits: tuple[str, ...] = ("train", "val"),
                      eval_split: str = "test") -> np.ndarray:
    """Per-subject ridge fitted on the ``fit_splits`` rows (train + val), predicting the
    ``eval_split`` rows (test; row order).

    ``targets`` as in :func:`fit_ridges`; reconstruction passes thumbnails and caption
    embeddings (its low-level and caption pathways). The same model as :func:`fit_ridges`
    (RidgeDecoder), computed from Gram matrices accumulated over chunks of the features
    (:func:`streamed_ridge`): memory grows by ``CHUNK_VALUES`` float32 per trial.
    """
    test = dm.splits[eval_split]
    Y = flat_targets(dm) if targets is None else np.asarray(targets, np.float32)
    pred = np.zeros((len(test), Y.shape[1]), np.float32)
    for k in np.unique(test.subject):
        k = int(k)
        pred[test.subject == k], alpha = streamed_ridge(
            dm, k, Y, fit_splits=fit_splits, eval_split=eval_split,
            slices=time_chunks(dm, k), alphas=alphas)
        logger.info("ridge sub-%s: alpha=%g", dm.labels[k], alpha)
    return pred
