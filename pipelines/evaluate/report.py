"""Evaluate a trained encoder against the ridge baseline and chance; write metrics + figures.

Predictions come from the encoder's contrastive head on the test split (test repeats averaged
upstream). Retrieval is by cosine similarity among the test images (the ``retrieval`` block of
``metrics.json``, the external contract), and among *all* stimulus images of the dataset
(``retrieval_all_images``), a harder candidate set. The ridge baseline is fitted per subject on
exactly the train + validation trials the encoder saw and scored on the same test rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common.logging import logger
from .figures import plot_retrieval_examples, plot_time_resolved
from .metrics import chance_metrics, retrieval_metrics, time_resolved_retrieval
from .ridge import RidgeDecoder

CONTRACT_KEYS = ("top1", "top5", "median_rank", "rel_median_rank")


def _contract(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in (*CONTRACT_KEYS, "n_candidates") if k in m}


def flat_targets(dm) -> np.ndarray:
    """Image embeddings as ``(n_images, dim)``; token-level targets are flattened."""
    emb = dm.embeddings.numpy()
    return emb.reshape(len(emb), -1)


@torch.no_grad()
def predict_split(lit, dm, name: str, *, head: str = "clip") -> np.ndarray:
    """Predictions of ``lit`` for every row of split ``name`` (row order).

    ``head`` picks the encoder output: ``"clip"`` (contrastive head, used for retrieval) or
    ``"mse"`` (regression head, used to condition generation as in Benchetrit et al. 2023).
    """
    lit.eval()
    split = dm.splits[name]
    out = np.zeros((len(split), flat_targets(dm).shape[1]), np.float32)
    order = np.arange(len(split))
    for k in np.unique(split.subject):
        rows = order[split.subject == k]
        for start in range(0, len(rows), 256):
            idx = rows[start : start + 256]
            items = [dm.item(split, int(i)) for i in idx]
            batch = {key: torch.stack([torch.as_tensor(it[key]) for it in items])
                     for key in items[0]}
            out[idx] = lit(batch)[head].float().reshape(len(idx), -1).cpu().numpy()
    return out


def _subject_arrays(dm, k: int, targets: np.ndarray | None = None, *,
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
    return np.stack(fit_X), np.concatenate(fit_Y), np.stack([X[i] for i in rows]), rows


def window_ridge(dm, k: int, candidates: np.ndarray, true_index: np.ndarray, *,
                 fit_splits: tuple[str, ...] = ("train", "val"), eval_split: str = "test",
                 alphas=None, step: float = 0.05) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Ridge refitted on sliding 250 ms windows of subject ``k``'s ``fit_splits`` rows, scored
    on its ``eval_split`` rows; ``true_index`` has one entry per row of ``eval_split``.

    Returns the :func:`~.metrics.time_resolved_retrieval` result and the scored rows.
    """
    fit_X, fit_Y, eval_X, rows = _subject_arrays(dm, k, fit_splits=fit_splits,
                                                 eval_split=eval_split)
    kwargs = {} if alphas is None else {"alphas": tuple(alphas)}

    def fit_predict(a, b):
        return RidgeDecoder(**kwargs).fit(a, fit_Y).predict(b)

    params = dm.recipe["params"]
    res = time_resolved_retrieval(fit_predict, fit_X, eval_X, candidates,
                                  np.asarray(true_index)[rows], sfreq=params["sfreq"],
                                  tmin=params["tmin"], step=step)
    return res, rows


def ridge_predictions(dm, *, targets: np.ndarray | None = None, alphas=None) -> np.ndarray:
    """Per-subject ridge fitted on the train + val rows, predicting the test rows (row order).

    ``targets`` ``(n_stimuli, n_features)`` in the data module's stimulus order; default: the
    image embeddings (the retrieval baseline). Reconstruction passes thumbnails and caption
    embeddings (its low-level and caption pathways).
    """
    test = dm.splits["test"]
    Y = flat_targets(dm) if targets is None else np.asarray(targets, np.float32)
    pred = np.zeros((len(test), Y.shape[1]), np.float32)
    kwargs = {} if alphas is None else {"alphas": tuple(alphas)}
    for k in np.unique(test.subject):
        fit_X, fit_Y, test_X, rows = _subject_arrays(dm, int(k), Y)
        model = RidgeDecoder(**kwargs).fit(fit_X, fit_Y)
        pred[rows] = model.predict(test_X)
        logger.info("ridge sub-%s: alpha=%g (%s form)", dm.labels[k], model.alpha_,
                    model.solver_)
    return pred


def candidate_rows(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique test images (embedding rows) as candidates and each row's index among them."""
    uniq, index = np.unique(targets, return_inverse=True)
    return uniq, index


def evaluate(lit, dm, *, out_dir: str | Path, stim_root: str | Path | None = None,
             ridge: bool = True, time_resolved: bool = True,
             ridge_alphas=None, focus: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score encoder and baseline on the test split; write ``metrics.json`` and figures.

    ``stim_root`` (the stimulus folder) enables the retrieval-examples figure; ``focus`` (the
    MEG encoder's temporal focus) is shaded in the time-resolved figure.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    test = dm.splits["test"]
    targets = test.target
    cand_rows, true_idx = candidate_rows(targets)
    emb = flat_targets(dm)
    cand = emb[cand_rows]
    preds = {"encoder": predict_split(lit, dm, "test")}
    if ridge:
        preds["ridge"] = ridge_predictions(dm, alphas=ridge_alphas)
    retrieval = {name: _contract(retrieval_metrics(p, cand, true_idx)) for name, p in preds.items()}
    retrieval["chance"] = _contract(chance_metrics(len(cand)))
    all_images = {name: _contract(retrieval_metrics(p, emb, targets)) for name, p in preds.items()}
    all_images["chance"] = _contract(chance_metrics(len(emb)))
    per_subject = {}
    for k, label in enumerate(dm.labels):
        rows = test.subject == k
        if rows.any():
            per_subject[label] = {
                name: _contract(retrieval_metrics(p[rows], cand, true_idx[rows]))
                for name, p in preds.items()}
    spec = dm.embedder_spec
    metrics: dict[str, Any] = {
        "modality": dm.modality,
        "n_test": int(len(targets)),
        "n_test_images": int(len(cand)),
        "subjects": dm.labels,
        "embedder": spec.get("name"),
        "embedder_note": spec.get("substitute_note"),
        "retrieval": retrieval,
        "retrieval_all_images": all_images,
        "retrieval_per_subject": per_subject,
    }
    note = spec.get("substitute_note")
    if stim_root is not None and Path(stim_root).is_dir():
        paths = [Path(stim_root) / s for s in dm.embedding_index["stim_file"]]
        plot_retrieval_examples([paths[t] for t in targets], preds["encoder"], cand,
                                [paths[c] for c in cand_rows], true_idx,
                                path=out_dir / "retrieval_examples.png", n_examples=6,
                                title=f"{dm.modality.upper()} encoder: test image and top-5 "
                                "retrieved", note=note)
    if time_resolved and dm.modality == "meg":
        metrics["time_resolved"] = _time_resolved(dm, cand, cand_rows, true_idx, out_dir,
                                                  note=note, alphas=ridge_alphas,
                                                  encoder=preds["encoder"], focus=focus)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _log_table(metrics)
    return metrics


def _time_resolved(dm, cand, cand_rows, true_idx, out_dir, *, note, alphas, encoder,
                   focus=None) -> dict[str, Any]:
    """Ridge decoders refitted on sliding 250 ms windows (first subject with test data), beside
    the deep encoder's full-window score on the same subject."""
    k = int(dm.splits["test"].subject[0])
    res, rows = window_ridge(dm, k, cand, true_idx, alphas=alphas)
    chance = chance_metrics(len(cand))["top5"]
    deep = retrieval_metrics(encoder[rows], cand, true_idx[rows])["top5"]
    best = int(np.argmax(res["top5"]))
    plot_time_resolved(res["times"], {f"ridge on 250 ms windows, sub-{dm.labels[k]}":
                                      res["top5"]}, chance,
                       Path(out_dir) / "time_resolved.png", note=note,
                       levels={f"deep encoder, whole window, sub-{dm.labels[k]}": deep},
                       span=None if focus is None else (focus["tmin"], focus["tmax"]))
    return {"subject": dm.labels[k], "times": np.round(res["times"], 4).tolist(),
            "top5": np.round(res["top5"], 4).tolist(), "top1": np.round(res["top1"], 4).tolist(),
            "chance_top5": chance, "encoder_top5": round(float(deep), 4),
            "peak": {"time": round(float(res["times"][best]), 4),
                     "top5": round(float(res["top5"][best]), 4)}}


def _log_table(metrics: dict[str, Any]) -> None:
    r = metrics["retrieval"]
    logger.info("retrieval on %d test rows (%d images; %s):", metrics["n_test"],
                metrics["n_test_images"], metrics["embedder"])
    for name, m in r.items():
        logger.info("  %-8s top1 %.3f  top5 %.3f  median rank %.1f", name, m["top1"], m["top5"],
                    m["median_rank"])
