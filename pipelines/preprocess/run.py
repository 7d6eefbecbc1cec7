"""``neurorecon preprocess``: BIDS recordings -> keyed cache of per-subject trial arrays."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from neurorecon.models.common.logging import logger

from ..common.cache import CacheEntry, cache_entry
from ..data.events import EventSpec
from ..data.studies import find_recordings, missing_recordings
from .store import Preprocessed, RowFile, load_preprocessed, save_preprocessed, subject_dir


def data_selection(data_cfg: DictConfig) -> dict[str, Any]:
    return {k: OmegaConf.to_container(data_cfg[k]) if OmegaConf.is_config(data_cfg[k])
            else data_cfg[k] for k in ("subjects", "sessions", "tasks")}


def skipped_runs(data_cfg: DictConfig) -> list[str]:
    """The runs of ``data_cfg``'s dataset left out for a missing recording
    (``data.missing_runs=warn``): their recordings' expected paths, relative to the root
    (none for precomputed betas, which have no runs)."""
    if data_cfg.modality == "fmri" and data_cfg.fmri_input == "betas":
        return []
    root = Path(data_cfg.root)
    return [p.relative_to(root).as_posix() for p in missing_recordings(
        root, modality=data_cfg.modality, **data_selection(data_cfg))]


def artifact_projectors(recipe: dict) -> dict[str, dict[str, int]]:
    """Per subject of a MEG recipe whose recordings have EOG/ECG channels: the blinks
    (``eog``) and heartbeats (``ecg``) found and the number of projectors made from them
    (``metrics.json`` ``data.artifacts``)."""
    return {label: {**sub["ssp_events"], "projectors": len(sub["ssp"])}
            for label, sub in recipe.get("subjects", {}).items() if sub.get("ssp_events")}


def hrf_delays(recipe: dict) -> dict[str, dict[str, Any]]:
    """Per subject of an fMRI recipe: the HRF delay (s) its betas were estimated with and,
    with ``hrf_onset: auto``, each delay's share of the variance the mean evoked response
    explains (``metrics.json`` ``data.hrf_delay``)."""
    return {label: {"hrf_onset": sub["hrf_onset"],
                    **({"explained": sub["hrf_onset_r2"]} if "hrf_onset_r2" in sub else {})}
            for label, sub in recipe.get("subjects", {}).items() if "hrf_onset" in sub}


def preprocess_data(data_cfg: DictConfig, pre_cfg: DictConfig, *, cache_dir: str | Path,
                    verbose: bool | str | None = None) -> tuple[CacheEntry, bool]:
    """Preprocess the dataset of ``data_cfg`` with the recipe ``pre_cfg`` (cached).

    Returns the cache entry and whether it was reused. The key covers the recipe, the
    events contract, the subject/session/task selection and every input file, not the
    workers (``pre_cfg.n_jobs``, ``executor``, ``ray_address``), which do not change it.
    """
    root = Path(data_cfg.root)
    modality = data_cfg.modality
    spec = EventSpec.from_config(data_cfg)
    params = OmegaConf.to_container(pre_cfg[modality], resolve=True)
    workers = {"n_jobs": int(pre_cfg.get("n_jobs", 1)),
               "executor": str(pre_cfg.get("executor", "joblib")),
               "address": pre_cfg.get("ray_address")}
    if modality == "fmri" and data_cfg.fmri_input == "betas":
        from .fmri import find_betas, load_betas

        found = find_betas(root, data_cfg.betas_glob)
        inputs = [p for item in found for p in item[:2]]
        compute = lambda out: load_betas(found, bids_root=root, spec=spec,  # noqa: E731
                                         params=params, out=out, verbose=verbose, **workers)
    else:
        # (older configs saved with checkpoints lack data.missing_runs)
        recordings = find_recordings(root, modality=modality,
                                     missing_runs=str(data_cfg.get("missing_runs", "error")),
                                     **data_selection(data_cfg))
        inputs = [r.fpath for r in recordings] + [r.events_path for r in recordings]
        if modality == "meg":
            from .meg import MegParams, preprocess_meg

            compute = lambda out: preprocess_meg(  # noqa: E731
                recordings, bids_root=root, spec=spec, params=MegParams.from_mapping(params),
                out=out, verbose=verbose, **workers)
        else:
            from .fmri import preprocess_fmri

            compute = lambda out: preprocess_fmri(  # noqa: E731
                recordings, bids_root=root, spec=spec, params=params, out=out,
                verbose=verbose, **workers)
    key_params = {"modality": modality, "recipe": params, "events": spec.__dict__,
                  "selection": data_selection(data_cfg), "fmri_input": data_cfg.get("fmri_input"),
                  "root": str(root.resolve())}
    entry = cache_entry(cache_dir, "preproc", f"{root.name}-{modality}", key_params, inputs=inputs)
    if entry.exists():
        logger.info("preprocess: reusing cache %s", entry.path)
        return entry, True
    with entry.writing(key_params, inputs=inputs) as tmp:
        save_preprocessed(compute(tmp), tmp)
    return entry, False


def plot_preprocessed(data: Preprocessed, path: str | Path) -> Path:
    """Save a PNG overview: MEG evoked power over time + sensor layout, or fMRI trial maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subjects = list(data.subjects.values())
    fig, axes = plt.subplots(len(subjects), 2, figsize=(11, 3.4 * len(subjects)), squeeze=False)
    brain_maps = []  # (axes, image) of the fMRI spread maps, drawn after the layout
    for ax_row, sub in zip(axes, subjects, strict=True):
        X = RowFile(subject_dir(data.path, sub.subject) / "X.npy") if data.path else sub.X
        test = (sub.trials["split"] == "test").to_numpy()
        if data.modality == "meg":
            p = data.recipe["params"]
            times = p["tmin"] + np.arange(X.shape[-1]) / p["sfreq"]
            for split, color in (("train", "tab:blue"), ("test", "tab:orange")):
                sel = np.flatnonzero((sub.trials["split"] == split).to_numpy())
                if len(sel):  # mean epoch, read in blocks (the cache may not fit in memory)
                    total = sum(b.sum(axis=0, dtype=np.float64) for _, b in _blocks(X, sel))
                    gfp = (total / len(sel)).std(axis=0)
                    ax_row[0].plot(times, gfp, color=color, label=f"{split} (n={len(sel)})")
            ax_row[0].axvline(0, color="k", lw=0.5)
            ax_row[0].set(xlabel="time from image onset (s)", ylabel="GFP of mean epoch (a.u.)",
                          title=f"sub-{sub.subject}: evoked response after preprocessing")
            ax_row[0].legend(fontsize=8)
            ch = sub.channels
            ax_row[1].scatter(ch["x"], ch["y"], c=np.where(ch["good"], "tab:green", "tab:red"),
                              s=12)
            ax_row[1].set(title=f"sensor layout ({(~ch['good']).sum()} bad in red)",
                          aspect="equal", xticks=[], yticks=[])
        else:
            ax_row[0].imshow(X[np.argsort(~test, kind="stable")[:60]], aspect="auto",
                             cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest")
            ax_row[0].set(xlabel="voxel", ylabel="trial (test first)",
                          title=f"sub-{sub.subject}: single-trial betas ({X.shape[1]} voxels)")
            from nilearn import masking

            # across-stimulus spread of the (averaged) test betas: where stimuli are encoded
            spread = masking.unmask(X[np.flatnonzero(test)].std(0) if test.sum() > 1
                                    else np.asarray(X).std(0), sub.mask_img)
            rel = data.recipe.get("subjects", {}).get(sub.subject, {}).get("split_half", {})
            title = "spread of test betas across stimuli"
            if isinstance(rel, dict) and rel.get("identification") is not None:
                title += (f"\nsplit-half identification {rel['identification']:.2f} "
                          f"(chance {rel['chance']:.2f})")
            ax_row[1].set_axis_off()  # nilearn draws its slices inside this box
            ax_row[1].set_title(title, fontsize=9)
            brain_maps.append((ax_row[1], spread))
    # lay out the plain axes first, then let nilearn fill the boxes it is given: its slice and
    # colorbar axes are placed by hand, which tight_layout cannot arrange
    fig.tight_layout()
    if brain_maps:
        from nilearn import plotting

        for ax, img in brain_maps:
            plotting.plot_stat_map(img, display_mode="z", cut_coords=4, axes=ax,
                                   colorbar=True, annotate=False, draw_cross=False)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _blocks(X, rows: np.ndarray):
    """Blocks of ``X[rows]``: read from a :class:`RowFile`, or sliced from an array."""
    if isinstance(X, RowFile):
        yield from X.blocks(rows)
    else:
        yield rows, np.asarray(X[rows])


def run(cfg: DictConfig) -> Path:
    """Stage entry point (Hydra root config ``preprocess.yaml``)."""
    t0 = time.perf_counter()
    entry, reused = preprocess_data(cfg.data, cfg.preprocess, cache_dir=cfg.paths.cache_dir)
    seconds = time.perf_counter() - t0
    data = load_preprocessed(entry.path)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "modality": data.modality,
        "cache": str(entry.path),
        "key": entry.key,
        "reused_cache": reused,
        "seconds": round(seconds, 2),
        "subjects": {s: {"shape": list(d.X.shape),
                         "n_train": int((d.trials["split"] == "train").sum()),
                         "n_test": int((d.trials["split"] == "test").sum())}
                     for s, d in data.subjects.items()},
    }
    (out / "preprocess_summary.json").write_text(json.dumps(summary, indent=2))
    fig = plot_preprocessed(data, out / f"preprocess_{data.modality}.png")
    logger.info("preprocess: %s in %.1f s (%s); figure %s", entry.path,
                seconds, "cache reused" if reused else "computed", fig)
    return entry.path
