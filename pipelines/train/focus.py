"""Temporal focus of the MEG encoder, chosen by cross-validation on the train trials (never the
validation or test trials).

Visual information in MEG is carried by a short part of the epoch (Benchetrit et al. 2023,
Fig. 2: decoding rises ~80 ms after onset and fades after ~0.5 s; other recordings peak later).
With a few hundred trials per subject, a deep encoder that sees the whole epoch fits the noise
of the uninformative samples. Before training, a ridge decoder is fitted on sliding 250 ms
windows and scored by grouped k-fold over the *train* trials (folds by stimulus, so a scored
stimulus was never fitted; the rank score of each fold's trials among that fold's stimuli):
every train trial (up to :data:`MAX_TRIALS` per subject) is scored once, several times more
trials than the validation split holds,
so the choice does not move with the split's seed on weak data. The encoder then sees the span
covered by the windows that decode at least half as well as the best one (from the first
sample of the first such window to the last sample of the last). A best window within the
noise of chance still sets the span (a warning says so): on weak data the whole epoch,
baseline included, trains far worse than the best guess. Only when no window decodes above
chance at all is the whole epoch kept. The validation trials stay unseen for the choices made
after training (epochs, read-out).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from neurorecon.models.common.logging import logger
from neurorecon.models.retrieval import candidate_rows, rank_score, sliding_windows
from neurorecon.models.ridge import gram_ridge_predict

#: sliding-window width (that of the time-resolved figure) and step (s) of the focus search
WIDTH, STEP = 0.25, 0.1
#: folds of the cross-validation over train trials (grouped by stimulus)
FOLDS = 5
#: train trials per subject scored at most (whole stimuli drawn at random beyond): the search
#: only ranks windows, and its cost grows with the cube of the trials (one eigendecomposition
#: per window and fold), so it stays constant on large datasets instead of dominating them
MAX_TRIALS = 800


def cv_subset(targets: np.ndarray, max_trials: int | None = None,
              seed: int = 0) -> np.ndarray | None:
    """Rows of ``targets`` (stimulus indices) to score: None for all when there are at most
    ``max_trials``, else a bool mask of whole stimuli in a seeded random order, up to
    ``max_trials`` (default :data:`MAX_TRIALS`) trials (every repeat of a kept stimulus
    stays, so folds still group)."""
    max_trials = MAX_TRIALS if max_trials is None else max_trials
    if len(targets) <= max_trials:
        return None
    stims, counts = np.unique(targets, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(stims))
    kept = stims[order[np.cumsum(counts[order]) <= max_trials]]
    return np.isin(targets, kept)


def cv_window_scores(dm, k: int, starts: np.ndarray, n_win: int, *, alphas=None
                     ) -> tuple[np.ndarray, int]:
    """Grouped k-fold rank score of a ridge on each window ``[start, start + n_win)`` of
    subject ``k``'s train trials, and the number of trials scored (0: too few stimuli).

    One Gram matrix per window over the train trials (at most :data:`MAX_TRIALS`,
    :func:`cv_subset`; :func:`~.ridge.streamed_gram`, read from the cache a chunk of the
    window at a time); each fold is a re-centred sub-block of it."""
    from sklearn.model_selection import GroupKFold

    from .ridge import flat_targets, slice_features, streamed_gram, time_chunks

    targets = dm.splits["train"].target[dm.splits["train"].subject == k]
    keep = cv_subset(targets)
    if keep is not None:
        logger.info("temporal focus sub-%s: scoring %d of %d train trials (at most %d)",
                    dm.labels[k], int(keep.sum()), len(targets), MAX_TRIALS)
        targets = targets[keep]
    n_groups = len(np.unique(targets))
    if n_groups < 2 * FOLDS or len(targets) < 4 * FOLDS:
        return np.full(len(starts), 0.5), 0
    emb = flat_targets(dm)
    folds = list(GroupKFold(n_splits=FOLDS).split(targets, groups=targets))
    scores = np.zeros(len(starts))
    for i, start in enumerate(starts):
        gram = streamed_gram(dm, k, [slice_features(sl) for sl in time_chunks(
            dm, k, slice(int(start), int(start) + n_win))], fit_splits=("train",), keep=keep)
        window_alphas = alphas
        for fit, held in folds:
            pred, alpha = gram_ridge_predict(gram.folds(fit, held), emb[targets[fit]],
                                             alphas=window_alphas)
            # the first fold's leave-one-out alpha serves the window's other folds: the alpha
            # search is most of a fold's cost, and this only ranks windows
            window_alphas = [alpha]
            stims, true = candidate_rows(targets[held])
            scores[i] += rank_score(pred, emb[stims], true) * len(held)
    return scores / len(targets), len(targets)


def choose_focus(dm, *, alphas=None) -> dict[str, Any]:
    """Pick the encoder's temporal focus from cross-validated window decoding of the train
    trials (see the module docstring).

    Returns
    -------
    dict
        ``tmin``/``tmax`` (s from image onset), ``samples`` (``[start, stop)`` of the epoch),
        ``times`` and ``cv_rank_score`` (the cross-validated curve, averaged over subjects
        weighted by their trials), ``chance`` (0.5), ``cv_trials`` and ``reason``.
    """
    params = dm.recipe["params"]
    sfreq, tmin = float(params["sfreq"]), float(params["tmin"])
    n_times = int(next(iter(dm.subjects.values())).n_times)
    whole = {"tmin": tmin, "tmax": tmin + n_times / sfreq, "samples": [0, n_times]}
    starts, times = sliding_windows(n_times, sfreq=sfreq, tmin=tmin, width=WIDTH, step=STEP)
    n_win = max(1, int(round(WIDTH * sfreq)))
    curves, counts = zip(*(cv_window_scores(dm, k, starts, n_win, alphas=alphas)
                           for k in range(len(dm.labels))), strict=True)
    n_trials = sum(counts)
    if not n_trials:
        return {**whole, "reason": "too few train stimuli to cross-validate: whole epoch"}
    score = np.average(curves, axis=0, weights=counts)
    chance = 0.5
    smooth = np.convolve(np.pad(score, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    best = int(np.argmax(smooth))
    # noise of a mean normalised rank (uniform under chance: sd sqrt(1/12) per trial)
    noise = 2 * np.sqrt(1 / 12 / n_trials)
    out = {"times": np.round(times, 4).tolist(), "cv_rank_score": np.round(score, 4).tolist(),
           "chance": chance, "cv_trials": int(n_trials)}
    if smooth[best] <= chance:
        logger.warning("temporal focus: no window decodes above chance in cross-"
                       "validation over the train trials (best %.3f, chance %.3f); the encoder "
                       "sees the whole epoch",
                       smooth[best], chance)
        return {**whole, **out, "reason": "no window above chance: whole epoch"}
    # a peak within the noise of chance is still the best guess of where the
    # information is: the whole epoch (baseline and 1 s of noise) trains far worse on weak data
    weak = smooth[best] <= chance + noise
    if weak:
        logger.warning("temporal focus: the best cross-validated window (%.3f at %.3f s) is within "
                       "the noise of chance (%.3f + %.3f); its span is kept, as the best guess",
                       smooth[best], times[best], chance, noise)
    above = smooth >= chance + 0.5 * (smooth[best] - chance)
    lo = hi = best
    while lo > 0 and above[lo - 1]:
        lo -= 1
    while hi < len(above) - 1 and above[hi + 1]:
        hi += 1
    t0, t1 = times[lo] - WIDTH / 2, times[hi] + WIDTH / 2  # the windows' own edges
    start = max(0, int(np.floor((t0 - tmin) * sfreq)))
    stop = min(n_times, int(np.ceil((t1 - tmin) * sfreq)) + 1)
    logger.info("temporal focus: %.3f-%.3f s (cross-validated window-ridge rank score "
                "peaks at %.3f s: %.3f, chance %.3f)", tmin + start / sfreq, tmin + stop / sfreq,
                times[best], smooth[best], chance)
    return {"tmin": round(tmin + start / sfreq, 4), "tmax": round(tmin + stop / sfreq, 4),
            "samples": [start, stop], **out,
            "reason": "cross-validated window ridge" + (" (within the noise of chance)" if weak
                                                   else "")}
