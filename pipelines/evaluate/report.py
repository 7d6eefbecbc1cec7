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

from neurorecon.models.common.logging import logger
from neurorecon.models.retrieval import candidate_rows, chance_metrics, retrieval_metrics

from ..inference import predict_split
from ..train.ridge import flat_targets, ridge_predictions, window_ridge
from .figures import plot_retrieval_examples, plot_time_resolved

CONTRACT_KEYS = ("top1", "top5", "median_rank", "rel_median_rank")


def _contract(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in (*CONTRACT_KEYS, "n_candidates") if k in m}


def retrieval_blocks(preds: dict[str, np.ndarray], embeddings: np.ndarray,
                     targets: np.ndarray, subjects: np.ndarray) -> dict[str, Any]:
    """The ``retrieval``, ``retrieval_all_images`` and ``retrieval_per_subject`` blocks.

    ``preds`` maps a decoder name to its ``(n_rows, dim)`` predictions; row ``i`` shows image
    ``targets[i]`` (a row of ``embeddings``, every candidate image) to subject
    ``subjects[i]``. ``retrieval`` ranks among the images of the rows, ``retrieval_all_images``
    among all of ``embeddings``; chance beside both.
    """
    cand_rows, true_idx = candidate_rows(targets)
    cand = embeddings[cand_rows]
    retrieval = {name: _contract(retrieval_metrics(p, cand, true_idx)) for name, p in preds.items()}
    retrieval["chance"] = _contract(chance_metrics(len(cand)))
    all_images = {name: _contract(retrieval_metrics(p, embeddings, targets))
                  for name, p in preds.items()}
    all_images["chance"] = _contract(chance_metrics(len(embeddings)))
    per_subject = {}
    for label in dict.fromkeys(np.asarray(subjects).tolist()):
        rows = np.asarray(subjects) == label
        per_subject[str(label)] = {
            name: _contract(retrieval_metrics(p[rows], cand, true_idx[rows]))
            for name, p in preds.items()}
    return {"retrieval": retrieval, "retrieval_all_images": all_images,
            "retrieval_per_subject": per_subject}


def readout_parts(net, dm) -> dict[str, np.ndarray]:
    """For an encoder with a linear read-out, the test predictions of its two parts alone:
    ``deep`` (mix 1) and ``linear_readout`` (mix 0); empty otherwise."""
    if not getattr(net, "readout_bins", None):
        return {}
    mix = net.readout_mix.clone()
    out = {}
    try:
        for name, value in (("deep", 1.0), ("linear_readout", 0.0)):
            net.set_readout_mix(value)
            out[name] = predict_split(net, dm, "test")
    finally:
        net.set_readout_mix(mix)
    return out


def evaluate(net, dm, *, out_dir: str | Path, stim_root: str | Path | None = None,
             ridge: bool = True, time_resolved: bool = True,
             ridge_alphas=None, focus: dict[str, Any] | None = None,
             deep_curve: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score encoder and baseline on the test split; write ``metrics.json`` and figures.

    ``stim_root`` (the stimulus folder) enables the retrieval-examples figure; ``focus`` (the
    MEG encoder's temporal focus) is shaded in the time-resolved figure, where ``deep_curve``
    (:func:`~neurorecon.pipelines.train.time_resolved.deep_time_resolved`) is drawn beside
    the ridge curve.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    test = dm.splits["test"]
    targets = test.target
    cand_rows, true_idx = candidate_rows(targets)
    emb = flat_targets(dm)
    cand = emb[cand_rows]
    preds = {"encoder": predict_split(net, dm, "test")}
    preds.update(readout_parts(net, dm))
    if ridge:
        preds["ridge"] = ridge_predictions(dm, alphas=ridge_alphas)
    blocks = retrieval_blocks(preds, emb, targets, np.asarray(dm.labels)[test.subject])
    spec = dm.embedder_spec
    metrics: dict[str, Any] = {
        "modality": dm.modality,
        "n_test": int(len(targets)),
        "n_test_images": int(len(cand)),
        "subjects": dm.labels,
        "embedder": spec.get("name"),
        "embedder_note": spec.get("substitute_note"),
        **blocks,
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
                                                  encoder=preds["encoder"], focus=focus,
                                                  deep_curve=deep_curve)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _log_table(metrics)
    return metrics


def _time_resolved(dm, cand, cand_rows, true_idx, out_dir, *, note, alphas, encoder,
                   focus=None, deep_curve=None) -> dict[str, Any]:
    """Ridge decoders refitted on sliding 250 ms windows of every subject with test data,
    pooled over the test rows of all subjects (as the encoder's score is), beside the
    encoder's score on the same rows; each subject's curve is kept too."""
    test = dm.splits["test"]
    per_subject, n_rows, times = {}, {}, None
    for k in np.unique(test.subject):
        res, rows = window_ridge(dm, int(k), cand, true_idx, alphas=alphas)
        per_subject[dm.labels[int(k)]] = res
        n_rows[dm.labels[int(k)]] = len(rows)
        times = res["times"]
    weights = np.array(list(n_rows.values()), float) / sum(n_rows.values())
    pooled = {key: sum(w * r[key] for w, r in zip(weights, per_subject.values(), strict=True))
              for key in ("top1", "top5")}
    chance = chance_metrics(len(cand))["top5"]
    enc = retrieval_metrics(encoder, cand, true_idx)["top5"]
    best = int(np.argmax(pooled["top5"]))
    curves = {f"ridge on 250 ms windows, {len(per_subject)} subject(s)": pooled["top5"]}
    if len(per_subject) > 1:
        curves.update({f"  sub-{lab}": r["top5"] for lab, r in per_subject.items()})
    own = ({"deep encoder trained on each 250 ms window": (deep_curve["times"],
                                                            deep_curve["top5"])}
           if deep_curve is not None else None)
    plot_time_resolved(times, curves, chance, Path(out_dir) / "time_resolved.png", note=note,
                       own_times=own,
                       levels={"encoder": enc},
                       span=None if focus is None else (focus["tmin"], focus["tmax"]))
    return {"subjects": list(per_subject), "times": np.round(times, 4).tolist(),
            "top5": np.round(pooled["top5"], 4).tolist(),
            "top1": np.round(pooled["top1"], 4).tolist(),
            "per_subject_top5": {lab: np.round(r["top5"], 4).tolist()
                                 for lab, r in per_subject.items()},
            **({"deep": deep_curve} if deep_curve is not None else {}),
            "chance_top5": chance, "encoder_top5": round(float(enc), 4),
            "peak": {"time": round(float(times[best]), 4),
                     "top5": round(float(pooled["top5"][best]), 4)}}


def _log_table(metrics: dict[str, Any]) -> None:
    r = metrics["retrieval"]
    logger.info("retrieval on %d test rows (%d images; %s):", metrics["n_test"],
                metrics["n_test_images"], metrics["embedder"])
    for name, m in r.items():
        logger.info("  %-8s top1 %.3f  top5 %.3f  median rank %.1f", name, m["top1"], m["top5"],
                    m["median_rank"])
