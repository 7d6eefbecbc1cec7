"""The datasets the project writes pass the official BIDS validator (bids-validator-deno, from
PyPI), and ``neurorecon validate`` reports what it finds in a user's dataset."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from neurorecon.pipelines.data.validate import validate_bids
from neurorecon.pipelines.sample.bids_meta import NOT_APPLICABLE
from neurorecon.pipelines.sample.run import make_sample

from .conftest import compose_stage
from .test_cli import NEURORECON


def _assert_valid(root) -> None:
    """No errors, and no warnings but the ones a simulated dataset cannot avoid."""
    issues = validate_bids(root)
    errors = [i.line() for i in issues if i.severity == "error"]
    avoidable = [i.line() for i in issues if i.severity != "error"
                 and (i.code, i.sub_code) not in NOT_APPLICABLE]
    assert not errors, errors
    assert not avoidable, avoidable


@pytest.mark.parametrize("modality", ["meg", "fmri"])
def test_sample_dataset_is_valid_bids(sample_root, modality):
    _assert_valid(sample_root / modality)


@pytest.mark.parametrize("system", ["neuromag", "ctf151"])
def test_random_family_draw_is_valid_bids(system, tmp_path):
    """A draw of the randomized family on each other sensor system (a few trials, a
    non-integer rate for the Neuromag one)."""
    rate = 600.614 if system == "neuromag" else 2000.0
    cfg = compose_stage("sample", tmp_path, [
        "sample=random", "sample.seed=3", f"sample.random.systems=[{system}]",
        f"sample.random.sfreqs=[{rate}]", "sample.random.n_concepts=4",
        "sample.random.train_trials=[8,8]", "sample.random.n_test_exemplars=[1,1]",
        "sample.random.n_test_repeats=[1,1]", "sample.random.n_subjects=[1,1]",
        "sample.meg.n_runs=1"])
    root = make_sample(cfg.sample, tmp_path / "data" / "random")
    meta = json.loads((root / "meg" / "sub-01" / "ses-01" / "meg"
                       / "sub-01_ses-01_task-images_run-01_meg.json").read_text())
    assert meta["Manufacturer"] == ("Elekta" if system == "neuromag" else "CTF")
    _assert_valid(root / "meg")


def test_random_family_fmri_draw_is_valid_bids_and_has_the_drawn_physics(tmp_path):
    """An fMRI-only draw of the family: the BOLD runs have the drawn TR and voxel size, the
    root's description carries the drawn values, and the official validator passes it."""
    import nibabel as nib

    from neurorecon.pipelines.sample.family import draw_parameters

    cfg = compose_stage("sample", tmp_path, [
        "sample=random", "sample.seed=5", "sample.fmri.enabled=true", "sample.meg.enabled=false",
        "sample.random.n_concepts=4", "sample.random.train_trials=[8,8]",
        "sample.random.n_test_exemplars=[1,1]", "sample.random.n_test_repeats=[1,1]",
        "sample.random.n_subjects=[1,1]", "sample.random.fmri.voxel_size=[5,6]"])
    root = make_sample(cfg.sample, tmp_path / "data" / "random")
    drawn = json.loads((root / "sample_config.json").read_text())["draw"]
    assert drawn == draw_parameters(cfg.sample.random, 5, fmri=True)
    assert not (root / "meg").exists()
    fmri = drawn["fmri"]
    img = nib.load(root / "fmri" / "sub-01" / "func" / "sub-01_task-images_run-01_bold.nii.gz")
    assert img.header.get_zooms() == pytest.approx((*[fmri["voxel_sizes"][0]] * 3, fmri["tr"]))
    description = json.loads((root / "fmri" / "dataset_description.json").read_text())
    params = json.loads(description["GeneratedBy"][0]["Description"].split("parameters: ", 1)[1])
    assert {k: params["fmri"][k] for k in fmri} == fmri
    _assert_valid(root / "fmri")


def test_validate_stage_names_the_problem(sample_root, tmp_path):
    """A sidecar without its required fields: ``validate`` fails in one line naming the
    field and the file."""
    root = tmp_path / "fmri"
    shutil.copytree(sample_root / "fmri", root)
    sidecar = root / "sub-01" / "func" / "sub-01_task-images_run-01_bold.json"
    meta = json.loads(sidecar.read_text())
    del meta["RepetitionTime"]
    sidecar.write_text(json.dumps(meta))
    proc = subprocess.run([*NEURORECON, "validate", "data=bids", f"data.root={root}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "RepetitionTime" in proc.stderr
    assert "sub-01_task-images_run-01_bold" in proc.stderr
    assert "Traceback" not in proc.stderr
