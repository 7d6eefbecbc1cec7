"""fMRI: simulated BIDS sample, single-trial GLM preprocessing, betas input, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_module

from neurorecon.models.common.checks import DataError
from neurorecon.pipelines.data.studies import find_recordings
from neurorecon.pipelines.preprocess.fmri import (
    find_betas,
    fmri_summary,
    load_betas,
    preprocess_fmri,
    read_tr,
)
from neurorecon.pipelines.preprocess.store import load_preprocessed, save_preprocessed
from neurorecon.pipelines.sample.fmri import simulate_fmri_bids
from neurorecon.pipelines.sample.run import write_stimuli
from neurorecon.pipelines.sample.stimuli import make_stimuli


def _sample_cfg(overrides=()):
    with initialize_config_module("neurorecon.configs", version_base="1.3"):
        cfg = compose(config_name="sample", overrides=["sample=tiny", *overrides])
    return cfg.sample


def _make_fmri(root: Path, cfg) -> Path:
    """The fMRI half of ``make_sample`` (independent of the MEG simulator)."""
    s = cfg.stimuli
    stimuli = make_stimuli(root / "stimuli", n_concepts=s.n_concepts,
                           n_train_exemplars=s.n_train_exemplars,
                           n_test_exemplars=s.n_test_exemplars, image_size=s.image_size,
                           rng=np.random.default_rng(cfg.seed))
    write_stimuli(root, stimuli)
    simulate_fmri_bids(root, stimuli, cfg=cfg.fmri, seed=cfg.seed,
                       n_test_repeats=s.n_test_repeats)
    return root


@pytest.fixture(scope="module")
def tiny_cfg():
    return _sample_cfg()


@pytest.fixture(scope="module")
def fmri_root(tmp_path_factory, tiny_cfg) -> Path:
    return _make_fmri(tmp_path_factory.mktemp("fmri") / "fmri", tiny_cfg)


@pytest.fixture(scope="module")
def single_trials(fmri_root):
    """LSA single-trial betas of the tiny sample, test repeats kept separate."""
    recs = find_recordings(fmri_root, modality="fmri")
    return preprocess_fmri(recs, bids_root=fmri_root, params={"average_test_repeats": False})


def test_sample_bids_roundtrip(fmri_root, tiny_cfg):
    s, f = tiny_cfg.stimuli, tiny_cfg.fmri
    recs = find_recordings(fmri_root, modality="fmri")
    assert len(recs) == f.n_subjects * f.n_runs
    assert json.loads((fmri_root / "dataset_description.json").read_text())["Name"]
    participants = pd.read_csv(fmri_root / "participants.tsv", sep="\t")
    assert list(participants["participant_id"]) == ["sub-01", "sub-02"]
    n_voxels = {}
    for rec in recs:
        assert rec.fpath.name == f"sub-{rec.subject}_task-images_run-{rec.run}_bold.nii.gz"
        img = nib.load(rec.fpath)
        assert img.ndim == 4 and img.shape[3] > 30
        assert read_tr(rec.fpath) == f.tr
        assert np.allclose(img.header.get_zooms(), [f.voxel_sizes[int(rec.subject) - 1]] * 3
                           + [f.tr])
        data = np.asarray(img.dataobj)
        brain = data.mean(axis=3) > 0
        n_voxels[rec.subject] = int(brain.sum())
        assert 800 < data[brain].mean() < 1200  # baseline ~1000
        events = pd.read_csv(rec.events_path, sep="\t")
        assert list(events.columns) == ["onset", "duration", "trial_type", "stim_file"]
        assert set(events["trial_type"]) <= {"train", "test"}
        assert all((fmri_root / "stimuli" / p).is_file() for p in events["stim_file"])
        assert events["onset"].max() + f.image_duration < img.shape[3] * f.tr
        gaps = np.diff(events["onset"])
        assert gaps.min() >= f.soa[0] - 1e-3 and gaps.max() <= f.soa[1] + 1e-3
    for sub in ("01", "02"):
        events = pd.concat(pd.read_csv(r.events_path, sep="\t") for r in recs if r.subject == sub)
        counts = events["trial_type"].value_counts()
        assert counts["train"] == s.n_concepts * s.n_train_exemplars
        assert counts["test"] == s.n_concepts * s.n_test_exemplars * s.n_test_repeats
        assert events[events.trial_type == "test"]["stim_file"].value_counts().eq(
            s.n_test_repeats).all()
    assert n_voxels["01"] > 1.5 * n_voxels["02"]  # 8 mm vs 10 mm voxels


def test_preprocess_lsa(fmri_root, tiny_cfg, single_trials, tmp_path):
    s = tiny_cfg.stimuli
    recs = find_recordings(fmri_root, modality="fmri")
    pre = preprocess_fmri(recs, bids_root=fmri_root, params={"glm": "lsa"})
    assert pre.modality == "fmri" and set(pre.subjects) == {"01", "02"}
    n_rows = s.n_concepts * s.n_train_exemplars + s.n_concepts * s.n_test_exemplars
    for label, sub in pre.subjects.items():
        assert sub.X.dtype == np.float32 and np.isfinite(sub.X).all()
        assert sub.X.shape == (n_rows, pre.recipe["subjects"][label]["n_voxels"])
        assert int(sub.mask_img.get_fdata().sum()) == sub.X.shape[1]
        t = sub.trials
        for col in ("subject", "session", "run", "onset", "stim_file", "split", "n_repeats",
                    "trial_type", "duration"):
            assert col in t
        assert (t.loc[t.split == "test", "n_repeats"] == s.n_test_repeats).all()
        assert (t.loc[t.split == "train", "n_repeats"] == 1).all()
        assert t.loc[t.split == "test", "stim_file"].is_unique
        # averaged rows are the mean of the single-trial rows
        single = single_trials.subjects[label]
        assert single.X.shape[1] == sub.X.shape[1]
        for stim in t.loc[t.split == "test", "stim_file"]:
            rows = single.trials.index[single.trials.stim_file == stim]
            assert len(rows) == s.n_test_repeats
            np.testing.assert_allclose(sub.X[t.index[t.stim_file == stim][0]],
                                       single.X[rows].mean(axis=0), atol=1e-5)
    n1, n2 = (pre.subjects[k].X.shape[1] for k in ("01", "02"))
    assert n1 > 1.5 * n2
    rec = pre.recipe["subjects"]["01"]
    assert rec["tr"] == tiny_cfg.fmri.tr and rec["voxel_size"] == [8.0, 8.0, 8.0]
    assert pre.recipe["glm"] == "lsa" and pre.recipe["hrf_model"] == "glover"
    # simulated with nilearn's undelayed Glover HRF: hrf_onset=auto finds it within 0.5 s
    assert pre.recipe["hrf_onset"] == "auto"
    assert all(abs(pre.recipe["subjects"][k]["hrf_onset"]) <= 0.5 for k in ("01", "02"))
    # the cache layout round-trips, mask included
    save_preprocessed(pre, tmp_path)
    back = load_preprocessed(tmp_path)
    np.testing.assert_array_equal(back.subjects["02"].X, pre.subjects["02"].X)
    assert (tmp_path / "sub-02" / "mask.nii.gz").is_file()
    assert back.subjects["02"].mask_img.shape == pre.subjects["02"].mask_img.shape
    summary = fmri_summary(back)
    assert summary["01"]["n_voxels"] == n1 and summary["01"]["test_repeats"] == s.n_test_repeats
    assert summary["01"]["split_half"]["n_stimuli"] == s.n_concepts


def test_hrf_delay_chosen_per_subject(tmp_path):
    """hrf_onset=auto: each subject's HRF delay is the one at which the mean evoked response
    explains its runs best. On data simulated with the HRF 1.5 s late a late delay is found,
    and a test image's betas repeat better over its presentations than with the undelayed
    HRF."""
    root = _make_fmri(tmp_path / "fmri", _sample_cfg(["sample.fmri.hrf_onset=1.5"]))
    recs = find_recordings(root, modality="fmri")
    auto = preprocess_fmri(recs, bids_root=root, params={"hrf_onset": "auto"})
    fixed = preprocess_fmri(recs, bids_root=root, params={"hrf_onset": 0})
    for label, chosen in auto.recipe["subjects"].items():
        assert 0.5 <= chosen["hrf_onset"] <= 2.5
        r2, best = chosen["hrf_onset_r2"], f"{chosen['hrf_onset']:g}"
        assert r2[best] > r2["0"] and r2[best] > r2["-1"] and r2[best] > r2["3"]
        assert fixed.recipe["subjects"][label]["hrf_onset"] == 0.0

    def repeat_similarity(pre):
        return np.mean([s["split_half"]["pattern_r_same"]
                        for s in pre.recipe["subjects"].values()])
    assert repeat_similarity(auto) > repeat_similarity(fixed)


def test_zscored_per_run(single_trials):
    for sub in single_trials.subjects.values():
        assert (sub.trials["n_repeats"] == 1).all()
        for _, rows in sub.trials.groupby("run"):
            x = sub.X[rows.index.to_numpy()]
            np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-4)
            np.testing.assert_allclose(x.std(axis=0), 1, atol=1e-3)


def test_preprocess_lss_small(fmri_root, single_trials):
    recs = [r for r in find_recordings(fmri_root, modality="fmri", subjects=["02"])
            if r.run == "01"]
    pre = preprocess_fmri(recs, bids_root=fmri_root,
                          params={"glm": "lss", "average_test_repeats": False})
    X = pre.subjects["02"].X
    lsa = single_trials.subjects["02"]
    rows = lsa.trials.index[lsa.trials.run == "01"].to_numpy()
    assert X.shape == (len(rows), lsa.X.shape[1]) and np.isfinite(X).all()
    # LSS and LSA estimate the same single-trial responses from the same data
    r = [np.corrcoef(a, b)[0, 1] for a, b in zip(X, lsa.X[rows], strict=True)]
    assert np.median(r) > 0.5


def _visual_roi(path: Path) -> Path:
    """Posterior ROI (occipital + ventral temporal: MNI y < -25, z < 10) on the MNI152 mask."""
    from nibabel.affines import apply_affine
    from nilearn.datasets import load_mni152_brain_mask

    mask = load_mni152_brain_mask(resolution=2)
    xyz = apply_affine(mask.affine, np.indices(mask.shape).reshape(3, -1).T)
    roi = (mask.get_fdata().reshape(-1) > 0) & (xyz[:, 1] < -25) & (xyz[:, 2] < 10)
    nib.save(nib.Nifti1Image(roi.reshape(mask.shape).astype(np.uint8), mask.affine), path)
    return path


def _pairwise_identification(X, trials, *, n_query, n_splits=20, seed=0):
    """2-way identification of test stimuli: mean of ``n_query`` repeats vs held-out repeats.

    Per random split of each stimulus' repeats, the template is the mean of half of them and
    the query the mean of ``n_query`` of the others; chance is 0.5.
    """
    rng = np.random.default_rng(seed)
    test = trials.reset_index(drop=True)
    groups = [g.index.to_numpy() for _, g in test[test.split == "test"].groupby("stim_file")]
    half = min(len(g) for g in groups) // 2
    accs = []
    for _ in range(n_splits):
        perm = [rng.permutation(g) for g in groups]
        T = np.stack([X[p[half : 2 * half]].mean(0) for p in perm])
        Q = np.stack([X[p[:n_query]].mean(0) for p in perm])
        T -= T.mean(0)
        Q -= Q.mean(0)
        C = (Q / np.linalg.norm(Q, axis=1, keepdims=True)) @ (
            T / np.linalg.norm(T, axis=1, keepdims=True)).T
        accs.append((np.diag(C)[:, None] > C)[~np.eye(len(C), dtype=bool)].mean())
    return float(np.mean(accs))


def test_sample_is_honest(tmp_path):
    """Single trials barely identify a test image; averages of repeats do (visual ROI)."""
    cfg = _sample_cfg(["sample.stimuli.n_concepts=8", "sample.stimuli.n_test_repeats=8"])
    root = _make_fmri(tmp_path / "fmri", cfg)
    recs = find_recordings(root, modality="fmri")
    roi = _visual_roi(tmp_path / "visual_roi.nii.gz")
    pre = preprocess_fmri(recs, bids_root=root,
                          params={"mask": str(roi), "average_test_repeats": False})
    single, averaged = [], []
    for sub in pre.subjects.values():
        assert 300 < sub.X.shape[1] < 1500  # the ROI, not the whole brain
        single.append(_pairwise_identification(sub.X, sub.trials, n_query=1))
        averaged.append(_pairwise_identification(sub.X, sub.trials, n_query=4))
    single, averaged = np.mean(single), np.mean(averaged)
    assert averaged > 0.78, (single, averaged)
    assert single < 0.8 and averaged - single > 0.07, (single, averaged)


def _copy_run(fmri_root: Path, dest: Path):
    """A one-run copy of sub-01 (with stimuli) that a test may corrupt; returns its recording."""
    shutil.copytree(fmri_root / "stimuli", dest / "stimuli")
    shutil.copytree(fmri_root / "sub-01", dest / "sub-01")
    for p in (dest / "sub-01" / "func").glob("*run-02*"):
        p.unlink()
    (rec,) = find_recordings(dest, modality="fmri")
    return rec


def _resave(path: Path, data, img) -> None:
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)


def _drop_tr(rec):
    sidecar = rec.fpath.with_name(rec.fpath.name.replace(".nii.gz", ".json"))
    meta = json.loads(sidecar.read_text())
    del meta["RepetitionTime"]
    sidecar.write_text(json.dumps(meta))
    return sidecar.name


def _make_3d(rec):
    img = nib.load(rec.fpath)
    _resave(rec.fpath, np.asarray(img.dataobj)[..., 0], img)
    return rec.fpath.name


def _add_nans(rec):
    img = nib.load(rec.fpath)
    data = img.get_fdata(dtype=np.float32)
    data[10, 10, 10, 5] = np.nan
    img.header.set_data_dtype(np.float32)
    _resave(rec.fpath, data, img)
    return rec.fpath.name


def _late_event(rec):
    events = pd.read_csv(rec.events_path, sep="\t")
    events.loc[len(events) - 1, "onset"] += 1000.0
    events.to_csv(rec.events_path, sep="\t", index=False)
    return rec.events_path.name


def _no_stim_column(rec):
    events = pd.read_csv(rec.events_path, sep="\t")
    events.drop(columns="stim_file").to_csv(rec.events_path, sep="\t", index=False)
    return rec.events_path.name


def _missing_image(rec):
    events = pd.read_csv(rec.events_path, sep="\t")
    (rec.fpath.parents[2] / "stimuli" / events["stim_file"].iloc[0]).unlink()
    return rec.events_path.name


def _shift(rec, mm: float):
    img = nib.load(rec.fpath)
    affine = img.affine.copy()
    affine[:3, 3] += mm  # the data move away from the MNI brain mask
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine, img.header), rec.fpath)
    return rec.fpath.name


def _shifted_grid(rec):
    return _shift(rec, 250.0)  # no overlap at all


def _misaligned_grid(rec):
    return _shift(rec, 70.0)  # most of the mask falls outside the brain data


@pytest.mark.parametrize("corrupt, problem", [
    (_drop_tr, "RepetitionTime"),
    (_make_3d, "must be 4D"),
    (_add_nans, "non-finite"),
    (_late_event, "outside the recording"),
    (_no_stim_column, "missing column"),
    (_missing_image, "do not exist"),
    (_shifted_grid, "grid mismatch: the MNI152 brain mask has no voxel"),
    (_misaligned_grid, "grid mismatch: only .* carry signal"),
])
def test_bad_bold_inputs(fmri_root, tmp_path, corrupt, problem):
    rec = _copy_run(fmri_root, tmp_path)
    name = corrupt(rec)
    with pytest.raises(DataError, match=problem) as info:
        preprocess_fmri([rec], bids_root=tmp_path, params={})
    assert name in str(info.value)


def _write_betas(pre, label: str, dest: Path, *, drop_rows: int = 0) -> None:
    """Write a subject's single-trial patterns as BIDS-derivative 4D betas + trial table."""
    from nilearn.masking import unmask

    sub = pre.subjects[label]
    d = dest / "derivatives" / "betas" / f"sub-{label}"
    d.mkdir(parents=True)
    nib.save(unmask(sub.X, sub.mask_img), d / f"sub-{label}_task-images_betas.nii.gz")
    trials = sub.trials[["run", "stim_file", "trial_type"]].iloc[drop_rows:]
    trials.to_csv(d / f"sub-{label}_task-images_trials.tsv", sep="\t", index=False)


def test_betas_input(fmri_root, single_trials, tmp_path):
    shutil.copytree(fmri_root / "stimuli", tmp_path / "stimuli")
    _write_betas(single_trials, "02", tmp_path)
    found = find_betas(tmp_path, "derivatives/betas/sub-*/**/*_betas.nii.gz")
    assert [(b[0].name, b[1].name, b[2]) for b in found] == [
        ("sub-02_task-images_betas.nii.gz", "sub-02_task-images_trials.tsv", "02")]
    pre = load_betas(found, bids_root=tmp_path,
                     params={"zscore": "none", "average_test_repeats": False})
    ref = single_trials.subjects["02"]
    np.testing.assert_allclose(pre.subjects["02"].X, ref.X, atol=1e-6)
    assert list(pre.subjects["02"].trials["split"]) == list(ref.trials["split"])
    averaged = load_betas(found, bids_root=tmp_path, params={})
    assert averaged.subjects["02"].X.shape[0] == (ref.trials.split == "train").sum() + len(
        set(ref.trials.loc[ref.trials.split == "test", "stim_file"]))
    assert averaged.recipe["input"] == "betas"


def test_betas_row_mismatch(fmri_root, single_trials, tmp_path):
    shutil.copytree(fmri_root / "stimuli", tmp_path / "stimuli")
    _write_betas(single_trials, "01", tmp_path, drop_rows=1)
    found = find_betas(tmp_path, "derivatives/betas/**/*_betas.nii.gz")
    with pytest.raises(DataError, match="trial rows but") as info:
        load_betas(found, bids_root=tmp_path, params={})
    assert "sub-01_task-images_trials.tsv" in str(info.value)


def _write_sessions(pre, label: str, dest: Path, n_sessions: int = 3) -> list[np.ndarray]:
    """NSD-shaped betas: one 4D file per session (``ses-<k>`` in the name, no session column),
    each session with its own per-voxel offset and gain (what per-session z-scoring removes).
    Returns the rows of each session."""
    from nilearn.masking import unmask

    sub = pre.subjects[label]
    rng = np.random.default_rng(5)
    d = dest / "derivatives" / "betas" / f"sub-{label}"
    d.mkdir(parents=True)
    sessions = np.array_split(np.arange(len(sub.X)), n_sessions)
    for k, rows in enumerate(sessions):
        X = np.asarray(sub.X)[rows] * rng.uniform(0.5, 2.0) + rng.normal(0, 3, sub.X.shape[1])
        stem = f"sub-{label}_ses-{k + 1:02d}_task-images"
        nib.save(unmask(X.astype(np.float32), sub.mask_img), d / f"{stem}_betas.nii.gz")
        sub.trials[["stim_file", "trial_type"]].iloc[rows].to_csv(
            d / f"{stem}_trials.tsv", sep="\t", index=False)
    return sessions


def test_nsd_shaped_sessions_masked_on_load_and_zscored_per_session(
        fmri_root, single_trials, tmp_path, monkeypatch):
    import neurorecon.pipelines.preprocess.store as store

    shutil.copytree(fmri_root / "stimuli", tmp_path / "stimuli")
    sessions = _write_sessions(single_trials, "01", tmp_path)
    found = find_betas(tmp_path, "derivatives/betas/sub-*/*_betas.nii.gz")
    monkeypatch.setattr(store, "BLOCK_BYTES", 20_000)  # a few volumes per read
    out = tmp_path / "cache"
    pre = load_betas(found, bids_root=tmp_path, out=out,
                     params={"zscore": "session", "average_test_repeats": False})
    sub = pre.subjects["01"]
    assert isinstance(sub.X, np.memmap) and Path(sub.X.filename) == out / "sub-01" / "X.npy"
    assert not (out / ".parts").exists()
    assert list(sub.trials["session"]) == [f"{k + 1:02d}" for k, r in enumerate(sessions)
                                           for _ in r]
    ref = np.asarray(single_trials.subjects["01"].X)
    for rows in sessions:  # each session z-scored on its own: the session effects are gone
        X = np.asarray(sub.X)[rows]
        np.testing.assert_allclose(X.mean(0), 0, atol=1e-4)
        np.testing.assert_allclose(X.std(0), 1, atol=1e-4)
        want = (ref[rows] - ref[rows].mean(0)) / ref[rows].std(0)
        np.testing.assert_allclose(X, want, atol=1e-3)
    # per file ("run" for files without a run column) is the same grouping here
    per_file = load_betas(found, bids_root=tmp_path,
                          params={"zscore": "run", "average_test_repeats": False})
    np.testing.assert_allclose(per_file.subjects["01"].X, sub.X, atol=1e-5)


def test_preprocess_workers_give_the_same_cache(fmri_root, single_trials):
    recs = find_recordings(fmri_root, modality="fmri")
    two = preprocess_fmri(recs, bids_root=fmri_root, params={"average_test_repeats": False},
                          n_jobs=2)
    for label, sub in single_trials.subjects.items():
        np.testing.assert_array_equal(two.subjects[label].X, sub.X)
        pd.testing.assert_frame_equal(two.subjects[label].trials, sub.trials)


@pytest.mark.slow
def test_preprocess_on_local_ray(fmri_root, single_trials):
    recs = find_recordings(fmri_root, modality="fmri")
    ray_pre = preprocess_fmri(recs, bids_root=fmri_root, n_jobs=2, executor="ray",
                              params={"average_test_repeats": False})
    for label, sub in single_trials.subjects.items():
        np.testing.assert_array_equal(ray_pre.subjects[label].X, sub.X)


def test_truncated_session_file_is_named(fmri_root, single_trials, tmp_path):
    shutil.copytree(fmri_root / "stimuli", tmp_path / "stimuli")
    _write_sessions(single_trials, "01", tmp_path)
    found = find_betas(tmp_path, "derivatives/betas/sub-*/*_betas.nii.gz")
    bad = found[1][0]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        load_betas(found, bids_root=tmp_path, params={"zscore": "session"})
    assert bad.name in str(info.value)


def test_missing_bold_run_is_an_error_or_a_recorded_skip(fmri_root, tmp_path, caplog):
    """A run whose events and sidecar exist but whose BOLD file does not stops preprocessing
    with an error naming the file (it used to be skipped silently); ``data.missing_runs=warn``
    leaves it out with a warning naming it, and the run records it (metrics.json
    ``data.skipped_runs``, the report)."""
    from neurorecon.pipelines.evaluate.summary import write_report
    from neurorecon.pipelines.preprocess.run import preprocess_data, skipped_runs

    from .conftest import compose_stage

    root = Path(shutil.copytree(fmri_root, tmp_path / "fmri"))
    missing = "sub-02/func/sub-02_task-images_run-02_bold.nii.gz"
    (root / missing).unlink()
    cfg = compose_stage("preprocess", tmp_path, ["data=bids", f"data.root={root}",
                                                 "data.modality=fmri"])
    with pytest.raises(DataError) as err:
        preprocess_data(cfg.data, cfg.preprocess, cache_dir=cfg.paths.cache_dir)
    assert str(err.value).splitlines() == [
        f"{root}: 1 run(s) have an events file but no recording: {missing}",
        "  -> restore the recording(s), or set data.missing_runs=warn to leave these runs out"]
    assert not Path(cfg.paths.cache_dir).exists()  # stopped before any work

    warn = compose_stage("run", tmp_path, ["data=bids", f"data.root={root}",
                                           "data.modality=fmri", "data.missing_runs=warn"])
    with caplog.at_level("WARNING", logger="neurorecon"):
        recordings = find_recordings(root, modality="fmri", missing_runs="warn")
    assert len(recordings) == 3
    assert f"1 run(s) left out, their events file has no recording: {missing}" in caplog.text
    assert skipped_runs(warn.data) == [missing]
    report = write_report(tmp_path, {"modality": "fmri", "n_test": 1,
                                     "data": {"skipped_runs": skipped_runs(warn.data)}})
    assert f"**1 run(s) left out** (events file without recording, `data.missing_runs=warn`): " \
        f"`{missing}`" in report.read_text()
