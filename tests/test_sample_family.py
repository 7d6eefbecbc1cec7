"""The randomized family of MEG and fMRI datasets (``sample=random``): draws, what they write."""

from __future__ import annotations

import json
from pathlib import Path

import mne_bids
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from neurorecon.pipelines.sample import meg
from neurorecon.pipelines.sample.family import draw_parameters

from .conftest import compose_stage

RANGES = OmegaConf.load(Path(__file__).parents[1] / "configs" / "sample" / "random.yaml").random


def test_draws_are_reproducible_varied_and_inside_the_ranges():
    draws = [draw_parameters(RANGES, k) for k in range(24)]
    assert draw_parameters(RANGES, 5) == draws[5]
    megs = [d["meg"] for d in draws]
    for key, bounds in (("concept_peak", RANGES.concept_peak), ("snr", RANGES.snr),
                        ("latency_jitter", RANGES.latency_jitter),
                        ("lowlevel_peak", RANGES.lowlevel_peak),
                        ("blink_after_image", RANGES.blink_after_image),
                        ("ecg_gain", RANGES.ecg_gain)):
        values = np.array([m[key] for m in megs])
        assert values.min() >= bounds[0] and values.max() <= bounds[1], key
        assert values.max() - values.min() > 0.5 * (bounds[1] - bounds[0]), key  # spread out
    assert {m["system"] for m in megs} == set(RANGES.systems)
    assert {m["sfreq"] for m in megs} == set(RANGES.sfreqs)
    assert {m["n_subjects"] for m in megs} == set(range(RANGES.n_subjects[0],
                                                        RANGES.n_subjects[1] + 1))
    trials = [d["stimuli"]["n_train_exemplars"] * RANGES.n_concepts for d in draws]
    assert min(trials) < 600 and max(trials) > 1400
    # the fMRI of a draw: inside its ranges, one voxel size per subject, and the MEG unchanged
    fmris = [draw_parameters(RANGES, k, fmri=True) for k in range(24)]
    for d, f in zip(draws, fmris, strict=True):
        assert {k: v for k, v in f.items() if k != "fmri"} == d
        fm = f["fmri"]
        assert len(fm["voxel_sizes"]) == fm["n_subjects"] == d["meg"]["n_subjects"]
        assert fm["image_duration"] <= fm["soa"][0] - 0.5 + 1e-9 <= fm["soa"][1]
    for key in ("tr", "snr", "hrf_onset", "noise", "noise_ar", "noise_fwhm"):
        values = np.array([f["fmri"][key] for f in fmris])
        lo, hi = RANGES.fmri[key]
        assert lo - 0.01 <= values.min() and values.max() <= hi + 0.01, key
        assert values.max() - values.min() > 0.5 * (hi - lo), key
    # narrowing one range changes that parameter only
    narrow = OmegaConf.merge(RANGES, {"n_subjects": [1, 1]})
    for k in range(3):
        a, b = draws[k], draw_parameters(narrow, k)
        assert b["meg"]["n_subjects"] == 1
        assert {**a["meg"], "n_subjects": 1} == b["meg"] and a["stimuli"] == b["stimuli"]


def test_image_codes_are_per_concept_or_per_image(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for concept in ("a", "b"):
        for k in range(3):
            f = f"{concept}{k}.png"
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f)
            rows.append({"stim_file": f, "concept": concept})
    stimuli = pd.DataFrame(rows)
    shared = meg._image_codes(tmp_path, stimuli, seed=1, concept_share=1.0)
    np.testing.assert_array_equal(shared["a0.png"], shared["a2.png"])
    assert not np.allclose(shared["a0.png"], shared["b0.png"])
    mixed = meg._image_codes(tmp_path, stimuli, seed=1, concept_share=0.3)
    assert not np.allclose(mixed["a0.png"], mixed["a2.png"])
    # the concept part is still there: same-concept codes correlate more than across concepts
    corr = np.corrcoef(np.stack([mixed[f] for f in stimuli["stim_file"]]))
    same = np.mean([corr[i, j] for i in range(6) for j in range(6)
                    if i < j and i // 3 == j // 3])
    other = np.mean([corr[i, j] for i in range(3) for j in range(3, 6)])
    assert same > other + 0.2


def test_a_draw_writes_its_physics_and_records_its_parameters(tmp_path):
    from neurorecon.pipelines.sample.run import make_sample

    cfg = compose_stage("sample", tmp_path, [
        "sample=random", "sample.seed=3", "sample.random.n_concepts=4",
        "sample.random.train_trials=[16,16]", "sample.random.n_test_exemplars=[1,1]",
        "sample.random.n_test_repeats=[1,1]", "sample.random.n_subjects=[1,1]",
        "sample.random.sfreqs=[600.614]", "sample.random.systems=[ctf151]",
        "sample.random.concept_share=[0.5,0.5]"])
    out = make_sample(cfg.sample, tmp_path / "draw")
    drawn = json.loads((out / "sample_config.json").read_text())["draw"]
    assert drawn == draw_parameters(cfg.sample.random, 3)
    assert drawn["meg"]["sfreq"] == 600.614 and drawn["meg"]["concept_share"] == 0.5
    description = json.loads((out / "meg" / "dataset_description.json").read_text())
    params = description["GeneratedBy"][0]["Description"].split("parameters: ", 1)[1]
    assert json.loads(params) == json.loads(json.dumps(drawn, sort_keys=True))
    assert not (out / "fmri").exists()
    path = mne_bids.BIDSPath(subject="01", session="01", task="images", run="01",
                             datatype="meg", root=out / "meg")
    raw = mne_bids.read_raw_bids(path, verbose=False)
    assert raw.info["sfreq"] == pytest.approx(600.614)
    assert len(mne_bids_picks := raw.copy().pick("meg").ch_names) in (151, 152)
    assert all(name.startswith("M") for name in mne_bids_picks)
    events = pd.read_csv(str(path.copy().update(suffix="events", extension=".tsv")), sep="\t")
    assert (events["trial_type"] == "train").sum() == 16


@pytest.mark.parametrize("n_stages", [1, 3])
def test_concept_stages_move_the_codes_sensor_pattern_over_time(n_stages):
    """One stage: one sensor pattern of the image code, scaled in time; a chain of stages
    (``concept_stages``): the pattern at the last stage's peak is another one."""
    rng = np.random.default_rng(0)
    n_meg, n_src, n_feat = 40, 60, 10
    model = {"gain": rng.standard_normal((n_meg, n_src)), "onset_src": np.arange(5),
             "onset_w": np.ones(5), "low_src": np.arange(5, 10),
             "low_W": rng.standard_normal((5, n_feat)),
             "stages": [(rng.choice(n_src, 20, replace=False),
                         rng.standard_normal((20, meg.N_CODE))) for _ in range(n_stages)]}
    cfg = OmegaConf.create({
        "sfreq": 200.0, "lowlevel_peak": 0.1, "lowlevel_width": 0.03, "lowlevel_gain": 1.0,
        "concept_peak": 0.25, "concept_width": 0.03, "concept_gain": 1.0,
        "concept_stage_spacing": 0.15, "image_duration": 0.5, "snr": 1.0,
        "latency_jitter": 0.0})
    trials = pd.DataFrame({"stim_file": ["a", "b"], **{f"ll{j}": [0.0, 0.0]
                                                        for j in range(n_feat)}})
    codes = {"a": rng.standard_normal(meg.N_CODE), "b": rng.standard_normal(meg.N_CODE)}
    evoked = meg._Evoked(model, trials, codes, np.array([1.0, 4.0]), cfg=cfg, rng=rng)
    evoked.trial_gain[:] = 1.0
    data = evoked(0, 1600)
    # the response to image a minus that to image b: only the code's part is left
    code_part = lambda t: data[:, int((1.0 + t) * 200)] - data[:, int((4.0 + t) * 200)]  # noqa: E731
    first, last = code_part(0.25), code_part(0.25 + 0.15 * (n_stages - 1) or 0.4)
    r = abs(np.corrcoef(first, last)[0, 1])
    assert r > 0.999 if n_stages == 1 else r < 0.6
    assert np.linalg.norm(first) > 0 and np.linalg.norm(last) > 0


def test_artifacts_blink_after_images_and_beat_like_a_heart():
    """Blinks (``blink_after_image=1``: one in the pause after every image, none during it)
    through the eyes' field, heartbeats at 55-85 per minute through the heart's; the same data
    whatever the block size; none at all in a config without artifacts (the fixed presets)."""
    n_meg, sfreq = 30, 200.0
    rng = np.random.default_rng(0)
    model = {"blink_topo": rng.standard_normal(n_meg), "ecg_topo": rng.standard_normal(n_meg)}
    onsets = 2.0 + 1.5 * np.arange(20)
    n_times = int(35 * sfreq)
    base = {"sfreq": sfreq, "image_duration": 0.5, "blink_gain": 1.0}
    cfg = OmegaConf.create({**base, "blink_rate": 0.0, "blink_after_image": 1.0,
                            "ecg_gain": 0.0})
    art = lambda: meg._Artifacts.of(model, onsets, n_times, cfg=cfg,  # noqa: E731
                                    rng=np.random.default_rng(1))
    data, exg = art()(0, n_times)
    blink = np.abs(data.T @ model["blink_topo"]) / np.linalg.norm(model["blink_topo"])
    for onset in onsets[:-1]:
        during = blink[int(onset * sfreq):int((onset + 0.5) * sfreq)]
        pause = blink[int((onset + 0.5) * sfreq):int((onset + 1.5) * sfreq)]
        assert pause.max() > 0.3 * meg.BLINK_RMS * np.sqrt(n_meg)
        assert during.max() < 1e-3 * pause.max()
        # the EOG channel sees each blink far above its noise, and nothing during the image
        eog = exg[0]
        assert eog[int((onset + 0.5) * sfreq):int((onset + 1.5) * sfreq)].max() > 10 * \
            meg.EOG_NOISE_RMS
        assert np.abs(eog[int(onset * sfreq):int((onset + 0.5) * sfreq)]).max() < 5 * \
            meg.EOG_NOISE_RMS
    fresh = art()
    parts = [fresh(a, min(a + 333, n_times)) for a in range(0, n_times, 333)]
    np.testing.assert_allclose(np.concatenate([p[0] for p in parts], axis=1), data)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts], axis=1), exg)

    cfg = OmegaConf.create({**base, "blink_rate": 0.0, "blink_after_image": 0.0,
                            "ecg_gain": 1.0})
    heart = meg._Artifacts.of(model, onsets, n_times, cfg=cfg, rng=np.random.default_rng(2))
    data, exg = heart(0, n_times)
    for trace in (data.T @ model["ecg_topo"], exg[1]):  # at the sensors, on the ECG channel
        peaks = np.flatnonzero((trace[1:-1] > trace[:-2]) & (trace[1:-1] >= trace[2:])
                               & (trace[1:-1] > 0.5 * trace.max())) + 1
        assert 55 <= 60 / np.median(np.diff(peaks) / sfreq) <= 85
        assert len(peaks) >= 35 * 55 / 60 - 2

    none = OmegaConf.create({**base, "blink_rate": 0.0, "blink_after_image": 0.0,
                             "ecg_gain": 0.0})
    assert meg._Artifacts.of(model, onsets, n_times, cfg=none, rng=rng) is None
