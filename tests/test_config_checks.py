"""Every enumerated config option is checked before any work, with a one-line error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from neurorecon.models.common.checks import DataError
from neurorecon.pipelines.config_checks import NUMBERS, OPTIONS, check_config

from .conftest import compose_stage


def composed(tmp_path, stage: str, key: str, value):
    """``stage``'s config with ``key=value``, composed for the modality the key belongs to."""
    fmri = ".fmri." in f".{key}." or key.startswith("data.fmri_")
    return compose_stage(stage, tmp_path, [*(["data.modality=fmri"] if fmri else []),
                                           f"{key}={value}"])


def test_every_option_is_checked(tmp_path):
    for modality in ("meg", "fmri"):  # the defaults pass
        check_config(compose_stage("run", tmp_path, [f"data.modality={modality}"]))
    walked = 0
    for key, allowed in OPTIONS.items():
        with pytest.raises(DataError) as err:  # data.modality: when the command is read
            check_config(composed(tmp_path, "run", key, "bogus"))
        msg = str(err.value)
        assert "\n" not in msg and key in msg and "'bogus'" in msg, msg
        assert all(repr(a) in msg for a in allowed), msg
        walked += 1
    assert walked == len(OPTIONS)
    bad_focus = compose_stage("run", tmp_path, ["focus.meg=[0.1]"])
    with pytest.raises(DataError, match=r"focus\.meg.*\[tmin, tmax\]"):
        check_config(bad_focus)
    bad_gen = compose_stage("run", tmp_path, ["reconstruct/generator=stable_unclip",
                                              "reconstruct.generator._target_=a.b.NoSuch"])
    with pytest.raises(DataError, match="StableUnclipGenerator"):
        check_config(bad_gen)


def test_every_number_is_checked(tmp_path):
    """A number out of range stops with one line naming the key, the value and the range."""
    for key in NUMBERS:
        stage = "replay" if key.startswith("replay.") else "run"
        with pytest.raises(DataError) as err:
            check_config(composed(tmp_path, stage, key, -5))
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"Invalid value for '{key}': -5. "), msg
    bad_item = compose_stage("run", tmp_path, ["readout.meg.bin_widths=[0.05,0]"])
    with pytest.raises(DataError, match=r"'readout\.meg\.bin_widths\[1\]': 0\. Allowed values: "
                       r"a number > 0\."):
        check_config(bad_item)


@pytest.mark.parametrize("overrides, message", [
    (["preprocess.meg.tmax=-1"], "'preprocess.meg.tmax': -1. Allowed values: a number > -0.5 "
     "(preprocess.meg.tmin is -0.5 s)."),
    (["preprocess.meg.sfreq=0"], "'preprocess.meg.sfreq': 0. Allowed values: a number > 0."),
    (["preprocess.meg.l_freq=30", "preprocess.meg.h_freq=20"],
     "'preprocess.meg.h_freq': 20. Allowed values: null or a number in (30, 60) (above "
     "preprocess.meg.l_freq and below the Nyquist frequency of preprocess.meg.sfreq=120 Hz"),
    (["preprocess.meg.h_freq=100"], "'preprocess.meg.h_freq': 100. Allowed values: null or a "
     "number in (0.1, 60)"),
    (["preprocess.meg.l_freq=-1"], "'preprocess.meg.l_freq': -1."),
    (["preprocess.meg.baseline=[0.2,0.1]"], "'preprocess.meg.baseline[1]': 0.1. Allowed "
     "values: null or a number in [0.2, 1]"),
    (["preprocess.meg.iir_order=2.5"], "'preprocess.meg.iir_order': 2.5. Allowed values: an "
     "integer >= 1."),
    (["preprocess.meg.clamp=0"], "'preprocess.meg.clamp': 0. Allowed values: null or a "
     "number > 0."),
    (["data.modality=fmri", "preprocess.fmri.high_pass=0"],
     "'preprocess.fmri.high_pass': 0. Allowed values: a number > 0."),
    (["data.modality=fmri", "preprocess.fmri.smoothing_fwhm=-4"],
     "'preprocess.fmri.smoothing_fwhm': -4."),
    (["data.modality=fmri", "preprocess.fmri.hrf_onset=9"],
     "'preprocess.fmri.hrf_onset': 9. Allowed values: 'auto' or a number in [-3, 6]."),
    (["data.modality=fmri", "preprocess.fmri.hrf_model=glover + derivative"],
     "'preprocess.fmri.hrf_onset': 'auto'. Allowed values: 0 with hrf_model='glover + "
     "derivative' (a delay, or auto, shifts one canonical HRF: hrf_model one of ['glover', "
     "'spm'])."),
])
def test_recipe_values_are_checked(tmp_path, overrides, message):
    """The preprocessing recipes are checked by the code that reads them, before any work."""
    with pytest.raises(DataError) as err:
        check_config(compose_stage("run", tmp_path, overrides))
    assert str(err.value).startswith(f"Invalid value for {message}"), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("args, message", [
    (["run", "data=bids", "data.modality=eeg"],
     "Invalid value for 'data.modality': 'eeg'. Allowed values: ['meg', 'fmri']."),
    (["preprocess", "data=bids", "preprocess.meg.tmax=-1"],
     "Invalid value for 'preprocess.meg.tmax': -1. Allowed values: a number > -0.5 "
     "(preprocess.meg.tmin is -0.5 s)."),
], ids=["option", "number"])
def test_cli_stops_before_any_work_with_one_line(tmp_path, args, message):
    exe = Path(sys.executable).parent / "neurorecon"
    out = subprocess.run([str(exe), *args, f"data.root={tmp_path}", f"paths.root_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.splitlines() == [f"[neurorecon] error: {message}"]
    assert not (tmp_path / "cache").exists()  # nothing was computed
