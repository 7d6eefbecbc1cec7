"""Every enumerated config option is checked before any work, with a one-line error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from neurorecon.models.common.checks import DataError
from neurorecon.pipelines.config_checks import OPTIONS, check_config

from .conftest import compose_stage


def test_every_option_is_checked(tmp_path):
    cfg = compose_stage("run", tmp_path)
    check_config(cfg)  # the defaults pass
    walked = 0
    for key, allowed in OPTIONS.items():
        if key == "data.fmri_input":  # in the bids group only
            cfg_k = compose_stage("run", tmp_path, ["data=bids", f"{key}=bogus"])
        else:
            cfg_k = compose_stage("run", tmp_path, [f"{key}=bogus"])
        with pytest.raises(DataError) as err:
            check_config(cfg_k)
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


def test_cli_stops_before_any_work_with_one_line(tmp_path):
    exe = Path(sys.executable).parent / "neurorecon"
    out = subprocess.run([str(exe), "run", "data=bids", f"data.root={tmp_path}",
                          "data.modality=eeg", f"paths.root_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "Invalid value for 'data.modality': 'eeg'. Allowed values: ['meg', 'fmri']" in \
        out.stderr
    assert not (tmp_path / "cache").exists()  # nothing was computed
