"""On-disk layout of preprocessed trials (the contract between preprocessing and training).

A preprocessing cache entry holds, per subject, ``sub-<label>/X.npy`` (float32, trials first)
and ``sub-<label>/trials.tsv`` (one row per row of ``X``: subject, session, run, stim_file,
split, n_repeats, ...), plus modality-specific files, and a top-level ``recipe.json`` with the
parameters that produced it (the streaming decoder and serving read the same recipe).

MEG: ``X`` is ``(n_trials, n_chans, n_times)``; ``channels.tsv`` lists name, x, y (2D sensor
layout in [0, 1]), ``good`` (False for bad channels, whose rows in ``X`` are zero), ``kind``
(``mag`` | ``axial`` | ``planar``) and ``ori_x``, ``ori_y`` (planar gradiometers' gradient
direction in the layout; 0 otherwise).
fMRI: ``X`` is ``(n_trials, n_voxels)``; ``mask.nii.gz`` (``SubjectTrials.mask_img``) maps
voxel columns back to the brain; with ``zscore: train``, ``voxel_stats.npy`` holds the train
trials' per-voxel mean and sd ``(2, n_voxels)``.

Bounded memory: preprocessing writes each recording's trials to a part file, then streams
the parts through the subject's transform into ``X.npy`` (:class:`TrialAssembler`, plain
sequential writes); training reads rows with :class:`RowFile` (``pread``, no memory map), so
the page cache, not the process, holds the data.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurorecon.models.common.checks import DataError, read_tsv


@dataclass
class SubjectTrials:
    """Preprocessed trials of one subject."""

    subject: str
    X: np.ndarray
    trials: pd.DataFrame
    channels: pd.DataFrame | None = None  # MEG: name, x, y, good
    mask_img: Any = None  # fMRI: nibabel mask image (voxel columns of X, in order)
    voxel_stats: np.ndarray | None = None  # fMRI zscore=train: (2, n_voxels) mean, sd

    def __post_init__(self) -> None:
        if len(self.X) != len(self.trials):
            raise ValueError(
                f"sub-{self.subject}: {len(self.X)} arrays but {len(self.trials)} trial rows"
            )


@dataclass
class Preprocessed:
    """All subjects of one preprocessing run plus its recipe."""

    modality: str
    subjects: dict[str, SubjectTrials]
    recipe: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def subject_dir(out: str | Path, label: str) -> Path:
    """The folder of subject ``label`` in a cache entry."""
    return Path(out) / f"sub-{label}"


@contextlib.contextmanager
def output_folder(out: str | Path | None) -> Iterator[tuple[Path, bool]]:
    """The folder a preprocessing function writes its arrays into, and whether they must be
    read back into memory: ``out`` itself, or (``out`` None) a temporary folder removed on
    exit."""
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        yield Path(out), False
        return
    with tempfile.TemporaryDirectory(prefix="neurorecon-preprocess-") as tmp:
        yield Path(tmp), True


def load_rows(path: Path, *, in_memory: bool) -> np.ndarray:
    """A written ``X.npy``: memory-mapped where it stays, read into memory otherwise."""
    return np.load(path) if in_memory else np.load(path, mmap_mode="r")


def save_preprocessed(data: Preprocessed, out: Path) -> None:
    """Write ``data`` into the (temporary) cache directory ``out``; an ``X`` that already
    is that entry's ``X.npy`` (written by a :class:`TrialAssembler`) is left as it is."""
    (out / "recipe.json").write_text(
        json.dumps({"modality": data.modality, **data.recipe}, indent=2, default=str)
    )
    for label, sub in data.subjects.items():
        d = subject_dir(out, label)
        d.mkdir(parents=True, exist_ok=True)
        target = d / "X.npy"
        if not (isinstance(sub.X, np.memmap) and target.is_file()
                and Path(sub.X.filename).resolve() == target.resolve()):
            np.save(target, np.ascontiguousarray(sub.X, dtype=np.float32))
        sub.trials.to_csv(d / "trials.tsv", sep="\t", index=False, na_rep="n/a")
        if sub.channels is not None:
            sub.channels.to_csv(d / "channels.tsv", sep="\t", index=False)
        if sub.mask_img is not None:
            import nibabel as nib

            nib.save(sub.mask_img, d / "mask.nii.gz")
        if sub.voxel_stats is not None:
            np.save(d / "voxel_stats.npy", np.asarray(sub.voxel_stats, np.float32))


def load_preprocessed(path: str | Path, *, mmap: bool = True) -> Preprocessed:
    """Load a preprocessing cache entry written by :func:`save_preprocessed`."""
    path = Path(path)
    recipe_file = path / "recipe.json"
    if not recipe_file.is_file():
        raise DataError("not a neurorecon preprocessing cache (no recipe.json)", path=path)
    recipe = json.loads(recipe_file.read_text())
    modality = recipe.pop("modality")
    subjects = {}
    for d in sorted(path.glob("sub-*")):
        label = d.name[4:]
        ch_file = d / "channels.tsv"
        channels = pd.read_csv(ch_file, sep="\t") if ch_file.is_file() else None
        mask = d / "mask.nii.gz"
        subjects[label] = SubjectTrials(
            subject=label,
            X=np.load(d / "X.npy", mmap_mode="r" if mmap else None),
            trials=read_tsv(d / "trials.tsv", what="cached trial table",
                            dtype={"subject": str, "session": str, "run": str}),
            channels=channels,
            mask_img=_load_nifti(mask) if mask.is_file() else None,
            voxel_stats=(np.load(d / "voxel_stats.npy") if (d / "voxel_stats.npy").is_file()
                         else None),
        )
    return Preprocessed(modality=modality, subjects=subjects, recipe=recipe, path=path)


def _load_nifti(path: Path):
    import nibabel as nib

    return nib.load(path)


@dataclass
class RepeatPlan:
    """Where each trial goes when the repeats of ``split`` are averaged (or not).

    ``kept``: input rows copied as they are, in order; ``groups``: per repeated stimulus
    (sorted by name) its input rows, in presentation order, each group one output row after
    the kept ones; ``trials``: the output table (``n_repeats`` added).
    """

    kept: np.ndarray
    groups: list[np.ndarray]
    trials: pd.DataFrame
    n_in: int

    @property
    def n_out(self) -> int:
        return len(self.trials)


def repeat_plan(trials: pd.DataFrame, *, stim_column: str = "stim_file", split: str = "test",
                average: bool = True) -> RepeatPlan:
    """The :class:`RepeatPlan` of ``trials``; ``average=False`` keeps every row (the groups
    still list the repeats of ``split``, for split-half statistics).

    Raises :class:`DataError` if averaging is asked and no stimulus of ``split`` is repeated.
    """
    trials = trials.reset_index(drop=True)
    grouped = trials[trials["split"] == split].groupby(stim_column, sort=True)
    groups = [g.index.to_numpy() for _, g in grouped]
    if not average:
        return RepeatPlan(trials.index.to_numpy(), groups, trials.assign(n_repeats=1), len(trials))
    if groups and max(len(g) for g in groups) == 1:
        raise DataError(
            f"the {split} set has no repeats: every {split} stimulus was shown once, so there "
            "is nothing to average",
            hint="set preprocess.<modality>.average_test_repeats=false, or mark the repeated "
            "images as test with data.split_column / data.test_value")
    kept = trials.index[trials["split"] != split].to_numpy()
    rows = [trials.loc[kept].assign(n_repeats=1)]
    rows += [trials.loc[g[:1]].assign(n_repeats=len(g)) for g in groups]
    return RepeatPlan(kept, groups, pd.concat(rows, ignore_index=True), len(trials))


def average_repeats(X: np.ndarray, trials: pd.DataFrame, *, stim_column: str = "stim_file",
                    split: str = "test") -> tuple[np.ndarray, pd.DataFrame]:
    """Average the trials of ``split`` that show the same stimulus; keep the others as they are.

    The averaged rows get ``n_repeats`` (number of trials averaged); other rows get 1.
    Raises :class:`DataError` if no stimulus of ``split`` is repeated.
    """
    plan = repeat_plan(trials, stim_column=stim_column, split=split)
    out = [X[plan.kept]] + [X[g].mean(axis=0, keepdims=True) for g in plan.groups]
    return np.concatenate(out, axis=0), plan.trials


# --------------------------------------------------------------------------------------------
# trials-first arrays on disk, written and read in blocks
# --------------------------------------------------------------------------------------------
#: bytes of trials read or written at once when streaming through a file
BLOCK_BYTES = 16 * 2**20


class RowFile:
    """A trials-first ``.npy`` array read by rows with ``os.pread`` (no memory map): the
    pages stay in the page cache, not in this process. Picklable (for loader workers)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with self.path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran or not shape:
            raise DataError("not a C-ordered trials-first array", path=self.path)
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_shape = self.shape[1:]
        self.row_nbytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop``, read into ``out`` (C-contiguous, of their shape) when given."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        if out is None:
            out = np.empty((stop - start, *self.row_shape), self.dtype)
        n = (stop - start) * self.row_nbytes
        view, done = memoryview(out.reshape(-1)).cast("B"), 0
        while done < n:
            got = os.preadv(self._fd, [view[done:]], self.offset + start * self.row_nbytes + done)
            if got == 0:
                raise DataError(f"file ends before row {stop}: truncated", path=self.path)
            done += got
        return out

    def rows(self, index) -> np.ndarray:
        """Rows ``index`` (int, slice or integer array) as a new array; consecutive rows are
        read at once."""
        if isinstance(index, (int, np.integer)):
            return self._read(int(index), int(index) + 1)[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._read(start, max(start, stop))
            return self.rows(np.arange(start, stop, step))
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), *self.row_shape), self.dtype)
        if len(index) == 0:
            return out
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        for run in np.split(np.arange(len(index)), breaks):  # read in place: no copy of a run
            first = int(index[run[0]])
            self._read(first, first + len(run), out=out[run[0]:run[-1] + 1])
        return out

    __getitem__ = rows

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._read(0, len(self))
        return out if dtype is None else out.astype(dtype)

    def blocks(self, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(row indices, data)`` of ``rows`` (default all), :data:`BLOCK_BYTES` at a time."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        step = max(1, BLOCK_BYTES // max(self.row_nbytes, 1))
        for k in range(0, len(rows), step):
            yield rows[k : k + step], self.rows(rows[k : k + step])


class RowWriter:
    """Write a ``(n_rows, *row_shape)`` ``.npy`` file block by block, in order (plain writes;
    nothing mapped). :meth:`close` checks that every row was written."""

    def __init__(self, path: str | Path, n_rows: int, row_shape: tuple[int, ...],
                 dtype=np.float32):
        self.path, self.n_rows = Path(path), int(n_rows)
        self.row_shape, self.dtype = tuple(int(v) for v in row_shape), np.dtype(dtype)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("wb")
        np.lib.format.write_array_header_2_0(self._f, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
            "shape": (self.n_rows, *self.row_shape)})
        self.written = 0

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {block.shape[1:]}, "
                             f"expected {self.row_shape}")
        if self.written + len(block) > self.n_rows:
            raise ValueError(f"{self.path.name}: more than {self.n_rows} rows written")
        if block.size:
            self._f.write(memoryview(block).cast("B"))
        self.written += len(block)

    def close(self) -> None:
        self._f.close()
        if self.written != self.n_rows:
            raise ValueError(f"{self.path.name}: {self.written} of {self.n_rows} rows written")


class TrialAssembler:
    """Stream a subject's transformed trials, in input order, into its ``X.npy`` following
    a :class:`RepeatPlan`: kept rows are written as they come, repeats of the test split are
    summed (float64, one row per test stimulus) and their means written at the end.

    The sums are kept per half (alternate repeats in presentation order), so split-half
    statistics come without holding the test trials: :meth:`halves`.
    """

    def __init__(self, path: str | Path, plan: RepeatPlan, row_shape: tuple[int, ...], *,
                 average: bool):
        self.plan, self.average = plan, average
        self.writer = RowWriter(path, plan.n_out, row_shape)
        self._group = np.full(plan.n_in, -1)
        self._half = np.zeros(len(self._group), int)
        for g, rows in enumerate(plan.groups):
            self._group[rows] = g
            self._half[rows] = np.arange(len(rows)) % 2
        self._kept = np.zeros(plan.n_in, bool)
        self._kept[plan.kept] = True
        self.sums = np.zeros((2, len(plan.groups), *row_shape))
        self.counts = np.zeros((2, len(plan.groups)), int)
        self._next = 0

    def add(self, rows: np.ndarray, block: np.ndarray) -> None:
        """Input rows ``rows`` (consecutive, continuing the previous call) and their data."""
        rows = np.asarray(rows)
        if len(rows) and (rows[0] != self._next or np.any(np.diff(rows) != 1)):
            raise ValueError(f"rows must come in order: expected {self._next}, got {rows[0]}")
        self._next += len(rows)
        write = self._kept[rows]
        if write.any():
            self.writer.write(block[write])
        grouped = np.flatnonzero(self._group[rows] >= 0)
        for i in grouped:
            g, h = self._group[rows[i]], self._half[rows[i]]
            self.sums[h, g] += block[i]
            self.counts[h, g] += 1

    def halves(self) -> tuple[np.ndarray, np.ndarray]:
        """Means of each test stimulus' even and odd repeats ``(n_groups, *row_shape)`` each
        (groups with fewer than 2 repeats excluded)."""
        two = self.counts[1] > 0
        expand = (-1, *([1] * (self.sums.ndim - 2)))
        return (self.sums[0][two] / self.counts[0][two].reshape(expand),
                self.sums[1][two] / self.counts[1][two].reshape(expand))

    def close(self) -> pd.DataFrame:
        """Write the averaged rows; return the output trial table."""
        if self._next != len(self._group):
            raise ValueError(f"{self._next} of {len(self._group)} input rows were added")
        if self.average:
            n = self.counts.sum(axis=0).reshape(-1, *([1] * (self.sums.ndim - 2)))
            self.writer.write((self.sums.sum(axis=0) / np.maximum(n, 1)).astype(np.float32))
        self.writer.close()
        return self.plan.trials
