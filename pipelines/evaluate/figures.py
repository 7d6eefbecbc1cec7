"""PNG figures of evaluation results: retrieval examples, time-resolved and adaptation curves.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly -- no
``pyplot``, so no global figure state and no backend switching in library code. Every function
takes an optional ``note`` printed under the title; pass the embedder's ``substitute_note``
there so a figure never passes a substitute embedder off as CLIP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from neurorecon.models.common.checks import check_file
from neurorecon.models.retrieval import retrieval_ranks, top_k

__all__ = ["plot_adaptation_curve", "plot_retrieval_examples", "plot_time_resolved"]

_CORRECT = "#1a9850"  # green outline: the true stimulus
_OTHER = "#bbbbbb"
_THUMB = 160  # px, longest side of each thumbnail


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _titles(fig: Figure, title: str | None, note: str | None) -> None:
    text = title or ""
    if note:
        text = f"{text}\n{note}" if text else note
    if text:
        fig.suptitle(text, fontsize=11)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _thumbnail(path: str | Path) -> np.ndarray:
    path = check_file(path, what="stimulus image")
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((_THUMB, _THUMB), Image.Resampling.BICUBIC)
        return np.asarray(im)


def _check_curves(
    x_name: str, x: np.ndarray, curves: Mapping[str, Sequence[float] | np.ndarray]
) -> dict[str, np.ndarray]:
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{x_name} must be a non-empty 1-D array, got shape {x.shape}")
    if not curves:
        raise ValueError("curves is empty: pass {name: values} with at least one curve")
    out = {}
    for name, values in curves.items():
        values = np.asarray(values, dtype=float)
        if values.shape != x.shape:
            raise ValueError(
                f"curve {name!r} has shape {values.shape} but {x_name} has shape {x.shape}"
            )
        out[str(name)] = values
    return out


def plot_retrieval_examples(
    stimulus_paths: Sequence[str | Path],
    pred: np.ndarray,
    candidates: np.ndarray,
    candidate_paths: Sequence[str | Path],
    true_index: Sequence[int] | np.ndarray,
    *,
    path: str | Path,
    n_examples: int = 6,
    k: int = 5,
    indices: Sequence[int] | None = None,
    title: str | None = "Retrieval examples",
    note: str | None = None,
) -> Path:
    """Grid of test stimuli and the top-k candidates retrieved from their predictions.

    Each row shows the stimulus, then the ``k`` candidates most cosine-similar to its predicted
    embedding, labelled with rank and score; the true stimulus is outlined green. When the true
    stimulus is not among the top ``k``, the row says at which rank it was found.

    Parameters
    ----------
    stimulus_paths : sequence of path, length n
        Image file shown for each prediction.
    pred : array, shape (n, emb_dim)
        Predicted embeddings.
    candidates : array, shape (n_candidates, emb_dim)
        Candidate embeddings.
    candidate_paths : sequence of path, length n_candidates
        Image file of each candidate.
    true_index : array of int, shape (n,)
        Row of ``candidates`` holding each prediction's target.
    path : path
        Output PNG file (parent folders are created).
    n_examples : int
        Number of rows; rows are spread evenly over the predictions (not cherry-picked)
        unless ``indices`` is given.
    k : int
        Candidates shown per row.
    indices : sequence of int, optional
        Which predictions to show (overrides ``n_examples``).
    title : str | None
        Figure title.
    note : str | None
        Second title line, e.g. the embedder's substitute note.

    Returns
    -------
    path : Path
        The PNG written.
    """
    pred = np.asarray(pred)
    candidates = np.asarray(candidates)
    n = len(stimulus_paths)
    if pred.ndim != 2 or pred.shape[0] != n:
        raise ValueError(
            f"pred must have shape (n, emb_dim) with n={n} (len(stimulus_paths)), "
            f"got {pred.shape}"
        )
    if candidates.ndim != 2 or candidates.shape[0] != len(candidate_paths):
        raise ValueError(
            f"candidates must have one row per candidate path ({len(candidate_paths)}), "
            f"got shape {candidates.shape}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # validates shapes, dims, NaNs and true_index (clear ValueErrors)
    ranks = retrieval_ranks(pred, candidates, true_index)
    true_index = np.asarray(true_index)
    if indices is None:
        if n_examples < 1:
            raise ValueError(f"n_examples must be >= 1, got {n_examples}")
        rows = np.unique(np.linspace(0, n - 1, min(n_examples, n)).round().astype(int))
    else:
        rows = np.asarray(indices, dtype=int)
        if rows.ndim != 1 or rows.size == 0 or rows.min() < 0 or rows.max() >= n:
            raise ValueError(f"indices must be a non-empty list of values in [0, {n - 1}]")
    top, scores = top_k(pred[rows], candidates, k)
    k = top.shape[1]

    fig = _new_figure((1.9 * (k + 1), 2.05 * len(rows) + 0.8))
    axes = fig.subplots(len(rows), k + 1, squeeze=False)
    for r, i in enumerate(rows):
        ax = axes[r, 0]
        ax.imshow(_thumbnail(stimulus_paths[i]))
        stem = Path(stimulus_paths[i]).stem
        label = f"{stem[:20]}{'…' if len(stem) > 20 else ''}  (test #{i})"
        if ranks[i] > k:
            label += f"\n(true rank {ranks[i]})"
        ax.set_title(label, fontsize=8)
        for c, j in enumerate(top[r]):
            ax = axes[r, c + 1]
            ax.imshow(_thumbnail(candidate_paths[j]))
            correct = j == true_index[i]
            ax.set_title(
                f"#{c + 1}  cos={scores[r, c]:.3f}",
                fontsize=8,
                color=_CORRECT if correct else "black",
                fontweight="bold" if correct else "normal",
            )
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_edgecolor(_CORRECT if correct else _OTHER)
                spine.set_linewidth(5 if correct else 0.8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    _titles(fig, title, note)
    fig.tight_layout()
    return _save(fig, path)


def plot_time_resolved(
    times: Sequence[float] | np.ndarray,
    curves: Mapping[str, Sequence[float] | np.ndarray],
    chance: float | None,
    path: str | Path,
    *,
    ylabel: str = "top-5 accuracy",
    title: str | None = "Time-resolved retrieval (sliding windows)",
    note: str | None = None,
    levels: Mapping[str, float] | None = None,
    span: tuple[float, float] | None = None,
    own_times: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> Path:
    """Retrieval score against time (window centre), one line per decoder, chance dashed.

    ``own_times`` adds curves sampled at their own window centres, ``{name: (times, values)}``
    (e.g. deep encoders trained on coarser steps).

    ``levels`` adds horizontal lines for whole-window decoders (e.g. the deep encoder's
    full-window score, for comparison at a glance); ``span`` shades a time range (e.g. the
    encoder's temporal focus).

    Parameters
    ----------
    times : array, shape (n_windows,)
        Window centres in s relative to stimulus onset.
    curves : dict of str to array, each shape (n_windows,)
        Scores per decoder, e.g. ``{"encoder": ..., "ridge": ...}``.
    chance : float | None
        Chance level of the score (horizontal dashed line); None draws none.
    path : path
        Output PNG file.
    ylabel : str
        Name of the score.
    title, note : str | None
        Title and second title line (e.g. the embedder's substitute note).

    Returns
    -------
    path : Path
        The PNG written.
    """
    times = np.asarray(times, dtype=float)
    curves = _check_curves("times", times, curves)
    fig = _new_figure((7.0, 4.2))
    ax = fig.subplots()
    for name, values in curves.items():
        ax.plot(times, values, marker="o", markersize=3, linewidth=1.8, label=name)
    for name, (t, values) in (own_times or {}).items():
        ax.plot(t, values, marker="s", markersize=4, linewidth=2.2, label=name)
    if chance is not None:
        ax.axhline(
            chance, color="gray", linestyle="--", linewidth=1, label=f"chance ({chance:.3g})"
        )
    for (name, level), color in zip((levels or {}).items(), ("C3", "C4", "C5", "C6"),
                                    strict=False):
        ax.axhline(level, color=color, linewidth=2.0, label=f"{name} ({level:.3f})")
    if span is not None:
        ax.axvspan(*span, color="C3", alpha=0.08, label="encoder's temporal focus")
    if times.min() <= 0 <= times.max():
        ax.axvline(0, color="black", linewidth=0.8, alpha=0.6)
    ax.set_xlabel("time of window centre (s, 0 = stimulus onset)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=9)
    _titles(fig, title, note)
    fig.tight_layout()
    return _save(fig, path)


def plot_adaptation_curve(
    fractions: Sequence[float] | np.ndarray,
    curves: Mapping[str, Sequence[float] | np.ndarray],
    chance: float | None,
    path: str | Path,
    *,
    ylabel: str = "top-5 accuracy",
    title: str | None = "New-subject adaptation",
    note: str | None = None,
    spread: Mapping[str, Sequence[float] | np.ndarray] | None = None,
    selections: Sequence[str] = (),
) -> Path:
    """Retrieval score against the fraction of a new subject's training trials used.

    Parameters
    ----------
    fractions : array, shape (n_points,)
        Fractions in ``(0, 1]`` of the subject's training trials (e.g. 0.1, 0.25, 1.0).
    curves : dict of str to array, each shape (n_points,)
        Scores per setting, e.g. ``{"adapter (frozen shared)": ..., "from scratch": ...}``.
    chance : float | None
        Chance level (horizontal dashed line); None draws none.
    path : path
        Output PNG file.
    ylabel : str
        Name of the score.
    title, note : str | None
        Title and second title line (e.g. the embedder's substitute note).
    spread : dict of str to array, optional
        A band of ± this around each curve (e.g. the sd over seeds).
    selections : sequence of str
        Curves that pick among the others (e.g. the best on validation): drawn dashed with
        open markers, so the curve they coincide with stays visible beneath.

    Returns
    -------
    path : Path
        The PNG written.
    """
    fractions = np.asarray(fractions, dtype=float)
    curves = _check_curves("fractions", fractions, curves)
    spread = _check_curves("fractions", fractions, spread) if spread else {}
    if np.any((fractions <= 0) | (fractions > 1)):
        raise ValueError(f"fractions must lie in (0, 1], got {fractions.tolist()}")
    order = np.argsort(fractions)
    fig = _new_figure((6.0, 4.2))
    ax = fig.subplots()
    for name, values in curves.items():
        picks = name in selections
        line, = ax.plot(fractions[order], values[order], marker="o", linewidth=1.8, label=name,
                        linestyle="--" if picks else "-", markersize=9 if picks else 6,
                        markerfacecolor="none" if picks else None, zorder=3 if picks else 2)
        if name in spread:
            ax.fill_between(fractions[order], (values - spread[name])[order],
                            (values + spread[name])[order], color=line.get_color(), alpha=0.15)
    if chance is not None:
        ax.axhline(
            chance, color="gray", linestyle="--", linewidth=1, label=f"chance ({chance:.3g})"
        )
    ax.set_xscale("log")
    ax.set_xticks(np.unique(fractions))
    ax.set_xticklabels([f"{100 * f:g}%" for f in np.unique(fractions)])
    ax.minorticks_off()
    ax.set_xlabel("fraction of the new subject's training trials")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=9)
    _titles(fig, title, note)
    fig.tight_layout()
    return _save(fig, path)
