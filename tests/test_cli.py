"""The `neurorecon` command line, the Hydra config tree and the packaging."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
NEURORECON = [sys.executable, "-m", "neurorecon.serve.cli"]  # the installed `neurorecon`


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*NEURORECON, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_usage_lists_stages(tmp_path):
    out = _run("--help", cwd=tmp_path)
    assert out.returncode == 0
    for stage in ("sample", "preprocess", "embed", "run", "serve", "key"):
        assert re.search(rf"^\s+{stage}\s", out.stdout, re.M)
    bad = _run("nonsense", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown stage 'nonsense'" in bad.stderr


@pytest.mark.parametrize("stage", ["sample", "preprocess", "embed"])
def test_stage_help_and_cfg_job(stage, tmp_path):
    help_ = _run(stage, "--help", cwd=tmp_path)
    assert help_.returncode == 0 and "Configuration groups" in help_.stdout
    cfg = _run(stage, "--cfg", "job", cwd=tmp_path)
    assert cfg.returncode == 0 and "paths:" in cfg.stdout


def test_every_config_option_composes():
    """Each option of every group composes into the stage that uses it."""
    configs = REPO / "configs"
    with initialize_config_module("neurorecon.configs", version_base="1.3"):
        for data in sorted(p.stem for p in (configs / "data").glob("*.yaml")):
            compose("preprocess", overrides=[f"data={data}", "data.root=/x"])
        for emb in sorted(p.stem for p in (configs / "embedder").glob("*.yaml")):
            cfg = compose("embed", overrides=[f"embedder={emb}"])
            assert cfg.embedder._target_.startswith("neurorecon.")
        for sample in sorted(p.stem for p in (configs / "sample").glob("*.yaml")):
            compose("sample", overrides=[f"sample={sample}"])


def _keys(tree: dict, depth: int = 2) -> set[str]:
    """The dotted keys of ``tree`` down to ``depth`` levels."""
    out = set()
    for key, value in tree.items():
        out.add(key)
        if depth > 1 and isinstance(value, dict):
            out |= {f"{key}.{sub}" for sub in _keys(value, depth - 1)}
    return out


MODALITY_KEYS = {"meg": {"preprocess.meg", "encoder.meg", "refit.meg", "ensemble.meg", "focus.meg",
                         "readout.meg", "adaptation.meg", "objective.meg"},
                 "fmri": {"preprocess.fmri", "encoder.fmri", "refit.fmri", "ensemble.fmri",
                          "adaptation.fmri", "objective.fmri", "data.fmri_input",
                          "data.betas_glob"}}


@pytest.mark.parametrize("overrides, modality", [
    ([], "meg"), (["data=sample_fmri"], "fmri"), (["data=bids", "data.modality=fmri"], "fmri"),
    (["modality=fmri"], "fmri"), (["data=bids", "data.modality=meg"], "meg"),
], ids=["default", "sample-fmri", "data.modality", "group", "bids-meg"])
def test_a_config_holds_the_options_of_its_modality_only(tmp_path, overrides, modality):
    """The modality is a config group that pulls in its own preprocess, encoder and fit
    options; data.modality=<m> on the command line chooses it as the group does."""
    from neurorecon.pipelines.cli import modality_overrides

    with initialize_config_module("neurorecon.configs", version_base="1.3"):
        cfg = compose("run", overrides=modality_overrides([*overrides, "data.root=/x"]))
    keys = _keys(OmegaConf.to_container(cfg))
    other = "fmri" if modality == "meg" else "meg"
    assert cfg.data.modality == modality
    assert MODALITY_KEYS[modality] <= keys, MODALITY_KEYS[modality] - keys
    assert not MODALITY_KEYS[other] & keys, MODALITY_KEYS[other] & keys


def test_modality_overrides_sweeps_and_disagreement():
    from neurorecon.models.common.checks import DataError
    from neurorecon.pipelines.cli import modality_overrides

    # in place (Hydra's parser takes overrides on one side of its flags), the last one counts
    assert modality_overrides(["a=1", "data.modality=fmri", "--cfg", "job"]) == [
        "a=1", "modality=fmri", "--cfg", "job"]
    assert modality_overrides(["data.modality=fmri", "data.modality=meg"]) == ["modality=meg"]
    assert modality_overrides(["data.modality=meg,fmri"]) == ["modality=meg,fmri"]
    assert modality_overrides(["modality=fmri", "data.modality=fmri"]) == ["modality=fmri"]
    with pytest.raises(DataError, match="data.modality=meg disagrees with modality=fmri"):
        modality_overrides(["modality=fmri", "data.modality=meg"])
    with pytest.raises(DataError, match="Invalid value for 'data.modality': 'eeg'"):
        modality_overrides(["data.modality=meg,eeg"])


def test_bad_input_reaches_the_user_without_traceback(tmp_path):
    out = _run("preprocess", "data=bids", f"data.root={tmp_path / 'missing'}", cwd=tmp_path)
    assert out.returncode == 2
    assert "BIDS root does not exist" in out.stderr and str(tmp_path / "missing") in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "trainer.max_epoch=2"],
     "no config key 'trainer.max_epoch'; did you mean trainer.max_epochs?"),
    (["run", "data=bidz"], "config group 'data' has no option 'bidz' (did you mean 'bids'?); "
     "available: bids, sample_fmri, sample_meg"),
    (["run", "data=sample_fmri", "focus.meg=null"], "no config key 'focus.meg': an option of "
     "the meg modality, which modality=meg (or data.modality=meg) chooses"),
    (["preprocess", "preprocess.fmri.glm=lss"], "no config key 'preprocess.fmri.glm': an option "
     "of the fmri modality, which modality=fmri (or data.modality=fmri) chooses"),
], ids=["key", "group-option", "other-modality", "other-modality-group"])
def test_config_typos_in_one_line(tmp_path, args, message):
    """A mistyped key or config group option stops Hydra's composition with one line (exit
    2) that names it and what exists, before any run directory is made."""
    out = _run(*args, f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.splitlines() == [f"[neurorecon] error: {message}"]
    assert not (tmp_path / "runs").exists()


def test_every_subpackage_is_packaged():
    """A folder with an __init__.py, or a config group (a folder of YAML files), that pyproject
    does not list would be missing once installed."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(project["packages"])
    mapping = project["package-dir"]
    found = set()
    for pkg, folder in mapping.items():
        for marker in ("__init__.py", "*.yaml"):
            for path in (REPO / folder).rglob(marker):
                rel = path.parent.relative_to(REPO / folder).parts
                found.add(".".join([pkg, *rel]))
    assert found == listed


def test_multirun_sweep(tmp_path):
    """`--multirun` launches one job per value, each in its own run directory."""
    out = _run("sample", "--multirun", "sample=tiny", "sample.seed=1,2", "sample.meg.enabled=false",
               "sample.fmri.n_runs=1", "sample.fmri.n_subjects=1",
               "sample.out_dir=${hydra:runtime.output_dir}/data", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    sweeps = list((tmp_path / "runs" / "sample").glob("multirun_*"))
    assert len(sweeps) == 1
    configs = sorted(sweeps[0].glob("*/data/sample_config.json"))
    assert len(configs) == 2
    seeds = sorted(json.loads(p.read_text())["config"]["seed"] for p in configs)
    assert seeds == [1, 2]


def test_service_commands_fail_in_one_line(tmp_path):
    """`neurorecon key` prints a key once and keeps its hash; `neurorecon serve` with a bundle
    that does not load stops with one line naming it."""
    keys = tmp_path / "keys.txt"
    out = _run("key", "key.name=lab", f"key.file={keys}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("nr_") and key not in keys.read_text()
    again = _run("key", "key.name=lab", f"key.file={keys}", cwd=tmp_path)
    assert again.returncode == 2 and "exists already" in again.stderr
    bad = _run("serve", f"serve.bundles=[{tmp_path / 'nope'}]", f"serve.api_keys_file={keys}",
               cwd=tmp_path)
    assert bad.returncode == 2 and f"cannot load bundle {tmp_path / 'nope'}" in bad.stderr
    assert "Traceback" not in bad.stderr
    nokeys = _run("serve", f"serve.bundles=[{tmp_path}]", cwd=tmp_path)  # default key file
    assert nokeys.returncode == 2 and "API key file not found" in nokeys.stderr
    assert "neurorecon key key.name=" in nokeys.stderr
