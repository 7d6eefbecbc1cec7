"""What makes the decoders work beyond our own simulator: sensor-aware spatial attention,
contrastive batches without false negatives, MixCo, the temporal focus and the spread over
seeds."""

from __future__ import annotations

import mne
import numpy as np
import pytest
import torch

from neurorecon.models.losses import ClipLoss, CombinedLoss
from neurorecon.models.meg.brain_module import MegBrainModule, SpatialAttention, sensor_features
from neurorecon.pipelines.preprocess.meg import sensor_kinds, sensor_layout


def test_sensor_kinds_tell_a_neuromag_triplet_apart():
    info = mne.channels.read_meg_canonical_info("neuromag")
    picks = mne.pick_types(info, meg=True, ref_meg=False)
    kinds, ori = sensor_kinds(info, picks)
    assert kinds.count("mag") == 102 and kinds.count("planar") == 204
    xy = sensor_layout(info, picks)
    names = [info["ch_names"][i] for i in picks]
    # MEG 0112 / 0113 / 0111: two planar gradiometers and the magnetometer of one triplet
    g1, g2, m = (names.index(n) for n in ("MEG 0112", "MEG 0113", "MEG 0111"))
    assert np.allclose(xy[g1], xy[m], atol=0.02) and np.allclose(xy[g2], xy[m], atol=0.02)
    assert kinds[m] == "mag" and kinds[g1] == kinds[g2] == "planar"
    assert np.allclose(np.linalg.norm(ori[[g1, g2]], axis=1), 1.0)
    assert abs(ori[g1] @ ori[g2]) < 0.3  # the two gradiometers are (nearly) orthogonal
    assert np.allclose(ori[m], 0.0)
    ctf = mne.channels.read_meg_canonical_info("ctf275")
    kinds_ctf, _ = sensor_kinds(ctf, mne.pick_types(ctf, meg=True, ref_meg=False))
    assert set(kinds_ctf) == {"axial"}


def test_sensor_aware_attention_separates_colocated_sensors():
    torch.manual_seed(0)
    pos = torch.rand(1, 4, 2).repeat_interleave(3, dim=1)  # 4 triplets at shared positions
    kinds = ["mag", "planar", "planar"] * 4
    ori = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)] * 4
    sensors = sensor_features(kinds, ori)[None]
    mask = torch.ones(1, 12, dtype=torch.bool)
    plain = SpatialAttention(n_virtual_chans=8, n_fourier=4, spatial_dropout_radius=0).eval()
    w = plain.attention(pos, mask)
    assert torch.allclose(w[..., 0], w[..., 1]) and torch.allclose(w[..., 0], w[..., 2])
    aware = SpatialAttention(n_virtual_chans=8, n_fourier=4, spatial_dropout_radius=0,
                             n_sensor_features=sensors.shape[-1]).eval()
    w = aware.attention(pos, mask, sensors)
    assert not torch.allclose(w[..., 0], w[..., 1], atol=1e-4)
    assert not torch.allclose(w[..., 1], w[..., 2], atol=1e-4)
    assert torch.allclose(w.sum(-1), torch.ones(1, 8))
    with pytest.raises(Exception, match="sensor-aware and needs sensors"):
        aware.attention(pos, mask)
    with pytest.raises(Exception, match="unknown sensor kind"):
        sensor_features(["mag", "eeg"], [(0, 0), (0, 0)])


def test_focus_keeps_only_its_samples():
    cfg = {**MegBrainModule.example_config(), "focus": [10, 20]}
    model = MegBrainModule(**cfg).eval()
    x, kw = model.example_inputs(batch_size=2)
    ref = model(x, **kw)["clip"]
    x2 = x.clone()
    x2[..., :10] = torch.randn_like(x2[..., :10]) * 100  # outside the focus: ignored
    x2[..., 20:] = 0.0
    assert torch.allclose(model(x2, **kw)["clip"], ref, atol=1e-5)
    x2[..., 15] += 1.0  # inside: used
    assert not torch.allclose(model(x2, **kw)["clip"], ref, atol=1e-5)
    with pytest.raises(ValueError, match="focus must be"):
        MegBrainModule(**{**cfg, "focus": [20, 10]})


def test_no_false_negatives_for_repeated_images():
    torch.manual_seed(0)
    targets = torch.randn(4, 16)
    targets[1] = targets[0]  # rows 0 and 1 show the same image
    pred = targets.clone()  # a perfect decoder
    loss = ClipLoss(init_temperature=0.01, learn_temperature=False)
    plain = loss(pred, targets)
    masked = loss(pred, targets, ids=torch.tensor([7, 7, 3, 5]))
    # without masking row 0 cannot tell its own image from row 1's copy: ~log(2) per such row
    assert plain > 0.3
    assert masked < 1e-3


def test_mixco_soft_targets():
    torch.manual_seed(0)
    pred, targets = torch.randn(6, 8), torch.randn(6, 8)
    loss = CombinedLoss(lambda_clip=0.5)
    perm = torch.randperm(6)
    base, _ = loss({"clip": pred, "mse": pred}, targets)
    same, _ = loss({"clip": pred, "mse": pred}, targets, mix=(perm, torch.ones(6)))
    assert torch.allclose(base, same, atol=1e-5)  # lam = 1: no mixing
    # a prediction that is exactly the mix of the two targets beats the unmixed target
    lam = torch.full((6,), 0.5)
    mixed = 0.5 * targets + 0.5 * targets[perm]
    good, _ = loss({"clip": mixed * 10, "mse": mixed}, targets, mix=(perm, lam))
    bad, _ = loss({"clip": targets * 10, "mse": targets}, targets, mix=(perm, lam))
    assert good < bad


class _FakeDm:
    """A data module stand-in: one subject, signal only in 0.3-0.5 s after onset."""

    def __init__(self, *, signal: bool):
        rng = np.random.default_rng(0)
        sfreq, tmin, n_times, n_chans = 100.0, -0.2, 100, 12
        n_img = 40
        self.emb = rng.standard_normal((n_img, 6)).astype(np.float32)
        t = tmin + np.arange(n_times) / sfreq
        window = ((t >= 0.3) & (t < 0.5)).astype(np.float32)
        mixing = rng.standard_normal((n_chans, 6))
        target = np.concatenate([np.repeat(np.arange(30), 4), np.repeat(np.arange(30, 40), 4)])
        X = 0.5 * rng.standard_normal((len(target), n_chans, n_times))
        if signal:
            X += (mixing @ self.emb[target].T).T[:, :, None] * window
        self.X, self.target = X.astype(np.float32), target
        self.val = target >= 30
        self.recipe = {"params": {"sfreq": sfreq, "tmin": tmin}}
        self.labels = ["01"]
        self.subjects = {"01": type("Info", (), {"n_times": n_times})()}
        self.embeddings = torch.as_tensor(self.emb)
        self.splits = {name: _FakeSplit(self.target[self._rows(name)])
                       for name in ("train", "val")}

    def _rows(self, name):
        return np.flatnonzero(self.val if name == "val" else ~self.val)

    def split_arrays(self, name):
        rows = self._rows(name)
        return list(self.X[rows]), np.zeros(len(rows), int), self.target[rows]

    def subject_row_blocks(self, name, k):
        from neurorecon.pipelines.train.datamodule import RowBlocks

        class _File:  # a RowFile stand-in over the in-memory trials
            row_shape = self.X.shape[1:]

            def blocks(_, rows):
                yield rows, self.X[rows]

        return RowBlocks(_File(), self._rows(name))


class _FakeSplit:
    def __init__(self, target):
        self.target, self.subject = target, np.zeros(len(target), int)

    def __len__(self):
        return len(self.target)


def test_focus_is_chosen_where_validation_trials_decode():
    from neurorecon.pipelines.train.focus import choose_focus

    focus = choose_focus(_FakeDm(signal=True))
    assert focus["reason"] == "cross-validated window ridge"
    assert focus["tmin"] <= 0.3 and focus["tmax"] >= 0.5  # the informative span is kept
    assert focus["tmin"] >= 0.0 and focus["tmax"] <= 0.8  # the noise around it is not
    start, stop = focus["samples"]
    assert 0 < start < stop < 100
    # no signal: the whole epoch, or (a peak in the noise) that peak's span, said as such
    none = choose_focus(_FakeDm(signal=False))
    assert (none["samples"] == [0, 100] and "whole epoch" in none["reason"]
            or "within the noise of chance" in none["reason"]), none


def test_focus_search_scores_a_bounded_subset_of_whole_stimuli(monkeypatch):
    """Beyond MAX_TRIALS train trials the search scores whole stimuli up to that count (its
    cost stays constant on large datasets) and still finds the informative span."""
    from neurorecon.pipelines.train import focus

    monkeypatch.setattr(focus, "MAX_TRIALS", 62)
    dm = _FakeDm(signal=True)
    keep = focus.cv_subset(dm.splits["train"].target)
    kept = dm.splits["train"].target[keep]
    assert len(kept) == 60  # 15 whole stimuli of 4 trials: a 16th would pass 62
    assert not np.isin(dm.splits["train"].target[~keep], kept).any()  # no stimulus split
    chosen = focus.choose_focus(dm)
    assert chosen["cv_trials"] == 60
    assert chosen["tmin"] <= 0.3 and chosen["tmax"] >= 0.5


def test_subspace_adapter_ignores_what_training_trials_never_showed():
    from neurorecon.models.fmri.encoder import FmriEncoder

    torch.manual_seed(0)
    net = FmriEncoder(subjects={"01": 500}, n_outputs=8, hidden_dim=16, n_blocks=1,
                      adapter="subspace", n_components=32).eval()
    train = torch.randn(20, 500)
    with pytest.raises(Exception, match="subspace adapter is not fitted"):
        net(train[:2], subject=0)
    assert net.fit_subspace("01", train) == 19  # 20 centred trials span 19 axes
    x = train[:3] + 0.1
    # a direction no training trial varied along (orthogonal to their span): ignored
    basis = torch.linalg.svd(train - train.mean(0), full_matrices=False)[2][:19]
    v = torch.randn(500)
    v -= basis.T @ (basis @ v)
    out = net(x, subject=0)["clip"]
    assert torch.allclose(net(x + 5 * v, subject=0)["clip"], out, atol=1e-4)
    assert not torch.allclose(net(x + 5 * basis[0], subject=0)["clip"], out, atol=1e-3)
    # the fitted statistics are part of the weights (saved with a checkpoint / bundle)
    state = net.state_dict()
    assert {"adapters.01.0.mean", "adapters.01.0.components"} <= set(state)
    clone = FmriEncoder(**net.get_config())
    clone.load_state_dict(state)
    assert torch.allclose(clone.eval()(x, subject=0)["clip"], out)


@pytest.mark.slow
def test_run_over_seeds_reports_spread(sample_root, tmp_path):
    import json
    from pathlib import Path

    from neurorecon.pipelines.run import run

    from .conftest import compose_stage
    from .test_train import FAST, SMALL_FMRI

    cfg = compose_stage("run", tmp_path, ["data=bids", f"data.root={sample_root / 'fmri'}",
                                          "data.modality=fmri", "seeds=[0,1]", *FAST,
                                          *SMALL_FMRI])
    metrics = run(cfg)
    out = Path(cfg.paths.output_dir)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["seeds"] == [0, 1]
    spread = on_disk["over_seeds"]["retrieval"]
    for decoder in ("encoder", "ridge"):
        top5 = spread[decoder]["top5"]
        assert len(top5["values"]) == 2 and top5["sd"] >= 0
        assert on_disk["retrieval"][decoder]["top5"] == pytest.approx(np.mean(top5["values"]))
    for seed in (0, 1):
        per_seed = json.loads((out / f"seed-{seed}" / "metrics.json").read_text())
        assert per_seed["retrieval"]["encoder"]["top5"] == spread["encoder"]["top5"]["values"][
            seed]
        # refit on train + validation after the epoch count was chosen on validation
        assert per_seed["training"]["refit_epochs"] >= 1
        assert per_seed["training"]["best_checkpoint"].endswith("refit.ckpt")
    assert "Mean ± sd over seeds" in (out / "report.md").read_text()
    assert metrics["over_seeds"] == on_disk["over_seeds"]


def test_refit_epochs_follow_the_plateau_not_a_one_epoch_peak():
    from neurorecon.pipelines.train.fit import refit_epochs

    # a noisy early peak (epoch 6) above a later plateau: the count comes from the plateau
    curve = [0.55, 0.68, 0.72, 0.73, 0.75, 0.76, 0.79, 0.76, 0.77, 0.77, 0.78, 0.785, 0.78,
             0.78, 0.785, 0.77, 0.775, 0.77, 0.775]
    epochs = refit_epochs({"best_epoch": 6, "val_select": curve})
    assert 10 <= epochs <= 15, epochs
    # a clean curve keeps its peak; too short a history falls back to the best checkpoint
    assert refit_epochs({"best_epoch": 4, "val_select": [0.5, 0.6, 0.7, 0.8, 0.9, 0.8, 0.7,
                                                          0.6, 0.5]}) == 5
    assert refit_epochs({"best_epoch": 1, "val_select": [0.5, 0.6]}) == 2
