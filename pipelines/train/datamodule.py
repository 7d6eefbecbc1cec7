"""Join preprocessed brain trials with stimulus embeddings for Lightning.

Every trial of the preprocessing cache is matched by ``stim_file`` to a row of the embeddings
cache. Splits: the test set is the events' test split (repeats averaged upstream); a
validation set is carved out of the *train stimuli* (whole stimuli, seeded), so no image is
both trained on and used to pick checkpoints. Batches hold one subject each, so subjects may
differ in channel sets (MEG) or voxel counts (fMRI).

Memory: trials are read from the cache's ``X.npy`` files a row (or a batch of rows) at a time
(:class:`~neurorecon.pipelines.preprocess.store.RowFile`), so the process holds the
embeddings and per-trial indices, not the trials; the page cache keeps the hot data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from neurorecon.models.common.checks import DataError

from ..embed.run import load_embeddings
from ..preprocess.store import Preprocessed, RowFile, load_preprocessed, subject_dir
from .subjects import SUBJECT_INFO, SubjectInfo


@dataclass
class Split:
    """Rows of one split: per-row subject index, trial row within that subject, target row."""

    subject: np.ndarray
    row: np.ndarray
    target: np.ndarray
    stim_file: np.ndarray
    trials: pd.DataFrame = field(repr=False)

    def __len__(self) -> int:
        return len(self.row)


def _take(split: Split, idx: np.ndarray) -> Split:
    """The rows ``idx`` of ``split``."""
    return Split(subject=split.subject[idx], row=split.row[idx], target=split.target[idx],
                 stim_file=split.stim_file[idx],
                 trials=split.trials.iloc[idx].reset_index(drop=True))


class _TrialDataset(Dataset):
    def __init__(self, dm: BrainDataModule, split: Split):
        self.dm, self.split = dm, split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.dm.item(self.split, i)


@dataclass
class RowBlocks:
    """Rows of a cache file, re-read in blocks on every call (``len`` = number of rows)."""

    file: RowFile
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.file.row_shape)

    def __call__(self):
        for _, block in self.file.blocks(self.rows):
            yield block
            del block  # not held while the next block is read


class SubjectBatchSampler(Sampler[list[int]]):
    """Batches that each hold the trials of a single subject (shuffled per epoch if asked).

    Under distributed training each process takes every ``world_size``-th batch (the list is
    padded by repetition to a multiple of ``world_size``, so all processes step equally);
    the Trainer is configured with ``use_distributed_sampler=False`` accordingly.
    """

    def __init__(self, subjects: np.ndarray, *, batch_size: int, shuffle: bool, seed: int,
                 drop_last: bool = False):
        self.subjects, self.batch_size = np.asarray(subjects), batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for s in np.unique(self.subjects):
            idx = np.flatnonzero(self.subjects == s)
            if self.shuffle:
                idx = rng.permutation(idx)
            for k in range(0, len(idx), self.batch_size):
                b = idx[k : k + self.batch_size]
                if len(b) < self.batch_size and self.drop_last and len(idx) > self.batch_size:
                    continue
                batches.append(b.tolist())
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    @staticmethod
    def _world() -> tuple[int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _shard(self, batches: list[list[int]]) -> list[list[int]]:
        rank, world = self._world()
        if world == 1:
            return batches
        n = -(-len(batches) // world) * world
        padded = [batches[i % len(batches)] for i in range(n)]
        return padded[rank::world]

    def __iter__(self):
        batches = self._shard(self._batches())
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return len(self._shard(self._batches()))


class BrainDataModule(LightningDataModule):
    """Brain trials (preprocessing cache) paired with image embeddings (embeddings cache).

    Parameters
    ----------
    preproc_dir, embeddings_dir : path
        Cache entries written by ``neurorecon preprocess`` and ``neurorecon embed``.
    batch_size : int
        Trials per batch (one subject per batch).
    val_fraction : float
        Fraction of the train *stimuli* held out for validation (early stopping).
    seed : int
        Seed of the validation split and of batch shuffling.
    subjects : list of str | None
        Subjects to use (all if None).
    fit_subjects : list of str | None
        Keep only these subjects' trials in every split (subject indices still follow
        ``subjects``): a new subject's adapter is trained inside a multi-subject model.
    train_fraction : dict | None
        ``{subject: fraction}`` keeps only a seeded fraction of that subject's train trials
        (new-subject adaptation curves).
    num_workers : int
        DataLoader workers.
    shuffle_targets : bool
        Permutation control: the train and validation stimuli are paired with the embeddings
        of other train stimuli (one seeded permutation, the same for every subject); test
        rows keep their true images, so a decoder trained this way must score at chance.
    """

    def __init__(self, *, preproc_dir: str | Path, embeddings_dir: str | Path,
                 batch_size: int = 64, val_fraction: float = 0.1, seed: int = 0,
                 subjects: list[str] | None = None, fit_subjects: list[str] | None = None,
                 train_fraction: dict[str, float] | None = None, num_workers: int = 0,
                 shuffle_targets: bool = False):
        super().__init__()
        self.preproc_dir, self.embeddings_dir = Path(preproc_dir), Path(embeddings_dir)
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed
        self.subject_filter = None if subjects is None else [str(s) for s in subjects]
        self.fit_subjects = None if fit_subjects is None else [str(s) for s in fit_subjects]
        self.train_fraction = dict(train_fraction or {})
        self.num_workers = num_workers
        self.shuffle_targets = bool(shuffle_targets)
        self.data: Preprocessed | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        data = load_preprocessed(self.preproc_dir)  # tables; X stays on disk
        emb, index, spec = load_embeddings(self.embeddings_dir)
        self.embeddings = torch.as_tensor(np.asarray(emb, dtype=np.float32))
        self.embedding_index = index
        self.embedder_spec = spec
        row_of = {s: i for i, s in enumerate(index["stim_file"])}
        labels = sorted(data.subjects) if self.subject_filter is None else self.subject_filter
        unknown = [s for s in labels if s not in data.subjects]
        if unknown:
            raise DataError(f"unknown subject(s) {unknown}; the cache has {sorted(data.subjects)}",
                            path=self.preproc_dir)
        self.modality = data.modality
        self.recipe = data.recipe
        self.subjects: dict[str, SubjectInfo] = {}
        self._X: list[RowFile] = []
        parts = {"train": [], "val": [], "test": []}
        val_stims = self._val_stimuli(data, labels)
        for k, label in enumerate(labels):
            sub = data.subjects[label]
            self.subjects[label] = SUBJECT_INFO[self.modality].from_data(label, k, sub)
            self._X.append(RowFile(subject_dir(self.preproc_dir, label) / "X.npy"))
            trials = sub.trials.reset_index(drop=True)
            missing = sorted(set(trials["stim_file"]) - set(row_of))
            if missing:
                raise DataError(
                    f"{len(missing)} stimuli of sub-{label} have no embedding (e.g. {missing[0]})",
                    path=self.embeddings_dir,
                    hint="embed the same dataset (embed.images=events) before training")
            target = trials["stim_file"].map(row_of).to_numpy().copy()
            split = trials["split"].to_numpy().copy()
            split[(split == "train") & trials["stim_file"].isin(val_stims).to_numpy()] = "val"
            if self.shuffle_targets:
                fit = split != "test"
                target[fit] = self._permutation(data, labels, row_of)[target[fit]]
            keep = self._fraction_mask(label, split)
            if self.fit_subjects is not None and label not in self.fit_subjects:
                keep[:] = False
            for name in parts:
                sel = np.flatnonzero((split == name) & keep)
                parts[name].append((k, sel, target[sel], trials.iloc[sel]))
        self.splits = {name: self._merge(p) for name, p in parts.items()}
        for name in ("train", "test"):
            if len(self.splits[name]) == 0:
                raise DataError(f"the {name} split is empty", path=self.preproc_dir,
                                hint="check data.split_column / data.test_value")
        self.emb_dim = int(self.embeddings.shape[-1])
        # token-level targets (e.g. CLIP tokens): (n_images, n_tokens, emb_dim)
        self.n_tokens = int(self.embeddings.shape[1]) if self.embeddings.ndim == 3 else None
        self.data = data

    def _val_stimuli(self, data: Preprocessed, labels: list[str]) -> set[str]:
        stims = sorted({s for lab in labels for s, sp in zip(
            data.subjects[lab].trials["stim_file"], data.subjects[lab].trials["split"],
            strict=True) if sp == "train"})
        n_val = int(round(self.val_fraction * len(stims)))
        if self.val_fraction > 0 and n_val == 0 and len(stims) > 1:
            n_val = 1
        rng = np.random.default_rng(self.seed)
        return set(rng.choice(stims, size=n_val, replace=False)) if n_val else set()

    def _permutation(self, data: Preprocessed, labels: list[str],
                     row_of: dict[str, int]) -> np.ndarray:
        """Embedding row -> the row it is replaced by (train stimuli permuted, seeded)."""
        rows = np.array(sorted({row_of[s] for lab in labels for s, sp in zip(
            data.subjects[lab].trials["stim_file"], data.subjects[lab].trials["split"],
            strict=True) if sp == "train"}))
        perm = np.arange(len(row_of))
        perm[rows] = rows[np.random.default_rng([self.seed, 11]).permutation(len(rows))]
        return perm

    def _fraction_mask(self, label: str, split: np.ndarray) -> np.ndarray:
        keep = np.ones(len(split), bool)
        frac = self.train_fraction.get(label)
        if frac is not None and frac < 1:
            train = np.flatnonzero(split == "train")
            rng = np.random.default_rng([self.seed, 7])
            n_keep = max(1, int(round(frac * len(train))))
            drop = rng.permutation(train)[n_keep:]
            keep[drop] = False
        return keep

    @staticmethod
    def _merge(parts) -> Split:
        subj = np.concatenate([np.full(len(sel), k) for k, sel, _, _ in parts]) if parts else []
        return Split(
            subject=np.asarray(subj, dtype=int),
            row=np.concatenate([sel for _, sel, _, _ in parts]).astype(int),
            target=np.concatenate([t for _, _, t, _ in parts]).astype(int),
            stim_file=np.concatenate([tr["stim_file"].to_numpy() for *_, tr in parts]),
            trials=pd.concat([tr for *_, tr in parts], ignore_index=True),
        )

    def with_validation_in_train(self) -> BrainDataModule:
        """A copy whose train split holds this one's train and validation trials (each
        subject's in trial order, as a module built with ``val_fraction=0`` has them when
        nothing else is left out) and whose validation split is empty: a refit for the epoch
        count that validation chose, on the same trials (a ``train_fraction`` subset kept)."""
        import copy

        parts = (self.splits["train"], self.splits["val"])
        both = Split(**{f: np.concatenate([getattr(p, f) for p in parts])
                        for f in ("subject", "row", "target", "stim_file")},
                     trials=pd.concat([p.trials for p in parts], ignore_index=True))
        out = copy.copy(self)
        out.splits = {**self.splits, "train": _take(both, np.lexsort((both.row, both.subject))),
                      "val": _take(both, np.zeros(0, int))}
        return out

    # ------------------------------------------------------------------ items and loaders
    def item(self, split: Split, i: int) -> dict[str, Any]:
        k = int(split.subject[i])
        x = torch.from_numpy(self._X[k].rows(int(split.row[i])).astype(np.float32, copy=False))
        return {"x": x, "y": self.embeddings[split.target[i]],
                "subject": k, "target": int(split.target[i]), **self.subject_inputs(k)}

    def subject_inputs(self, k: int) -> dict[str, torch.Tensor]:
        """Model inputs besides ``x`` that are fixed per subject (:meth:`.SubjectInfo.inputs`:
        MEG ``positions`` ``(n_chans, 2)``, ``mask`` ``(n_chans,)`` and ``sensors``; none for
        fMRI)."""
        return self.subjects[self.labels[k]].inputs()

    def subject_rows(self, name: str, k: int) -> tuple[np.ndarray, torch.Tensor]:
        """Rows of split ``name`` that belong to subject ``k`` and their brain arrays."""
        split = self.splits[name]
        rows = np.flatnonzero(split.subject == k)
        return rows, torch.from_numpy(self._X[k].rows(split.row[rows]).astype(np.float32,
                                                                             copy=False))

    def subject_row_blocks(self, name: str, k: int) -> RowBlocks:
        """Subject ``k``'s rows of split ``name`` as a re-readable source of blocks (a
        streamed fit over trials that need not fit in memory)."""
        split = self.splits[name]
        return RowBlocks(self._X[k], split.row[split.subject == k])

    @property
    def labels(self) -> list[str]:
        return list(self.subjects)

    def trained_trials(self, label: str) -> int:
        """Subject ``label``'s train + validation trials: what a model refitted on both (the
        default) was trained on."""
        k = self.labels.index(label)
        return int(sum((self.splits[name].subject == k).sum() for name in ("train", "val")))

    def mean_trained_trials(self) -> float:
        """:meth:`trained_trials` averaged over the subjects."""
        return float(np.mean([self.trained_trials(label) for label in self.labels]))

    def _loader(self, name: str, *, shuffle: bool) -> DataLoader:
        split = self.splits[name]
        sampler = SubjectBatchSampler(split.subject, batch_size=self.batch_size,
                                      shuffle=shuffle, seed=self.seed)
        return DataLoader(_TrialDataset(self, split), batch_sampler=sampler,
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val" if len(self.splits["val"]) else "train", shuffle=False)

    def split_arrays(self, name: str) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Per-row brain arrays, subject indices and target rows of a split (for baselines)."""
        split = self.splits[name]
        X: list[np.ndarray] = [None] * len(split)  # type: ignore[list-item]
        for k in np.unique(split.subject):
            idx = np.flatnonzero(split.subject == k)
            for i, x in zip(idx, self._X[k].rows(split.row[idx]), strict=True):
                X[i] = x
        return X, split.subject, split.target

    def describe(self) -> dict[str, Any]:
        """Everything a checkpoint needs to be used on new data without this module."""
        return {
            "modality": self.modality,
            "emb_dim": self.emb_dim,
            "n_tokens": self.n_tokens,
            "embedder": self.embedder_spec,
            "preprocessing": self.recipe,
            "subjects": {lab: info.describe() for lab, info in self.subjects.items()},
        }
