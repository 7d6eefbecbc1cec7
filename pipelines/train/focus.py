"""Temporal focus of the MEG encoder, chosen on validation trials (never the test set).

Visual information in MEG is carried by a short part of the epoch (Benchetrit et al. 2023,
Fig. 2: decoding rises ~80 ms after onset and fades after ~0.5 s; other recordings peak later).
With a few hundred trials per subject, a deep encoder that sees the whole epoch fits the noise
of the uninformative samples. Before training, a ridge decoder is refitted on sliding 250 ms
windows of the *train* trials and scored on the *validation* trials (held-out train stimuli);
the encoder then sees the span covered by the windows that decode at least half as well as the
best one (from the first sample of the first such window to the last sample of the last).
A best window within the binomial noise of chance still sets the span (a warning says so):
on weak data the whole epoch, baseline included, trains far worse than the best guess. Only
when no window decodes above chance at all is the whole epoch kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from neurorecon.models.common.logging import logger
from neurorecon.models.retrieval import candidate_rows

#: sliding-window width (that of the time-resolved figure) and step (s) of the focus search
WIDTH, STEP = 0.25, 0.1


def choose_focus(dm, *, alphas=None) -> dict[str, Any]:
    """Pick the encoder's temporal focus from validation decoding (see the module docstring).

    Returns
    -------
    dict
        ``tmin``/``tmax`` (s from image onset), ``samples`` (``[start, stop)`` of the epoch),
        ``times`` and ``val_top5`` (the validation curve averaged over subjects), ``chance``
        and ``reason``.
    """
    from .ridge import flat_targets, window_ridge

    params = dm.recipe["params"]
    sfreq, tmin = float(params["sfreq"]), float(params["tmin"])
    n_times = int(next(iter(dm.subjects.values())).n_times)
    whole = {"tmin": tmin, "tmax": tmin + n_times / sfreq, "samples": [0, n_times]}
    _, val_subject, val_target = dm.split_arrays("val")
    stims, true_index = candidate_rows(val_target)
    if len(stims) < 2:
        return {**whole, "reason": "no validation trials: whole epoch"}
    candidates = flat_targets(dm)[stims]
    curves = [window_ridge(dm, k, candidates, true_index, fit_splits=("train",),
                           eval_split="val", alphas=alphas, step=STEP)[0]
              for k in range(len(dm.labels)) if (val_subject == k).any()]
    times = curves[0]["times"]
    score = np.mean([c["top5"] for c in curves], axis=0)
    chance = min(1.0, 5 / len(stims))
    smooth = np.convolve(np.pad(score, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    best = int(np.argmax(smooth))
    # binomial noise of a top-5 fraction over the validation trials of all subjects
    n_trials = len(dm.splits["val"])
    noise = 2 * np.sqrt(chance * (1 - chance) / max(n_trials, 1))
    out = {"times": np.round(times, 4).tolist(), "val_top5": np.round(score, 4).tolist(),
           "chance": round(chance, 4)}
    if smooth[best] <= chance:
        logger.warning("temporal focus: no window decodes above chance on the validation "
                       "trials (best %.3f, chance %.3f); the encoder sees the whole epoch",
                       smooth[best], chance)
        return {**whole, **out, "reason": "no window above chance: whole epoch"}
    # a peak within the binomial noise of chance is still the best guess of where the
    # information is: the whole epoch (baseline and 1 s of noise) trains far worse on weak data
    weak = smooth[best] <= chance + noise
    if weak:
        logger.warning("temporal focus: the best validation window (%.3f at %.3f s) is within "
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
    logger.info("temporal focus: %.3f-%.3f s (validation window-ridge top-5 peaks at %.3f "
                "s: %.3f, chance %.3f)", tmin + start / sfreq, tmin + stop / sfreq,
                times[best], smooth[best], chance)
    return {"tmin": round(tmin + start / sfreq, 4), "tmax": round(tmin + stop / sfreq, 4),
            "samples": [start, stop], **out,
            "reason": "validation window ridge" + (" (within the noise of chance)" if weak
                                                   else "")}
