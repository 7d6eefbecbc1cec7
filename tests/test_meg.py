"""MEG: the sample dataset through mne-bids, preprocessing, and its streaming form."""

from __future__ import annotations

import shutil
from pathlib import Path

import mne
import mne_bids
import numpy as np
import pandas as pd
import pytest

from neurorecon.models.common.checks import DataError
from neurorecon.pipelines.data.events import EventSpec
from neurorecon.pipelines.data.studies import find_recordings
from neurorecon.pipelines.preprocess.meg import (
    MegParams,
    StreamingMegFilter,
    filter_and_decimate,
    preprocess_meg,
)


def _first_recording(root: Path):
    return find_recordings(root, modality="meg")[0]


def _stream_in_chunks(stream: StreamingMegFilter, data: np.ndarray, *, max_chunk: int,
                      seed: int) -> np.ndarray:
    """Feed ``data`` to ``stream`` in random-size chunks; return the concatenated output."""
    rng = np.random.default_rng(seed)
    outs, i = [], 0
    while i < data.shape[1]:
        n = int(rng.integers(1, max_chunk))
        outs.append(stream.process(data[:, i : i + n]))
        i += n
    return np.concatenate(outs, axis=1)


def test_sample_meg_bids_round_trip(sample_root):
    root = sample_root / "meg"
    recs = find_recordings(root, modality="meg")
    assert sorted({r.subject for r in recs}) == ["01", "02"]
    raw = mne_bids.read_raw_bids(recs[0].bids_path, verbose=False)
    assert raw.info["sfreq"] == 1200.0
    assert len(mne.pick_types(raw.info, meg=True, ref_meg=False, exclude=[])) == 274
    assert "UPPT001" in raw.ch_names and len(raw.info["bads"]) == 1
    events = pd.read_csv(recs[0].events_path, sep="\t")
    assert {"onset", "duration", "trial_type", "stim_file"} <= set(events.columns)
    assert all((root / "stimuli" / s).is_file() for s in events["stim_file"])
    # THINGS-like: train exemplars shown once, test exemplars repeated (tiny: 3 times)
    counts = events.groupby("stim_file").size()
    is_test = events.groupby("stim_file")["trial_type"].first() == "test"
    assert (counts[is_test] == 3).all() and (counts[~is_test] == 1).all()
    # the trigger channel carries one code for every image: no identity leak
    trig = raw.copy().pick(["UPPT001"]).get_data()[0]
    assert set(np.unique(trig)) == {0.0, 1.0}
    # different head positions -> different subjects really differ
    raw2 = mne_bids.read_raw_bids(recs[-1].bids_path, verbose=False)
    assert not np.allclose(raw.info["dev_head_t"]["trans"], raw2.info["dev_head_t"]["trans"])


def test_streaming_equals_offline_causal(sample_root):
    """Random-size chunks through the streaming filter == offline causal filter + decimation."""
    rec = _first_recording(sample_root / "meg")
    raw = mne_bids.read_raw_bids(rec.bids_path, verbose=False)
    raw.pick("meg", exclude=[]).crop(0, 20).load_data(verbose=False)
    params = MegParams(phase="causal", l_freq=0.1, h_freq=40.0, sfreq=120.0)
    data = raw.get_data()
    offline = filter_and_decimate(raw.copy(), params).get_data()

    stream = StreamingMegFilter(sfreq=raw.info["sfreq"], n_chans=data.shape[0], params=params)
    streamed = _stream_in_chunks(stream, data, max_chunk=250, seed=0)
    assert streamed.shape == offline.shape
    np.testing.assert_allclose(streamed, offline, rtol=1e-7, atol=1e-9 * np.abs(offline).max())
    # the zero-phase offline form is a different filter: the test above is not vacuous
    zero = filter_and_decimate(raw.copy(), MegParams(phase="zero")).get_data()
    assert not np.allclose(zero, offline, atol=1e-3 * np.abs(offline).max())


def test_preprocess_meg_shapes_scaling_and_repeats(sample_root):
    root = sample_root / "meg"
    recs = find_recordings(root, modality="meg")
    params = MegParams(h_freq=40.0, l_freq=0.5)
    pre = preprocess_meg(recs, bids_root=root, spec=EventSpec(), params=params)
    assert set(pre.subjects) == {"01", "02"}
    for sub in pre.subjects.values():
        n_times = int(round((params.tmax - params.tmin) * params.sfreq)) + 1
        assert sub.X.shape[1:] == (274, n_times)
        assert np.isfinite(sub.X).all() and np.abs(sub.X).max() <= params.clamp
        # 12 train trials + 4 averaged test stimuli (3 repeats each)
        assert (sub.trials["split"] == "train").sum() == 12
        test = sub.trials[sub.trials["split"] == "test"]
        assert len(test) == 4 and (test["n_repeats"] == 3).all()
        assert (sub.trials["subject"] == sub.subject).all()
        # bad channels: the declared dead one and the noisy one, zeroed and flagged
        bad = ~sub.channels["good"].to_numpy()
        assert bad.sum() == 2 and np.all(sub.X[:, bad] == 0)
        assert sub.channels[["x", "y"]].to_numpy().min() >= 0
        assert sub.channels[["x", "y"]].to_numpy().max() <= 1
        # robust scaling: train data per good channel has median ~0 and IQR ~1
        train = np.asarray(sub.X)[(sub.trials["split"] == "train").to_numpy()][:, ~bad]
        q25, q50, q75 = np.percentile(np.moveaxis(train, 1, 0).reshape(train.shape[1], -1),
                                      [25, 50, 75], axis=1)
        assert np.median(np.abs(q50)) < 0.05 and np.median(q75 - q25) == pytest.approx(1, abs=0.05)


def _copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_input_errors_name_the_file(sample_root, tmp_path):
    root = _copy_dataset(sample_root / "meg", tmp_path / "meg")
    rec = _first_recording(root)
    events = pd.read_csv(rec.events_path, sep="\t")
    params = MegParams()

    # events beyond the end of the recording
    late = events.copy()
    late.loc[0, "onset"] = 1e4
    late.to_csv(rec.events_path, sep="\t", index=False)
    with pytest.raises(DataError, match="outside the recording") as err:
        preprocess_meg([rec], bids_root=root, spec=EventSpec(), params=params)
    assert rec.events_path.name in str(err.value)

    # a missing stimulus image
    events.to_csv(rec.events_path, sep="\t", index=False)
    (root / "stimuli" / events["stim_file"].iloc[0]).unlink()
    with pytest.raises(DataError, match="do not exist") as err:
        preprocess_meg([rec], bids_root=root, spec=EventSpec(), params=params)
    assert rec.events_path.name in str(err.value)

    # no stim_file column
    events.drop(columns="stim_file").to_csv(rec.events_path, sep="\t", index=False)
    with pytest.raises(DataError, match="stim_file") as err:
        preprocess_meg([rec], bids_root=root, spec=EventSpec(), params=params)
    assert rec.events_path.name in str(err.value)

    # a BIDS root without MEG, and one that does not exist
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no meg recordings"):
        find_recordings(tmp_path / "empty", modality="meg")
    with pytest.raises(DataError, match="does not exist"):
        find_recordings(tmp_path / "nowhere", modality="meg")


def test_single_trials_hard_averages_decodable(tmp_path):
    """Honest sample data: test identity is barely in single trials, clearly in averages."""
    from omegaconf import OmegaConf

    from neurorecon.pipelines.sample.meg import simulate_meg_bids
    from neurorecon.pipelines.sample.run import write_stimuli
    from neurorecon.pipelines.sample.stimuli import make_stimuli

    root = tmp_path / "meg"
    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs" / "sample" / "default.yaml").meg
    cfg.n_subjects, cfg.n_runs = 1, 1
    stim = make_stimuli(root / "stimuli", n_concepts=10, n_train_exemplars=1,
                        n_test_exemplars=1, image_size=64, rng=np.random.default_rng(3))
    write_stimuli(root, stim)
    simulate_meg_bids(root, stim, cfg=cfg, seed=3, n_test_repeats=8)
    recs = find_recordings(root, modality="meg")
    pre = preprocess_meg(recs, bids_root=root, spec=EventSpec(),
                         params=MegParams(average_test_repeats=False))
    sub = pre.subjects["01"]
    t = sub.trials
    test = (t["split"] == "test").to_numpy()
    X = np.asarray(sub.X)[test][:, :, 60:150]  # 0 .. 0.75 s after onset
    X = X.reshape(len(X), -1)
    labels = t.loc[test, "stim_file"].to_numpy()
    stims = np.unique(labels)
    rng = np.random.default_rng(0)

    def identification(n_probe: int, n_draws: int = 40) -> float:
        hits = []
        for _ in range(n_draws):
            probes, templates = [], []
            for s in stims:
                idx = rng.permutation(np.flatnonzero(labels == s))
                probes.append(X[idx[:n_probe]].mean(0))
                templates.append(X[idx[n_probe : n_probe + 4]].mean(0))
            c = np.corrcoef(np.array(probes), np.array(templates))[: len(stims), len(stims) :]
            hits.append(np.mean(c.argmax(1) == np.arange(len(stims))))
        return float(np.mean(hits))

    single, averaged = identification(1), identification(4)
    chance = 1 / len(stims)
    assert averaged > single + 0.2, (single, averaged)
    assert single < 0.6, single
    assert averaged > 3 * chance, averaged


@pytest.fixture(scope="module")
def artifact_root(tmp_path_factory) -> Path:
    """The tiny sample with blinks and heartbeats (and EOG and ECG channels)."""
    from neurorecon.pipelines.sample.run import make_sample

    from .conftest import compose_stage

    root = tmp_path_factory.mktemp("artifacts")
    cfg = compose_stage("sample", root, ["sample=tiny", "sample.meg.blink_rate=0.3",
                                         "sample.meg.blink_after_image=0.6",
                                         "sample.meg.ecg_gain=1.0"])
    return make_sample(cfg.sample, root / "data" / "sample")


@pytest.mark.parametrize("system", ["ctf275", "neuromag"])
def test_ssp_projects_out_blinks_and_heartbeats_and_keeps_the_brain(system):
    """MNE finds the blinks and beats on the EOG and ECG channels; the subject's projectors
    remove their fields from the MEG (per sensor type) and leave brain fields nearly whole."""
    from omegaconf import OmegaConf

    from neurorecon.pipelines.preprocess.meg import (
        RecordingEpochs,
        artifact_events,
        artifact_sums,
        project_out,
        ssp_basis,
    )
    from neurorecon.pipelines.sample import meg

    sfreq, n_times = 600.0, int(150 * 600)
    rng = np.random.default_rng(0)
    info = mne.channels.read_meg_canonical_info(system)
    with info._unlock():
        info["sfreq"] = sfreq
        info["dev_head_t"] = meg._head_transform(rng)
    info = mne.pick_info(info, mne.pick_types(info, meg=True, ref_meg=False))
    model = meg._subject_model(info, rng, 10, meg.N_CODE)
    cfg = OmegaConf.create({"sfreq": sfreq, "image_duration": 0.5, "blink_rate": 0.2,
                            "blink_after_image": 0.0, "blink_gain": 1.0, "ecg_gain": 1.0})
    art = meg._Artifacts(model, np.array([]), n_times, cfg=cfg, rng=np.random.default_rng(1))
    artifacts, exg = art(0, n_times)
    gain = model["gain"]
    brain = gain[:, model["noise_src"]] @ rng.standard_normal((len(model["noise_src"]), n_times))
    brain *= meg.BRAIN_NOISE_RMS / np.sqrt(np.mean(gain[:, model["noise_src"]] ** 2) *
                                           len(model["noise_src"]))
    raw = mne.io.RawArray(np.vstack([brain + artifacts, exg]),
                          meg._add_channels(info, meg.EXG_CHANNELS), verbose=False)

    params = MegParams()
    times = artifact_events(raw, params)
    for kind, (_, wave, starts, _) in zip(("eog", "ecg"), art.events, strict=True):
        truth = (starts + np.argmax(wave)) / sfreq  # the blink's or the R wave's peak
        truth = truth[(truth > 1) & (truth < n_times / sfreq - 1)]
        error = np.abs(times[kind][:, None] - truth[None]).min(axis=0)
        assert np.mean(error < 0.1) > 0.9, (kind, np.mean(error < 0.1))
    dec = filter_and_decimate(raw.copy().pick("meg"), params)
    part = RecordingEpochs(np.empty((0,)), pd.DataFrame(), dec.info, [], sfreq,
                           artifact_sums(dec, times))
    basis, counts = ssp_basis([part], np.ones(len(gain), bool), params)
    n_types = 2 if system == "neuromag" else 1
    assert basis.shape == (len(gain), 2 * n_types), basis.shape
    assert counts["eog"] > 20 and counts["ecg"] > 120
    # the best possible: the true fields of each sensor type projected out
    exact = np.zeros((len(gain), 0))
    for picks in (mne.pick_types(info, meg="mag"), mne.pick_types(info, meg="grad")):
        for topo in (model["blink_topo"], model["ecg_topo"]):
            v = np.zeros(len(gain))
            v[picks] = topo[picks]
            exact = np.column_stack([exact, v])
    exact = np.linalg.svd(exact[:, np.abs(exact).sum(0) > 0], full_matrices=False)[0]
    for picks in (mne.pick_types(info, meg="mag"), mne.pick_types(info, meg="grad")):
        if not len(picks):
            continue
        left = lambda v, b=basis, p=picks: (  # noqa: E731
            np.linalg.norm(project_out(v, b)[p]) / np.linalg.norm(v[p]))
        assert left(model["blink_topo"]) < 0.1 and left(model["ecg_topo"]) < 0.1
        kept = np.mean([left(f) for f in gain[:, model["noise_src"]].T])
        best = np.mean([left(f, exact) for f in gain[:, model["noise_src"]].T])
        assert kept > best - 0.03, (kept, best)


def test_streamed_windows_equal_offline_causal_epochs(artifact_root, tmp_path):
    """Stream -> windows -> baseline -> artifact projectors -> frozen scaler == offline
    epochs (phase='causal'), on recordings with blinks, heartbeats, EOG and ECG; the report
    says how many projectors came from how many events."""
    from neurorecon.pipelines.evaluate.summary import write_report
    from neurorecon.pipelines.preprocess.meg import prepare_window
    from neurorecon.pipelines.preprocess.run import artifact_projectors

    root = artifact_root / "meg"
    rec = _first_recording(root)
    params = MegParams(phase="causal", average_test_repeats=False)
    pre = preprocess_meg([rec], bids_root=root, spec=EventSpec(), params=params)
    sub = pre.subjects[rec.subject]
    stats = pre.recipe["subjects"][rec.subject]
    ssp = np.array(stats["ssp"]).T
    assert ssp.shape == (sub.X.shape[1], 2)  # a blink and a heartbeat projector (CTF: mags)
    found = artifact_projectors(pre.recipe)[rec.subject]
    assert found["projectors"] == 2 and found["eog"] >= 10 and found["ecg"] >= 10
    report = write_report(tmp_path, {"modality": "meg", "n_test": 1,
                                     "data": {"artifacts": {rec.subject: found}}})
    assert (f"sub-{rec.subject} 2 from {found['eog']} blinks, {found['ecg']} heartbeats"
            in report.read_text())

    raw = mne_bids.read_raw_bids(rec.bids_path, verbose=False)
    raw.pick("meg", exclude=[]).load_data(verbose=False)
    data = raw.get_data()
    stream = StreamingMegFilter(sfreq=raw.info["sfreq"], n_chans=len(data), params=params)
    dec = _stream_in_chunks(stream, data, max_chunk=400, seed=1)
    start = int(round(params.tmin * params.sfreq))
    n_times = sub.X.shape[-1]
    good = sub.channels["good"].to_numpy()
    for row, onset in enumerate(sub.trials["onset"]):
        s = int(round(onset * params.sfreq)) + start
        win = prepare_window(dec[:, s : s + n_times], params,
                             center=np.array(stats["scaler_center"]),
                             scale=np.array(stats["scaler_scale"]), good=good, ssp=ssp)
        np.testing.assert_allclose(win, sub.X[row], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sfreq", [1000.0, 600.614, 2000.0])
def test_causal_preprocessing_at_any_rate_streams_identically(sample_root, sfreq):
    """Causal filtering reaches 120 Hz from any input rate (a Neuromag's 600.614 Hz too): the
    streamed form in random chunks equals the offline one, and the interpolated samples are
    the signal at the output times."""
    from neurorecon.pipelines.preprocess.meg import filter_and_decimate

    rec = _first_recording(sample_root / "meg")
    raw = mne_bids.read_raw_bids(rec.bids_path, verbose=False)
    data = raw.pick("meg", exclude=[]).crop(0, 10).load_data(verbose=False).get_data()[:40]
    raw = mne.io.RawArray(data, mne.create_info(40, sfreq, "mag"), verbose=False)
    params = MegParams(phase="causal", sfreq=120.0)
    offline = filter_and_decimate(raw.copy(), params)
    assert offline.info["sfreq"] == pytest.approx(120.0)
    stream = StreamingMegFilter(sfreq=sfreq, n_chans=40, params=params)
    streamed = _stream_in_chunks(stream, data, max_chunk=97, seed=2)
    assert streamed.shape == offline.get_data().shape
    np.testing.assert_allclose(streamed, offline.get_data(), rtol=1e-9,
                               atol=1e-12 * np.abs(streamed).max())
    # a 10 Hz sine (in the pass band, after the filter's onset) lands on the output times
    t = np.arange(int(20 * sfreq)) / sfreq
    sine = mne.io.RawArray(np.sin(2 * np.pi * 10 * t)[None], mne.create_info(1, sfreq, "mag"),
                           verbose=False)
    out = filter_and_decimate(sine, MegParams(phase="causal", sfreq=120.0, l_freq=None,
                                              h_freq=None))
    expected = np.sin(2 * np.pi * 10 * np.arange(out.n_times) / 120.0)
    np.testing.assert_allclose(out.get_data()[0], expected, atol=0.003)


def test_causal_refuses_to_raise_the_rate():
    from neurorecon.pipelines.preprocess.meg import filter_and_decimate

    raw = mne.io.RawArray(np.zeros((2, 200)), mne.create_info(2, 100.0, "mag"), verbose=False)
    with pytest.raises(DataError, match=r"100 Hz .*preprocess\.meg\.sfreq=120"):
        filter_and_decimate(raw, MegParams(phase="causal", sfreq=120.0))


def test_preprocess_meg_workers_and_cache_folder(sample_root, tmp_path):
    """Two joblib workers writing into a cache folder give the serial in-memory result."""
    root = sample_root / "meg"
    recs = find_recordings(root, modality="meg")
    params = MegParams(h_freq=40.0, l_freq=0.5)
    serial = preprocess_meg(recs, bids_root=root, spec=EventSpec(), params=params)
    two = preprocess_meg(recs, bids_root=root, spec=EventSpec(), params=params,
                         out=tmp_path, n_jobs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub-01", "sub-02"]  # no parts left
    for label, sub in serial.subjects.items():
        assert isinstance(two.subjects[label].X, np.memmap)
        np.testing.assert_array_equal(two.subjects[label].X, sub.X)
        assert two.recipe["subjects"][label] == serial.recipe["subjects"][label]


def _broken_copy(sample_root: Path, dest: Path, *, recordings: bool) -> Path:
    """A copy of the sample MEG dataset that a test may break (its recordings, 45 MB each,
    as empty placeholders unless ``recordings``)."""
    skip = () if recordings else ("*_meg.fif",)
    root = Path(shutil.copytree(sample_root / "meg", dest, ignore=shutil.ignore_patterns(*skip)))
    if not recordings:
        for sidecar in root.rglob("*_meg.json"):
            sidecar.with_suffix(".fif").touch()
    return root


def test_broken_recording_is_named_not_its_events(sample_root, tmp_path, caplog, recwarn):
    """An empty or truncated FIF stops preprocessing with one error naming the file (the
    truncated one with the duration read and the sidecar's), not with a traceback or an
    error blaming the events; MNE's warnings about the broken file stay out of the way, and
    the cache keeps what it held."""
    import json
    import re

    from neurorecon.pipelines.preprocess.run import preprocess_data

    from .conftest import compose_stage

    root = _broken_copy(sample_root, tmp_path / "meg", recordings=True)
    fif = find_recordings(root, modality="meg")[0].fpath
    expected = json.loads(fif.with_suffix(".json").read_text())["RecordingDuration"]
    cfg = compose_stage("preprocess", tmp_path, ["data=bids", f"data.root={root}"])
    earlier = Path(cfg.paths.cache_dir) / "preproc" / "earlier-entry"
    earlier.mkdir(parents=True)
    (earlier / "X.npy").write_bytes(b"kept")

    whole = fif.read_bytes()
    fif.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError) as err:
        preprocess_data(cfg.data, cfg.preprocess, cache_dir=cfg.paths.cache_dir)
    first = str(err.value).splitlines()[0]
    read = re.fullmatch(rf"{re.escape(str(fif))}: truncated recording: (\d+\.\d\d) s read, but "
                        rf"{fif.stem}\.json gives RecordingDuration {expected:.2f} s", first)
    assert read and 0 < float(read[1]) < expected - 10, first
    assert not [w for w in recwarn if "Invalid tag" in str(w.message)]
    assert not [r for r in caplog.records if r.name == "neurorecon"]

    fif.write_bytes(b"")
    with pytest.raises(DataError) as err:
        preprocess_data(cfg.data, cfg.preprocess, cache_dir=cfg.paths.cache_dir)
    assert str(err.value) == f"{fif}: empty MEG recording (0 bytes)"
    # nothing written before is lost, nothing half-written is left
    assert (earlier / "X.npy").read_bytes() == b"kept"
    assert [p.name for p in earlier.parent.iterdir()] == ["earlier-entry"]


def test_missing_recording_is_an_error_or_a_listed_skip(sample_root, tmp_path, caplog):
    """A run whose events file exists but whose recording does not is an error naming the
    missing file; with ``missing_runs="warn"`` the run is left out with a warning naming it."""
    root = _broken_copy(sample_root, tmp_path / "meg", recordings=False)
    missing = "sub-02/ses-01/meg/sub-02_ses-01_task-images_run-01_meg.*"
    (root / missing).with_suffix(".fif").unlink()
    with pytest.raises(DataError) as err:
        find_recordings(root, modality="meg")
    assert str(err.value).splitlines() == [
        f"{root}: 1 run(s) have an events file but no recording: {missing}",
        "  -> restore the recording(s), or set data.missing_runs=warn to leave these runs out"]
    with caplog.at_level("WARNING", logger="neurorecon"):
        recordings = find_recordings(root, modality="meg", missing_runs="warn")
    assert [r.subject for r in recordings] == ["01"]
    assert f"1 run(s) left out, their events file has no recording: {missing}" in caplog.text
