"""The `run` contract on a BIDS dataset that is not shaped like our sample data.

Another sensor system (Neuromag-306: magnetometers + planar gradiometers) at another rate
(1000 Hz, a non-integer ratio to 120 Hz), three subjects, another TR and voxel grids, and
another events column marking the split.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from .conftest import compose_stage
from .test_train import FAST, SMALL_FMRI, SMALL_MEG, _check_contract


@pytest.fixture(scope="module")
def other_root(tmp_path_factory) -> Path:
    from neurorecon.pipelines.sample.run import make_sample

    root = tmp_path_factory.mktemp("other")
    cfg = compose_stage("sample", root, [
        "sample=tiny", "sample.meg.system=neuromag", "sample.meg.sfreq=1000",
        "sample.meg.n_subjects=3", "sample.meg.line_freq=60", "sample.fmri.n_subjects=3",
        "sample.fmri.tr=2.0", "sample.fmri.voxel_sizes=[7.0,9.0,11.0]", "sample.seed=7"])
    out = make_sample(cfg.sample, root / "data" / "other")
    # their lab marks the split in another column with other values
    for events in out.rglob("*_events.tsv"):
        table = pd.read_csv(events, sep="\t")
        table["set"] = table.pop("trial_type").map({"test": "heldout", "train": "training"})
        table.to_csv(events, sep="\t", index=False, na_rep="n/a")
    return out


@pytest.mark.parametrize("modality", [pytest.param("meg", marks=pytest.mark.slow), "fmri"])
def test_run_on_another_labs_dataset(other_root, tmp_path, modality):
    from neurorecon.pipelines.run import run

    small = SMALL_MEG if modality == "meg" else SMALL_FMRI
    cfg = compose_stage("run", tmp_path, [
        "data=bids", f"data.root={other_root / modality}", f"data.modality={modality}",
        "data.split_column=set", "data.test_value=heldout", *FAST, *small])
    metrics = run(cfg)
    _check_contract(json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text()),
                    modality)
    assert metrics["subjects"] == ["01", "02", "03"]
    assert metrics["n_test"] == 3 * 4  # 4 test images per subject, repeats averaged
