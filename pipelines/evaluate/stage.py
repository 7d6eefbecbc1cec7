"""``neurorecon evaluate bundle=<dir> data=... data.root=...``: score a trained decoder on a
dataset with the decoder's *fitted* statistics.

Every recording of the dataset goes through the bundle's
:class:`~neurorecon.pipelines.inference.Decoder` (its recipe, frozen MEG scaler, fMRI masks),
nothing is refitted on the evaluated data, and the test rows are ranked among the dataset's
test images by the encoder (``retrieval``) and among all candidate images
(``retrieval_all_images``). The ridge baseline is not refitted either: the bundle's own
training-run scores (encoder, ridge, chance) are reported beside, under ``bundle_metrics``.
A lab can so score a held-out session. ``evaluate checkpoint=<ckpt>`` exports the checkpoint
to ``<run dir>/bundle`` first (a thin alias).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger, progress
from neurorecon.models.retrieval import candidate_rows

from ..data.events import EventSpec, read_events
from ..inference import Decoder
from ..preprocess.store import average_repeats
from .figures import plot_retrieval_examples
from .report import retrieval_blocks
from .summary import write_report


def prepare_dataset(decoder: Decoder, data_cfg: DictConfig
                    ) -> tuple[dict[str, np.ndarray], dict[str, pd.DataFrame]]:
    """Every recording of ``data_cfg`` through the decoder: per-subject trials and tables
    (test repeats averaged when the recipe does)."""
    from ..data.studies import find_recordings
    from ..preprocess.run import data_selection

    root = Path(data_cfg.root)
    spec = EventSpec.from_config(data_cfg)
    if data_cfg.modality != decoder.modality:
        raise DataError(f"data does not fit the decoder: modality {data_cfg.modality!r}, the "
                        f"decoder is for {decoder.modality!r}", path=root)
    parts: dict[str, list[tuple[np.ndarray, pd.DataFrame]]] = {}
    if decoder.modality == "fmri" and data_cfg.get("fmri_input") == "betas":
        from ..preprocess.fmri import as_stim_file, find_betas, open_4d, read_trials

        for k, (img, trials_path, subject) in enumerate(progress(
                find_betas(root, data_cfg.betas_glob), desc="betas files")):
            _known(decoder, subject, img)
            n_vol = int(open_4d(img, what="betas image").shape[3])
            trials = as_stim_file(read_trials(trials_path, n_volumes=n_vol, image=img,
                                              bids_root=root, spec=spec), spec)
            trials = trials.assign(**{c: v for c, v in {"session": "n/a",
                                                        "run": f"file{k + 1}"}.items()
                                      if c not in trials})
            X = decoder.prepare_betas(img, trials, subject=subject)
            parts.setdefault(subject, []).append((X, trials))
    else:
        recordings = find_recordings(root, modality=decoder.modality,
                                     missing_runs=str(data_cfg.missing_runs),
                                     **data_selection(data_cfg))
        for rec in progress(recordings, desc=f"{decoder.modality.upper()} recordings"):
            _known(decoder, rec.subject, rec.fpath)
            X, events = decoder.prepare_recording(
                rec, read_events(rec.events_path, bids_root=root, spec=spec), spec)
            parts.setdefault(rec.subject, []).append(
                (X, events.assign(subject=rec.subject, session=rec.session or "n/a",
                                  run=rec.run or "n/a")))
    stim, average = decoder.stim_column(spec), decoder.average_test_repeats
    X_out, tables = {}, {}
    for subject, items in parts.items():
        X = np.concatenate([x for x, _ in items])
        trials = pd.concat([t for _, t in items], ignore_index=True)
        if average:
            X, trials = average_repeats(X, trials, stim_column=stim)
        X_out[subject], tables[subject] = X, trials.assign(stim_file=trials[stim].astype(str))
    if not X_out:
        raise DataError("no recordings found", path=root)
    return X_out, tables


@dataclass
class TestTrials:
    """A dataset's test trials as one list of rows (subjects in turn), each subject's
    prepared trials kept together for its decoder."""

    trials: dict[str, np.ndarray]  # subject label -> its prepared test trials
    rows: dict[str, np.ndarray]    # subject label -> the positions of those trials in the list
    stim_files: list[str]          # per row: the image shown
    subjects: list[str]            # per row: the subject label

    @classmethod
    def of_dataset(cls, X: dict[str, np.ndarray], tables: dict[str, pd.DataFrame], *,
                   root) -> TestTrials:
        """The test rows of :func:`prepare_dataset`'s output (subjects in sorted order)."""
        trials, rows, files, subjects = {}, {}, [], []
        for subject in sorted(X):
            test = (tables[subject]["split"] == "test").to_numpy()
            if test.any():
                trials[subject] = X[subject][test]
                rows[subject] = np.arange(len(files), len(files) + int(test.sum()))
                files += tables[subject]["stim_file"][test].astype(str).tolist()
                subjects += [subject] * int(test.sum())
        if not trials:
            raise DataError("the dataset has no test trials", path=root,
                            hint="check data.split_column / data.test_value")
        return cls(trials, rows, files, subjects)

    @classmethod
    def of_datamodule(cls, dm) -> TestTrials:
        """The test split of a training run's data module, in its own row order."""
        test = dm.splits["test"]
        trials, rows = {}, {}
        for k in np.unique(test.subject):
            idx, X = dm.subject_rows("test", int(k))
            trials[dm.labels[int(k)]] = np.asarray(X, np.float32)
            rows[dm.labels[int(k)]] = np.asarray(idx)
        files = dm.embedding_index["stim_file"].astype(str).to_numpy()[test.target].tolist()
        return cls(trials, rows, files, [dm.labels[int(k)] for k in test.subject])

    def encode(self, decoder: Decoder, *, head: str = "clip") -> np.ndarray:
        """Every row through ``decoder.encode`` (``head``), in row order."""
        out = None
        for subject, x in self.trials.items():
            pred = decoder.encode(x, subject=subject, head=head)
            if out is None:
                out = np.zeros((len(self.subjects), pred.shape[1]), np.float32)
            out[self.rows[subject]] = pred
        return out


def _known(decoder: Decoder, subject: str, path) -> None:
    if subject not in decoder.subjects:
        raise DataError(f"data does not fit the decoder: subject sub-{subject} is unknown to "
                        f"it (it knows {['sub-' + s for s in decoder.subjects]})", path=path,
                        hint="select known subjects with data.subjects=[...]")


def candidate_embeddings(decoder: Decoder, cfg: DictConfig, stim_files: list[str]
                         ) -> tuple[np.ndarray, list[str], str]:
    """Embeddings of the candidate images: the bundle's gallery when it holds every test
    image, else the dataset's stimuli embedded by the bundle's own embedder."""
    ids = decoder.gallery.index["image_id"].tolist()
    if set(stim_files) <= set(ids):
        return decoder.gallery.embeddings, ids, "the bundle's gallery"
    from ..embed.run import load_embeddings
    from ..embed.run import run as run_embed
    from ..export import localized

    job = OmegaConf.create(localized(decoder.config.provenance.config,
                                     OmegaConf.to_container(cfg.paths, resolve=True)))
    with open_dict(job):
        job.data, job.paths = cfg.data, cfg.paths
        job.embed = cfg.embed
    emb, index, spec = load_embeddings(run_embed(job)["cache"])
    if spec.get("weights") != decoder.config.embedder.weights:
        raise DataError(f"the embedder now gives other weights ({spec.get('weights')}) than "
                        f"the decoder was trained on ({decoder.config.embedder.weights})",
                        path=cfg.data.root, hint="embed with the decoder's embedder weights")
    return emb.reshape(len(emb), -1), index["stim_file"].tolist(), "embedded with the " \
        "decoder's embedder"


def evaluate_bundle(cfg: DictConfig, bundle: str | Path) -> dict[str, Any]:
    """Score ``bundle`` on ``cfg.data``; write metrics.json, report.md and figures."""
    decoder = Decoder.from_pretrained(bundle, device=str(cfg.get("device") or "cpu"))
    test = TestTrials.of_dataset(*prepare_dataset(decoder, cfg.data), root=cfg.data.root)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pred = test.encode(decoder)
    stim_files = test.stim_files
    emb, ids, source = candidate_embeddings(decoder, cfg, stim_files)
    row_of = {s: i for i, s in enumerate(ids)}
    targets = np.array([row_of[s] for s in stim_files])
    blocks = retrieval_blocks({"encoder": pred}, emb, targets, np.asarray(test.subjects))
    cand_rows, true_idx = candidate_rows(targets)
    cand = emb[cand_rows]
    stim_root = Path(cfg.data.root) / cfg.data.stim_dir
    note = decoder.config.embedder.substitute_note
    plot_retrieval_examples([stim_root / s for s in stim_files], pred, cand,
                            [stim_root / ids[c] if (stim_root / ids[c]).is_file() else
                             _thumbnail_file(decoder, ids[c]) for c in cand_rows], true_idx,
                            path=out_dir / "retrieval_examples.png", n_examples=6,
                            title=f"{decoder.modality.upper()} decoder (bundle): test image "
                            "and top-5 retrieved", note=note)
    metrics = {
        "modality": decoder.modality, "n_test": int(len(pred)),
        "n_test_images": int(len(cand)), "subjects": sorted(blocks["retrieval_per_subject"]),
        "embedder": decoder.config.embedder.name, "embedder_note": note,
        **blocks, "bundle": str(bundle),
        "candidates": source, "fitted_statistics": "the bundle's (nothing refitted)",
        "bundle_metrics": decoder.config.metrics.get("retrieval"),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    enc = blocks["retrieval"]["encoder"]
    logger.info("evaluate: encoder top1 %.3f top5 %.3f on %d test rows (%d images); metrics "
                "in %s, report %s", enc["top1"], enc["top5"],
                len(pred), len(cand), out_dir / "metrics.json", write_report(out_dir, metrics))
    return metrics


def _thumbnail_file(decoder: Decoder, image_id: str) -> Path:
    """Gallery thumbnail of ``image_id`` (candidates that are not in the dataset folder)."""
    row = decoder.gallery.index["image_id"].tolist().index(image_id)
    return decoder.gallery.root / decoder.gallery.index["thumbnail"].iloc[row]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Stage entry point (Hydra root config ``evaluate.yaml``)."""
    bundle, checkpoint = cfg.get("bundle"), cfg.get("checkpoint")
    if bool(bundle) == bool(checkpoint):
        raise DataError("give bundle=<bundle dir> (or checkpoint=<ckpt>, exported first)")
    if checkpoint:
        from ..export import data_of_checkpoint, export_bundle

        net, dm, job, _ = data_of_checkpoint(checkpoint, cfg)
        bundle = export_bundle(net, dm, cfg=job, out=Path(cfg.paths.output_dir) / "bundle",
                               generator=False, overwrite=True)["path"]
    metrics = evaluate_bundle(cfg, bundle)
    if checkpoint:
        metrics["checkpoint"] = str(checkpoint)
        (Path(cfg.paths.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
