"""The MEG encoder's linear read-out, fitted and weighed against the deep embedding on
validation trials (never the test set).

A deep encoder trained on a few hundred trials per subject can fall far below a linear model
of the informative part of the epoch, and where that part lies moves from lab to lab. After
the deep encoder is trained, a per-subject ridge (:class:`~neurorecon.models.ridge.RidgeDecoder`)
is fitted on the sensor data of the temporal focus averaged in time bins (the bin width chosen
among ``bin_widths`` on validation trials), and the encoder's output becomes ``mix * deep +
(1 - mix) * read-out`` with ``mix`` chosen on the same validation trials (1: the deep
embedding alone, 0: the read-out alone). With refitting, the read-out is then refitted on
train + validation trials, as the deep encoder is. Both live in the encoder
(:meth:`MegBrainModule.set_readout`), so the bundle, the ``Decoder`` and the streamer use
them unchanged.

Memory: the ridge is solved in its dual form (:class:`~neurorecon.models.ridge.StandardGram`,
the same model and leave-one-out alpha as :class:`~neurorecon.models.ridge.RidgeDecoder`) from
the binned features of a group of channels at a time, each read from the cache a block of
trials at a time (:func:`~.ridge.streamed_gram`), and its weights are recovered group by
group: neither the trials nor all their binned features are ever held.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from neurorecon.models.common.logging import logger
from neurorecon.models.meg.brain_module import bin_means
from neurorecon.models.retrieval import candidate_rows, rank_score, rank_score_rows
from neurorecon.models.ridge import gram_ridge_predict, gram_ridge_solve

from .ridge import CHUNK_VALUES, fit_targets, flat_targets, stream_rows, streamed_gram

#: mixing weights tried on validation (deep share)
MIX_GRID = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
#: the keys of :func:`choose_readout`'s output that hold arrays of the validation trials
ARRAYS = ("val_rows", "val_pred")


def readout_bins(span: tuple[int, int], *, width: int) -> list[list[int]]:
    """``[start, stop)`` bins of ``width`` samples tiling ``span`` (the last may be shorter)."""
    start, stop = span
    return [[a, min(a + width, stop)] for a in range(start, stop, max(1, width))]


def bin_features(dm, k: int, bins: list[list[int]]) -> list:
    """Subject ``k``'s read-out features as column chunks for
    :func:`~.ridge.streamed_gram`: each takes the bin means of a group of channels (bad
    channels 0; together the columns of
    :func:`~neurorecon.models.meg.brain_module.bin_means`, the transform the encoder applies,
    channel-major), at most ``CHUNK_VALUES`` per trial."""
    good = dm.subject_inputs(k)["mask"]
    per = max(1, CHUNK_VALUES // len(bins))

    def chunk(ch: slice):
        return lambda block: bin_means(torch.from_numpy(block[:, ch]), bins, good[ch]).numpy()

    return [chunk(slice(a, a + per)) for a in range(0, len(good), per)]


def _unit(a: np.ndarray) -> np.ndarray:
    return a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-12)


def choose_readout(dm, *, span: tuple[int, int], deep_val: np.ndarray | None,
                   bin_widths: list[float], alphas=None) -> dict[str, Any] | None:
    """Bin width and mixing weight of the read-out, chosen on ``dm``'s validation trials.

    ``deep_val``: the deep encoder's clip-head predictions for the validation rows (row order
    of the split), from a model trained without them. Returns None without validation trials;
    ``val_rows`` holds the per-trial rank scores at the chosen mix and ``val_pred`` its
    predictions (unit-norm mixed; arrays: not for JSON, :data:`ARRAYS`).
    """
    val = dm.splits["val"]
    if len(val) == 0:
        return None
    stims, true = candidate_rows(val.target)
    if len(stims) < 2:
        return None
    emb = flat_targets(dm)
    cand = emb[stims]
    sfreq = float(dm.recipe["params"]["sfreq"])
    scores, preds = {}, {}
    for width_s in bin_widths:
        width = max(1, int(round(float(width_s) * sfreq)))
        bins = readout_bins(span, width=width)
        pred = np.zeros((len(val), emb.shape[1]))
        for k in np.unique(val.subject):
            gram = streamed_gram(dm, int(k), bin_features(dm, int(k), bins),
                                 fit_splits=("train",), eval_split="val")
            pred[val.subject == k] = gram_ridge_predict(
                gram, fit_targets(dm, int(k), ("train",), emb), alphas=alphas)[0]
        scores[float(width_s)] = rank_score(pred, cand, true)
        preds[float(width_s)] = pred
    width_s = max(scores, key=scores.get)
    linear = _unit(preds[width_s])
    mixed = ({0.0: linear} if deep_val is None else
             {float(w): w * _unit(deep_val) + (1 - w) * linear for w in MIX_GRID})
    rows = {w: rank_score_rows(pred, cand, true) for w, pred in mixed.items()}
    mix_scores = {w: float(r.mean()) for w, r in rows.items()}
    mix = max(mix_scores, key=lambda w: (round(mix_scores[w], 6), w))  # ties: the deeper
    logger.info("read-out: %g ms bins over %.3f-%.3f s; validation rank score deep %.3f, "
                "read-out %.3f, combined %.3f at deep share %.1f",
                1000 * width_s, *(float(dm.recipe["params"]["tmin"]) + np.array(span) / sfreq),
                mix_scores.get(1.0, float("nan")), scores[width_s], mix_scores[mix], mix)
    return {"bin_width": width_s, "mix": mix, "span": [int(v) for v in span],
            "val_rank_score": {"bins": {f"{1000 * w:g} ms": round(v, 4)
                                        for w, v in scores.items()},
                               "mix": {f"{w:g}": round(v, 4) for w, v in mix_scores.items()}},
            "val_rows": rows[mix], "val_pred": mixed[mix]}


def choose_meg_readout(cfg: DictConfig, net, dm, focus: dict[str, Any] | None
                       ) -> dict[str, Any] | None:
    """The MEG read-out's bin width and mix (``readout.meg``), chosen on validation trials
    with the deep encoder trained without them (:func:`choose_readout`); None when off."""
    from ..inference import predict_split

    spec = (cfg.get("readout") or {}).get(dm.modality) if dm.modality == "meg" else None
    if not spec or not spec.get("enabled") or not len(dm.splits["val"]):
        return None
    if dm.n_tokens:
        logger.info("read-out: off for token-level targets (%d tokens per image); the deep "
                    "encoder alone", dm.n_tokens)
        return None
    n_times = int(next(iter(dm.subjects.values())).n_times)
    span = tuple(focus["samples"]) if focus else (0, n_times)
    deep_val = predict_split(net, dm, "val")
    return choose_readout(dm, span=span, deep_val=deep_val,
                          bin_widths=list(spec.bin_widths),
                          alphas=cfg.evaluate.get("ridge_alphas"))


def attach_readout(net, dm, choice: dict[str, Any], *, fit_splits=("train", "val"),
                   alphas=None) -> None:
    """Fit the chosen read-out on ``fit_splits`` of ``dm`` and put it into ``net`` (a
    :class:`MegBrainModule`), with the chosen mix."""
    sfreq = float(dm.recipe["params"]["sfreq"])
    bins = readout_bins(tuple(choice["span"]),
                        width=max(1, int(round(choice["bin_width"] * sfreq))))
    n_chans = max(info.n_chans for info in dm.subjects.values())
    net.add_readout(bins=bins, n_chans=n_chans)
    alphas_used = {}
    for k in range(len(dm.labels)):
        alpha = fit_subject_readout(net, dm, k, index=k, fit_splits=fit_splits, alphas=alphas)
        if alpha is not None:
            alphas_used[dm.labels[k]] = alpha
    net.set_readout_mix(float(choice["mix"]))
    choice["alpha"] = alphas_used


def fit_subject_readout(net, dm, k: int, *, index: int, fit_splits=("train", "val"),
                        alphas=None) -> float | None:
    """Fit the read-out of ``dm``'s subject ``k`` on its ``fit_splits`` rows over ``net``'s
    bins and put it at ``net``'s subject ``index``; return the ridge's alpha (None: the
    subject has no rows there)."""
    splits = tuple(name for name in fit_splits if (dm.splits[name].subject == k).any())
    if not splits:
        return None
    features = bin_features(dm, k, [list(b) for b in net.readout_bins])
    gram = streamed_gram(dm, k, features, fit_splits=splits)
    solution = gram_ridge_solve(gram, fit_targets(dm, k, splits, flat_targets(dm)),
                                alphas=alphas)
    weight, bias = gram.linear_map((stream_rows(dm, k, splits, f) for f in features), solution)
    net.set_readout(index, weight, bias)
    return solution.alpha
