"""Training and the `run` contract through the real configs, scaled down (CPU, few epochs)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neurorecon.models.common.checks import DataError

from .conftest import compose_stage

SMALL_MEG = ["encoder.meg.hidden_dim=16", "encoder.meg.depth=2", "encoder.meg.n_virtual_chans=16",
             "encoder.meg.n_fourier=4"]
SMALL_FMRI = ["encoder.fmri.hidden_dim=32", "encoder.fmri.n_blocks=1"]
FAST = ["trainer.max_epochs=3", "trainer.min_epochs=1", "datamodule.batch_size=8",
        "evaluate.time_resolved=false", "trainer.enable_progress_bar=false",
        "reconstruct.enabled=false"]


def _check_contract(metrics: dict, modality: str) -> None:
    assert metrics["modality"] == modality and metrics["n_test"] > 0
    assert isinstance(metrics["embedder"], str)
    r = metrics["retrieval"]
    for name in ("encoder", "ridge"):
        for key in ("top1", "top5", "median_rank", "rel_median_rank"):
            assert key in r[name]
        assert 0 <= r[name]["top1"] <= r[name]["top5"] <= 1
        assert r[name]["median_rank"] >= 1
        assert r[name]["median_rank"] <= r[name]["n_candidates"]
    assert r["chance"]["top1"] == pytest.approx(1 / r["chance"]["n_candidates"])


@pytest.mark.parametrize("modality", [pytest.param("meg", marks=pytest.mark.slow), "fmri"])
def test_run_contract_on_sample(sample_root, tmp_path, modality):
    from neurorecon.pipelines.run import run

    small = SMALL_MEG if modality == "meg" else SMALL_FMRI
    extra = (["evaluate.time_resolved=true", "evaluate.time_resolved_deep=true",
              "evaluate.time_resolved_deep_step=0.5"] if modality == "meg" else [])
    cfg = compose_stage("run", tmp_path, ["data=bids", f"data.root={sample_root / modality}",
                                          f"data.modality={modality}", *FAST, *small, *extra])
    metrics = run(cfg)
    out = Path(cfg.paths.output_dir)
    on_disk = json.loads((out / "metrics.json").read_text())
    _check_contract(on_disk, modality)
    assert on_disk["retrieval"] == metrics["retrieval"]
    # every run of the dataset was used; no EOG/ECG channels, no artifact projectors; fMRI:
    # each subject's HRF delay, chosen on its runs (hrf_onset=auto), in the report too
    delays = on_disk["data"].pop("hrf_delay", None)
    assert on_disk["data"] == {"skipped_runs": [], "artifacts": {}}
    if modality == "fmri":
        assert set(delays) == {"01", "02"}
        for d in delays.values():
            assert d["hrf_onset"] in [float(k) for k in d["explained"]]
        assert "HRF delay" in (out / "report.md").read_text()
    else:
        assert delays is None
    assert (out / "retrieval_examples.png").stat().st_size > 10_000
    # the tiny sample's validation holds 2 images: too few to rank epochs by retrieval, so the
    # epoch is selected on validation loss (not the first epoch by a saturated score)
    assert metrics["training"]["best_epoch"] >= 1, metrics["training"]
    # the checkpoint describes itself: enough to run inference later without this config
    ckpt = torch.load(metrics["training"]["best_checkpoint"], map_location="cpu",
                      weights_only=False)
    desc = ckpt["neurorecon"]
    kind, model_config = {"meg": "MegBrainModule", "fmri": "FmriEncoder"}[modality], None
    if modality == "meg":  # ensemble.meg: the refit averaged with the model it came from
        assert desc["model_type"] == "EncoderEnsemble"
        training = metrics["training"]
        assert training["ensemble"]["members"] == [training["best_checkpoint"],
                                                   training["selected_checkpoint"]]
        paths = [Path(p) for p in training["ensemble"]["members"]]
        assert all(p.is_absolute() and p.is_file() for p in paths)
        assert paths[0].parent == paths[1].parent  # the run's checkpoints folder
        members = desc["model_config"]["members"]
        assert [m["model_type"] for m in members] == [kind, kind]
        assert members[0]["config"] == members[1]["config"]
        model_config = members[0]["config"]
    else:
        assert desc["model_type"] == kind and "ensemble" not in metrics["training"]
    assert desc["data"]["embedder"]["name"] == metrics["embedder"]
    assert set(desc["data"]["subjects"]) == {"01", "02"}
    if modality == "meg":
        sub = desc["data"]["subjects"]["01"]
        assert len(sub["ch_names"]) == len(sub["positions"]) == 274
        assert set(sub["kinds"]) == {"axial"}  # CTF-275: axial gradiometers
        assert desc["data"]["preprocessing"]["params"]["sfreq"] == 120.0
        # the temporal focus picked on validation trials is part of the model
        focus = metrics["training"]["focus"]
        assert model_config["focus"] == focus["samples"]
        assert focus["tmin"] >= -0.5 and focus["tmax"] <= 1.0 + 1 / 120 + 1e-6
        # so is the linear read-out over the focus, with its mix chosen on validation
        readout = metrics["training"]["readout"]
        assert 0.0 <= readout["mix"] <= 1.0 and readout["bin_width"] in (0.025, 0.05, 0.1)
        bins = model_config["readout"]["bins"]
        assert bins[0][0] == focus["samples"][0] and bins[-1][1] == focus["samples"][1]
        for k in range(2):  # one deep share per subject, the run's choice for both
            assert ckpt["state_dict"][f"net.members.{k}.readout_mix"].tolist() == pytest.approx(
                [readout["mix"]] * 2)
        assert {"deep", "linear_readout"} <= set(metrics["retrieval"])
        # the deep encoder's own time-resolved curve: one training per window (0.5 s steps)
        tr = metrics["time_resolved"]
        assert len(tr["deep"]["times"]) == len(tr["deep"]["top5"]) == 3
        assert tr["times"][0] == pytest.approx(tr["deep"]["times"][0])
        assert (out / "time_resolved_deep" / "window-02").is_dir()
        assert "Deep encoder trained on each 250 ms window" in (out / "report.md").read_text()


def test_train_errors_are_clear(sample_root, tmp_path):
    from neurorecon.pipelines.run import run

    cfg = compose_stage("train", tmp_path, ["data=bids", f"data.root={sample_root / 'meg'}",
                                            "data.test_value=nonexistent", *FAST, *SMALL_MEG])
    with pytest.raises(DataError, match="test split is empty"):
        run(cfg)


@pytest.mark.slow
def test_training_does_not_depend_on_cache_state(sample_root, tmp_path):
    """Cold caches (computed in this process: preprocessing, embeddings, the generator) and
    warm ones (read back) give the same model and the same metrics.json, reconstruction and
    adaptation curve included: each random consumer is seeded on its own."""
    import torch

    from neurorecon.pipelines.run import run

    overrides = ["data=bids", f"data.root={sample_root / 'fmri'}", "data.modality=fmri",
                 *FAST, *SMALL_FMRI, "evaluate.ridge=false", "evaluate.adaptation=true",
                 "reconstruct.enabled=true", "reconstruct.generator.resolution=16",
                 "reconstruct.generator.train_steps=20", "reconstruct.steps=3",
                 "reconstruct.generator.block_out_channels=[8,16,16]",
                 "reconstruct.skip_metrics=[inception,alexnet2,alexnet5,effnet,swav]"]
    cold = run(compose_stage("train", tmp_path / "cold", overrides))
    warm = run(compose_stage("train", tmp_path / "warm", [*overrides,
                                                           f"paths.cache_dir={tmp_path}/cold/cache"]))
    assert cold["retrieval"]["encoder"] == warm["retrieval"]["encoder"]
    a, b = (torch.load(m["training"]["best_checkpoint"], weights_only=False)["state_dict"]
            for m in (cold, warm))
    assert all(torch.equal(a[k], b[k]) for k in a)

    def stable(m):  # everything but wall-clock times, paths and the generator's training log
        drop = {"train_seconds", "refit_seconds", "seconds", "seconds_per_image",
                "best_checkpoint", "selected_checkpoint", "generator_training", "bundle"}
        if isinstance(m, dict):
            return {k: stable(v) for k, v in m.items() if k not in drop}
        return [stable(v) for v in m] if isinstance(m, list) else m

    assert cold["reconstruction"]["generator_training"] is not None  # trained: cold cache
    assert warm["reconstruction"]["generator_training"] is not None  # read back with the cache
    assert stable(cold) == stable(warm)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes(sample_root, tmp_path):
    """`trainer=cpu_ddp`: Lightning launches a second process; gloo on 127.0.0.1."""
    run_dir = tmp_path / "runs" / "ddp"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "NEURORECON_ROOT": str(tmp_path)}
    cmd = [str(Path(sys.executable).parent / "neurorecon"), "train", "trainer=cpu_ddp",
           "data=bids", f"data.root={sample_root / 'meg'}", "trainer.max_epochs=2",
           "trainer.min_epochs=1", "datamodule.batch_size=8", "evaluate.ridge=false",
           "evaluate.time_resolved=false", "reconstruct.enabled=false",
           f"hydra.run.dir={run_dir}", *SMALL_MEG]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "distributed_backend=gloo" in out.stderr + out.stdout
    assert "All distributed processes registered. Starting with 2 processes" in (
        out.stderr + out.stdout)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the two-process run evaluated every test image and wrote its bundle
    enc = metrics["retrieval"]["encoder"]
    assert enc["n_candidates"] == metrics["n_test_images"] and 0 <= enc["top1"] <= enc["top5"]
    assert (run_dir / "bundle" / "config.json").is_file()


@pytest.mark.slow
def test_checkpoint_alone_evaluates_and_refuses_misfits(sample_root, tmp_path):
    from neurorecon.pipelines.evaluate.stage import run as evaluate
    from neurorecon.pipelines.run import run

    cfg = compose_stage("train", tmp_path / "t", ["data=bids", f"data.root={sample_root / 'meg'}",
                                                  "evaluate.ridge=false", *FAST, *SMALL_MEG])
    ckpt = run(cfg)["training"]["best_checkpoint"]
    trained = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())

    # the checkpoint alone (exported to a bundle: its own recipe, frozen scaler, embedder) on
    # one of its subjects
    ev = compose_stage("evaluate", tmp_path / "e", [
        f"checkpoint={ckpt}", "data=bids", f"data.root={sample_root / 'meg'}",
        "data.subjects=[\"02\"]"])
    metrics = evaluate(ev)
    assert metrics["subjects"] == ["02"]
    assert metrics["retrieval_per_subject"]["02"]["encoder"] == pytest.approx(
        trained["retrieval_per_subject"]["02"]["encoder"])
    assert (Path(ev.paths.output_dir) / "bundle" / "config.json").is_file()

    # data it does not fit: another modality
    bad = compose_stage("evaluate", tmp_path / "b", [
        f"checkpoint={ckpt}", "data=bids", f"data.root={sample_root / 'fmri'}",
        "data.modality=fmri"])
    with pytest.raises(DataError, match="does not fit the decoder.*modality 'fmri'"):
        evaluate(bad)


def test_token_level_targets(sample_root, tmp_path, hf_dirs):
    """CLIP token states as targets: the encoder predicts (n_tokens, dim) per trial."""
    from neurorecon.pipelines.run import run

    cfg = compose_stage("train", tmp_path, [
        "data=bids", f"data.root={sample_root / 'meg'}", "embedder=clip",
        f"embedder.path={hf_dirs['clip']}", "embedder.output=tokens", "evaluate.ridge=false",
        *FAST, *SMALL_MEG])
    metrics = run(cfg)
    ckpt = torch.load(metrics["training"]["best_checkpoint"], map_location="cpu",
                      weights_only=False)
    assert ckpt["neurorecon"]["data"]["n_tokens"] == 17  # 4x4 patches + CLS of the tiny CLIP
    config = ckpt["neurorecon"]["model_config"]
    for member in config.get("members", [{"config": config}]):  # MEG: an ensemble (refit)
        assert member["config"]["n_tokens"] == 17
    assert 0 <= metrics["retrieval"]["encoder"]["top5"] <= 1


def test_refit_checkpoint_knows_the_model_it_was_refitted_from(tmp_path, caplog):
    """Choices on validation trials after a refit use the validation-selected checkpoint
    (a model that has not seen them): the one the run recorded, else the folder's only other
    one; nothing for a checkpoint that is not a refit."""
    from neurorecon.pipelines.train.checkpoint import selected_before_refit

    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    refit = ckpts / "refit.ckpt"
    for name in ("best.ckpt", "refit.ckpt"):
        (ckpts / name).write_bytes(b"")
    assert selected_before_refit(refit) == ckpts / "best.ckpt"
    assert selected_before_refit(ckpts / "best.ckpt") is None
    (ckpts / "best-v1.ckpt").write_bytes(b"")  # a rerun into the same folder: ambiguous
    with caplog.at_level(logging.WARNING, logger="neurorecon"):
        assert selected_before_refit(refit) is None
    assert "use the refitted model, which has seen them" in caplog.text
    recorded = {"training": {"selected_checkpoint": "/elsewhere/checkpoints/best-v1.ckpt"}}
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(recorded))
    assert selected_before_refit(refit) == ckpts / "best-v1.ckpt"  # the run moved: by name


def test_weight_averaging_gives_the_trained_model_the_average_of_its_steps(tmp_path):
    """``callbacks.weight_averaging``: after training, the model holds the exponential moving
    average of the weights of every optimizer step, with the decay of a half-life of
    ``half_life_epochs`` epochs of that data's batches, shorter early on (not the last step's
    weights); a checkpoint holds the average alone. An integer buffer (the subject index of a
    new subject, :class:`~neurorecon.pipelines.train.module.Reindexed`) is not averaged: in
    floating point 3 came back as 2, and a new subject was validated through an old one's layers."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from neurorecon.pipelines.train.module import WeightEMA

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)
            self.register_buffer("subject", torch.tensor([3, 5]), persistent=False)
            self.steps: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.steps.append(self.layer.weight.detach().clone())  # after the step

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 3), torch.randn(40, 1))
    model = Tiny()
    trainer = L.Trainer(max_epochs=6, callbacks=[WeightEMA(half_life_epochs=2.0)],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(data, batch_size=10))  # 4 batches an epoch
    assert model.subject.tolist() == [3, 5]
    expected = model.steps[0]
    for n, w in enumerate(model.steps[1:], start=1):  # half-life 8 steps, at most n / 4 early
        decay = 0.5 ** (1 / min(8, max(n, 1) / 4))
        expected = decay * expected + (1 - decay) * w
    torch.testing.assert_close(model.layer.weight.detach(), expected)
    assert not torch.allclose(model.layer.weight.detach(), model.steps[-1])
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    assert "current_model_state" not in ckpt
    torch.testing.assert_close(ckpt["state_dict"]["layer.weight"], expected)
    with pytest.raises(DataError, match="half_life_epochs"):
        WeightEMA(half_life_epochs=0)


def test_refit_data_holds_the_train_and_validation_trials(sample_root, tmp_path):
    """The refit trains on the train and validation trials: each subject's in trial order, as a
    module without validation holds them; with a ``train_fraction`` subset (a new subject's
    adaptation), that subset and the validation trials; the test split untouched."""
    from neurorecon.pipelines.train.fit import build_datamodule, prepare_caches

    from .conftest import compose_stage

    cfg = compose_stage("train", tmp_path, ["data=bids", f"data.root={sample_root / 'meg'}"])
    caches = prepare_caches(cfg)
    dm = build_datamodule(cfg, *caches)
    full, plain = dm.with_validation_in_train(), build_datamodule(cfg, *caches, val_fraction=0.0)
    assert len(dm.splits["val"]) > 0 and len(full.splits["val"]) == 0
    for field in ("subject", "row", "target", "stim_file"):
        np.testing.assert_array_equal(getattr(full.splits["train"], field),
                                      getattr(plain.splits["train"], field))
    train = full.splits["train"]
    assert train.trials["stim_file"].tolist() == list(plain.splits["train"].stim_file)
    assert full.splits["test"] is dm.splits["test"] and len(dm.splits["train"]) > 0
    new = dm.labels[-1]
    part = build_datamodule(cfg, *caches, subjects=[new], train_fraction={new: 0.25})
    merged = part.with_validation_in_train().splits["train"]
    assert len(part.splits["train"]) < len(plain.splits["train"]) / 2
    assert sorted(merged.row) == sorted([*part.splits["train"].row, *part.splits["val"].row])
    assert list(merged.row) == sorted(merged.row)
