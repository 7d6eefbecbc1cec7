"""Retrieval and identification metrics: pure numpy functions, no I/O and no global state.

Conventions (an external contract, see ``metrics.json`` in DESIGN.md):

- fractions (``top1``, ``top5``, two-way identification) lie in ``[0, 1]``;
- ranks are 1-based: rank 1 means the true candidate scored highest;
- ties are counted **pessimistically**: a candidate scoring exactly as high as the true one
  is ranked ahead of it, so a degenerate prediction (identical scores for every candidate)
  gets the worst rank, never a lucky one.

Shapes: predictions ``(n, emb_dim)``, candidates ``(n_candidates, emb_dim)``,
``true_index`` ``(n,)`` -- the row of ``candidates`` that holds each prediction's target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from neurorecon.models.common.logging import log_level, progress

__all__ = [
    "chance_metrics",
    "one_standard_error",
    "rank_score",
    "rank_score_rows",
    "cosine_similarity",
    "retrieval_metrics",
    "retrieval_ranks",
    "sliding_windows",
    "sliding_retrieval",
    "time_resolved_retrieval",
    "two_way_identification",
    "two_way_rows",
]

#: bound on the number of similarity scores held in memory at once (rows are chunked)
_MAX_SCORES_IN_MEMORY = 2**24


# --------------------------------------------------------------------------- input checks
def _as_matrix(name: str, array: Any, *, min_rows: int = 1) -> np.ndarray:
    """Return ``array`` as a finite float64 ``(n, d)`` matrix or raise a clear ValueError."""
    arr = np.asarray(array)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise ValueError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D with shape (n, emb_dim), got {arr.ndim}-D shape {arr.shape}"
        )
    if arr.shape[0] < min_rows:
        what = "is empty" if arr.shape[0] == 0 else f"has {arr.shape[0]} row(s)"
        raise ValueError(f"{name} {what}: at least {min_rows} row(s) needed (shape {arr.shape})")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has zero columns (shape {arr.shape}); emb_dim must be >= 1")
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN/inf) "
            f"in row(s) {rows[:10].tolist()}{' ...' if rows.size > 10 else ''}"
        )
    return arr


def _check_same_dim(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"embedding dimension mismatch: {a_name} has emb_dim={a.shape[1]} "
            f"(shape {a.shape}) but {b_name} has emb_dim={b.shape[1]} (shape {b.shape}); "
            "predictions and candidates must come from the same embedder/layer"
        )


def _unit_rows(name: str, arr: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    zero = np.nonzero(norms[:, 0] == 0)[0]
    if zero.size:
        raise ValueError(
            f"{name} has {zero.size} all-zero row(s) {zero[:10].tolist()}: "
            "cosine similarity is undefined for a zero vector"
        )
    return arr / norms


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(
        isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1 for k in ks
    ):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return tuple(int(k) for k in ks)


def _check_true_index(true_index: Any, *, n: int, n_candidates: int) -> np.ndarray:
    idx = np.asarray(true_index)
    if idx.ndim != 1 or idx.shape[0] != n:
        raise ValueError(
            f"true_index must have shape ({n},) -- one candidate row per prediction -- "
            f"got shape {idx.shape}"
        )
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"true_index must hold integers, got dtype {idx.dtype}")
    out = (idx < 0) | (idx >= n_candidates)
    if out.any():
        raise ValueError(
            f"true_index values must lie in [0, {n_candidates - 1}] (n_candidates="
            f"{n_candidates}); {int(out.sum())} do not, e.g. {idx[out][:5].tolist()}"
        )
    return idx.astype(np.intp, copy=False)


# --------------------------------------------------------------------------- similarities
def cosine_similarity(pred: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Cosine similarity between every prediction and every candidate.

    Parameters
    ----------
    pred : array, shape (n, emb_dim)
        Predicted embeddings.
    candidates : array, shape (n_candidates, emb_dim)
        Candidate embeddings.

    Returns
    -------
    sim : ndarray of float64, shape (n, n_candidates)
        ``sim[i, j] = <pred_i, cand_j> / (|pred_i| |cand_j|)``, in ``[-1, 1]``.

    Raises
    ------
    ValueError
        If an input is not a finite, non-empty 2-D array, if the embedding dimensions differ
        (the message states both), or if a row is all zeros.
    """
    pred = _as_matrix("pred", pred)
    candidates = _as_matrix("candidates", candidates)
    _check_same_dim("pred", pred, "candidates", candidates)
    sim = _unit_rows("pred", pred) @ _unit_rows("candidates", candidates).T
    return np.clip(sim, -1.0, 1.0)


# --------------------------------------------------------------------------- retrieval
def top_k(pred: np.ndarray, candidates: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` candidates most cosine-similar to each prediction, best first.

    Parameters
    ----------
    pred : array, shape (n, emb_dim)
        Predicted embeddings.
    candidates : array, shape (n_candidates, emb_dim)
        Candidate embeddings.
    k : int
        Candidates per prediction (at most ``n_candidates``).

    Returns
    -------
    index : ndarray of int, shape (n, k)
        Candidate rows, most similar first (ties: lower row first).
    score : ndarray of float, shape (n, k)
        Their cosine similarities.
    """
    return CandidateIndex(candidates).top_k(pred, k)


class CandidateIndex:
    """Candidates checked and unit-normalised once, for many :meth:`top_k` queries (a served
    gallery: every streamed window queries the same candidates).

    ``dtype``: of the stored unit vectors and the similarities; float32 (a served gallery)
    reads half the memory per query, float64 (the default) is what evaluation uses.
    """

    def __init__(self, candidates: np.ndarray, *, dtype=np.float64):
        candidates = _as_matrix("candidates", candidates)
        self.unit = np.ascontiguousarray(_unit_rows("candidates", candidates), dtype=dtype)

    def __len__(self) -> int:
        return self.unit.shape[0]

    def top_k(self, pred: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """As :func:`top_k`."""
        pred = _as_matrix("pred", pred)
        _check_same_dim("pred", pred, "candidates", self.unit)
        sim = np.clip(_unit_rows("pred", pred).astype(self.unit.dtype, copy=False)
                      @ self.unit.T, -1.0, 1.0)
        k = min(_check_ks([k])[0], sim.shape[1])
        if k < sim.shape[1]:  # the k best, then ordered: score down, row up (stable)
            part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            part.sort(axis=1)
            vals = np.take_along_axis(sim, part, axis=1)
            order = np.take_along_axis(part, np.argsort(-vals, axis=1, kind="stable"), axis=1)
        else:
            order = np.argsort(-sim, axis=1, kind="stable")
        return order, np.take_along_axis(sim, order, axis=1)


def candidate_rows(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique target rows as candidates and each row's index among them."""
    uniq, index = np.unique(targets, return_inverse=True)
    return uniq, index


def retrieval_ranks(
    pred: np.ndarray, candidates: np.ndarray, true_index: Sequence[int] | np.ndarray
) -> np.ndarray:
    """1-based rank of the true candidate for each prediction, by cosine similarity.

    Parameters
    ----------
    pred : array, shape (n, emb_dim)
        Predicted embeddings.
    candidates : array, shape (n_candidates, emb_dim)
        Candidate embeddings (the retrieval set).
    true_index : array of int, shape (n,)
        Row of ``candidates`` holding the target of each prediction.

    Returns
    -------
    ranks : ndarray of int, shape (n,)
        ``ranks[i]`` = number of candidates whose similarity to ``pred[i]`` is **greater than
        or equal to** that of the true candidate (the true one included). Ties are therefore
        pessimistic: rank 1 means strictly better than every other candidate.

    Raises
    ------
    ValueError
        On bad shapes, NaNs, empty candidates, mismatched embedding dimensions, zero rows or
        ``true_index`` values outside ``[0, n_candidates)``.
    """
    pred = _as_matrix("pred", pred)
    candidates = _as_matrix("candidates", candidates)
    _check_same_dim("pred", pred, "candidates", candidates)
    idx = _check_true_index(true_index, n=pred.shape[0], n_candidates=candidates.shape[0])
    p = _unit_rows("pred", pred)
    c = _unit_rows("candidates", candidates)
    ranks = np.empty(p.shape[0], dtype=np.int64)
    chunk = max(1, _MAX_SCORES_IN_MEMORY // c.shape[0])
    for start in range(0, p.shape[0], chunk):
        sl = slice(start, start + chunk)
        sim = p[sl] @ c.T
        true_sim = sim[np.arange(sim.shape[0]), idx[sl]]
        ranks[sl] = (sim >= true_sim[:, None]).sum(axis=1)
    return ranks


def retrieval_metrics(
    pred: np.ndarray,
    candidates: np.ndarray,
    true_index: Sequence[int] | np.ndarray,
    *,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float | int]:
    """Top-k accuracy and median rank of cosine-similarity retrieval.

    Parameters
    ----------
    pred : array, shape (n, emb_dim)
        Predicted embeddings (one per test trial, or per stimulus after averaging repeats).
    candidates : array, shape (n_candidates, emb_dim)
        Candidate embeddings: the test stimuli, or a larger set that contains them.
    true_index : array of int, shape (n,)
        Row of ``candidates`` holding the target of each prediction.
    ks : sequence of int
        The ``k`` of each top-k accuracy; key ``f"top{k}"`` in the result.

    Returns
    -------
    metrics : dict
        ``top{k}`` for each ``k`` (fraction in ``[0, 1]`` of predictions whose true candidate
        has rank <= k; 1.0 when ``k >= n_candidates``), ``median_rank`` (1-based, median over
        predictions), ``rel_median_rank`` (``median_rank / n_candidates``, in ``(0, 1]``),
        ``n_candidates`` and ``n_queries``. Plain Python numbers (JSON-ready). Ties are
        pessimistic (see :func:`retrieval_ranks`).

    See Also
    --------
    chance_metrics : the same keys for a random ranking.
    """
    ks = _check_ks(ks)
    ranks = retrieval_ranks(pred, candidates, true_index)
    n_candidates = int(np.asarray(candidates).shape[0])
    out: dict[str, float | int] = {f"top{k}": float(np.mean(ranks <= k)) for k in ks}
    median_rank = float(np.median(ranks))
    out["median_rank"] = median_rank
    out["rel_median_rank"] = median_rank / n_candidates
    out["n_candidates"] = n_candidates
    out["n_queries"] = int(ranks.shape[0])
    return out


def rank_score(pred: np.ndarray, candidates: np.ndarray, true_index: Sequence[int] | np.ndarray
               ) -> float:
    """1 - the mean normalised rank of the true candidate (0.5 chance, 1 perfect): a retrieval
    score that stays continuous and unsaturated with few candidates (where top-5 is not)."""
    return float(rank_score_rows(pred, candidates, true_index).mean())


def rank_score_rows(pred: np.ndarray, candidates: np.ndarray,
                    true_index: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per prediction, 1 - the normalised rank of its true candidate: ``(n,)``, the rows whose
    mean is :func:`rank_score` (paired rows compare two models on the same trials)."""
    ranks = retrieval_ranks(pred, candidates, true_index)
    return 1 - (ranks - 1) / max(len(candidates) - 1, 1)


def one_standard_error(per_trial: dict[Any, np.ndarray], *, order: Sequence[Any] | None = None,
                       n_se: float = 1.0) -> dict[str, Any]:
    """The first candidate of ``order`` (default: the smallest) whose mean per-trial score is
    within one standard error (of the per-trial differences; ``n_se`` of them where a move
    off the plainest option costs more than it is likely to gain) of the best candidate's: a
    gain within the noise of a few validation trials does not move a choice off its plainest
    option, nor does the best of many tries win by selection alone.

    ``per_trial``: candidate -> its scores on the same trials, row-aligned. Returns
    ``{"value", "best", "validation": {str(candidate): mean}, "standard_error":
    {str(candidate): se of its difference to the best}, "n_trials"}``. With one trial there is
    no spread to measure (standard errors 0): the best mean wins.
    """
    order = list(order) if order is not None else sorted(per_trial)
    n = len(per_trial[order[0]])
    curve = {c: float(np.mean(per_trial[c])) for c in order}
    best = max(order, key=lambda c: (curve[c], -order.index(c)))  # ties: the earlier
    se = {c: float(np.std(per_trial[best] - per_trial[c], ddof=1) / np.sqrt(n)) if n > 1
          else 0.0 for c in order}
    value = next(c for c in order if curve[c] >= curve[best] - n_se * se[c])
    return {"value": value, "best": best, **({"n_se": n_se} if n_se != 1 else {}),
            "validation": {str(c): round(v, 4) for c, v in curve.items()},
            "standard_error": {str(c): round(v, 4) for c, v in se.items()},
            "n_trials": int(n)}


def chance_metrics(n_candidates: int, ks: Sequence[int] = (1, 5)) -> dict[str, float | int]:
    """Expected retrieval metrics of a uniformly random ranking of ``n_candidates``.

    Parameters
    ----------
    n_candidates : int
        Size of the candidate set (>= 1).
    ks : sequence of int
        As in :func:`retrieval_metrics`.

    Returns
    -------
    metrics : dict
        ``top{k} = min(k, n) / n``, ``median_rank = (n + 1) / 2`` (the median of a rank drawn
        uniformly from ``1..n``), ``rel_median_rank = median_rank / n`` and ``n_candidates``.
    """
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, int | np.integer):
        raise ValueError(f"n_candidates must be an integer, got {n_candidates!r}")
    n = int(n_candidates)
    if n < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n}")
    ks = _check_ks(ks)
    out: dict[str, float | int] = {f"top{k}": min(k, n) / n for k in ks}
    out["median_rank"] = (n + 1) / 2
    out["rel_median_rank"] = (n + 1) / (2 * n)
    out["n_candidates"] = n
    return out


# --------------------------------------------------------------------------- identification
def two_way_rows(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Two-way identification by Pearson correlation, per row of ``true``.

    For every ordered pair ``(i, j)``, ``i != j``, the pair counts as correct when the true
    embedding ``true[i]`` correlates more with its own prediction ``pred[i]`` than with the
    other prediction ``pred[j]``. Exact ties count as half (so chance is 0.5 whatever the
    predictions). Works for any feature vectors (embeddings, flattened images, network
    features of reconstructions).

    Parameters
    ----------
    pred : array, shape (n, n_features)
        Predictions, ``n >= 2``.
    true : array, shape (n, n_features)
        Ground truth, row-aligned with ``pred``.

    Returns
    -------
    accuracy : array, shape (n,)
        Per row ``i``, the fraction of its pairs ``(i, j)`` that are correct, in ``[0, 1]``;
        0.5 is chance, 1.0 perfect.

    Raises
    ------
    ValueError
        On shape mismatch, NaNs, fewer than 2 rows, or a constant row (correlation undefined).
    """
    pred = _as_matrix("pred", pred, min_rows=2)
    true = _as_matrix("true", true, min_rows=2)
    _check_same_dim("pred", pred, "true", true)
    if pred.shape[0] != true.shape[0]:
        raise ValueError(
            f"pred has {pred.shape[0]} rows but true has {true.shape[0]}: they must be "
            "row-aligned (one prediction per ground-truth item)"
        )
    if pred.shape[1] < 2:
        raise ValueError(f"correlation needs >= 2 features, got n_features={pred.shape[1]}")

    def _zrows(name: str, x: np.ndarray) -> np.ndarray:
        x = x - x.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        const = np.nonzero(norms[:, 0] == 0)[0]
        if const.size:
            raise ValueError(
                f"{name} has {const.size} constant row(s) {const[:10].tolist()}: "
                "correlation is undefined for a constant vector"
            )
        return x / norms

    corr = _zrows("true", true) @ _zrows("pred", pred).T  # corr[i, j] = r(true_i, pred_j)
    own = np.diag(corr)[:, None]
    off = ~np.eye(corr.shape[0], dtype=bool)
    wins = ((own > corr) & off).sum(axis=1) + 0.5 * ((own == corr) & off).sum(axis=1)
    return wins / off.sum(axis=1)


def two_way_identification(pred: np.ndarray, true: np.ndarray) -> float:
    """Two-way identification accuracy by Pearson correlation: the mean over rows of
    :func:`two_way_rows` (every row has as many pairs, so it is the fraction of all ordered
    pairs that are correct). Parameters, errors: as there; 0.5 is chance, 1.0 perfect."""
    return float(two_way_rows(pred, true).mean())


# --------------------------------------------------------------------------- time-resolved
def sliding_windows(
    n_times: int, *, sfreq: float, tmin: float, width: float = 0.25, step: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ranges and centre times of sliding windows over an epoch.

    Parameters
    ----------
    n_times : int
        Samples per epoch.
    sfreq : float
        Sampling frequency in Hz.
    tmin : float
        Time of the first sample in s (relative to stimulus onset).
    width : float
        Window width in s; rounded to whole samples (at least 1).
    step : float
        Distance between window starts in s; rounded to whole samples (at least 1).

    Returns
    -------
    starts : ndarray of int, shape (n_windows,)
        First sample of each window; each window spans ``round(width * sfreq)`` samples.
    times : ndarray of float, shape (n_windows,)
        Centre time of each window in s: ``tmin + (start + (n_win - 1) / 2) / sfreq``.
    """
    if not sfreq > 0:
        raise ValueError(f"sfreq must be > 0 Hz, got {sfreq!r}")
    if not (width > 0 and step > 0):
        raise ValueError(f"width and step must be > 0 s, got width={width!r}, step={step!r}")
    n_win = max(1, int(round(width * sfreq)))
    n_step = max(1, int(round(step * sfreq)))
    if n_win > n_times:
        raise ValueError(
            f"window of {width} s ({n_win} samples at {sfreq} Hz) is longer than the epoch "
            f"({n_times} samples = {n_times / sfreq:.3f} s); use a shorter width or longer epochs"
        )
    starts = np.arange(0, n_times - n_win + 1, n_step)
    times = tmin + (starts + (n_win - 1) / 2) / sfreq
    return starts, times


def time_resolved_retrieval(
    fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
    epochs_train: np.ndarray,
    epochs_test: np.ndarray,
    candidates: np.ndarray,
    true_index: Sequence[int] | np.ndarray,
    *,
    sfreq: float,
    tmin: float,
    width: float = 0.25,
    step: float = 0.05,
    ks: Sequence[int] = (1, 5),
    verbose: bool | str | int | None = None,
) -> dict[str, np.ndarray]:
    """Retrieval metrics of a decoder refitted on sliding time windows of MEG epochs.

    For each window, ``fit_predict(train_window, test_window)`` fits a decoder on the training
    epochs cropped to the window and returns predicted embeddings for the cropped test epochs;
    those are scored with :func:`retrieval_metrics`. The decoder is injected, so any model
    (e.g. :class:`~neurorecon.models.ridge.RidgeDecoder` closed over the training
    targets) can be used; training targets stay with the callable.

    Parameters
    ----------
    fit_predict : callable
        ``fit_predict(train, test) -> pred`` with ``train`` of shape
        ``(n_train, n_chans, n_win)``, ``test`` of shape ``(n_test, n_chans, n_win)`` and
        ``pred`` of shape ``(n_test, emb_dim)``. Must fit on ``train`` only.
    epochs_train : array, shape (n_train, n_chans, n_times)
        Training epochs.
    epochs_test : array, shape (n_test, n_chans, n_times)
        Test epochs, same channels and time axis as ``epochs_train``.
    candidates : array, shape (n_candidates, emb_dim)
        Retrieval set.
    true_index : array of int, shape (n_test,)
        Row of ``candidates`` holding the target of each test epoch.
    sfreq : float
        Sampling frequency in Hz.
    tmin : float
        Time of the first sample in s.
    width, step : float
        Window width and step in s (default 250 ms windows every 50 ms).
    ks : sequence of int
        As in :func:`retrieval_metrics`.
    verbose : bool | str | int | None
        Log level for this call (progress bar at INFO).

    Returns
    -------
    result : dict of ndarray, each shape (n_windows,)
        ``times`` (window centres, s), ``tstart`` / ``tstop`` (first sample time, last sample
        time + 1 / sfreq), and one array per key of :func:`retrieval_metrics`
        (``top{k}``, ``median_rank``, ``rel_median_rank``).
    """
    epochs_train = np.asarray(epochs_train)
    epochs_test = np.asarray(epochs_test)
    for name, ep in (("epochs_train", epochs_train), ("epochs_test", epochs_test)):
        if ep.ndim != 3 or 0 in ep.shape:
            raise ValueError(
                f"{name} must have shape (n_epochs, n_chans, n_times) with no empty axis, "
                f"got {ep.shape}"
            )
    if epochs_train.shape[1:] != epochs_test.shape[1:]:
        raise ValueError(
            f"epochs_train (n_chans, n_times)={epochs_train.shape[1:]} differs from epochs_test "
            f"{epochs_test.shape[1:]}: both must share channels and time axis"
        )
    return sliding_retrieval(
        lambda sl: fit_predict(epochs_train[:, :, sl], epochs_test[:, :, sl]),
        epochs_train.shape[2], candidates, true_index, sfreq=sfreq, tmin=tmin, width=width,
        step=step, ks=ks, verbose=verbose)


def sliding_retrieval(
    predict_window: Callable[[slice], np.ndarray],
    n_times: int,
    candidates: np.ndarray,
    true_index: Sequence[int] | np.ndarray,
    *,
    sfreq: float,
    tmin: float,
    width: float = 0.25,
    step: float = 0.05,
    ks: Sequence[int] = (1, 5),
    verbose: bool | str | int | None = None,
) -> dict[str, np.ndarray]:
    """:func:`time_resolved_retrieval` for a decoder that reads its own data:
    ``predict_window(slice)`` fits on the window ``slice`` of the epochs' time axis
    (``n_times`` samples) and returns ``(len(true_index), emb_dim)`` predictions. Same result
    dictionary."""
    ks = _check_ks(ks)
    starts, times = sliding_windows(n_times, sfreq=sfreq, tmin=tmin, width=width, step=step)
    n_win = max(1, int(round(width * sfreq)))
    n_test = len(true_index)
    rows: list[dict[str, float | int]] = []
    with log_level(verbose):
        for start in progress(starts, desc="time windows", total=len(starts)):
            pred = np.asarray(predict_window(slice(int(start), int(start) + n_win)))
            if pred.ndim != 2 or pred.shape[0] != n_test:
                raise ValueError(
                    f"fit_predict returned shape {pred.shape}; expected "
                    f"({n_test}, emb_dim) -- one prediction per test epoch"
                )
            rows.append(retrieval_metrics(pred, candidates, true_index, ks=ks))
    out = {
        "times": times,
        "tstart": tmin + starts / sfreq,
        "tstop": tmin + (starts + n_win) / sfreq,
    }
    for key in (*(f"top{k}" for k in ks), "median_rank", "rel_median_rank"):
        out[key] = np.array([r[key] for r in rows], dtype=float)
    return out
