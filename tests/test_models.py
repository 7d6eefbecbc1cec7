"""Encoders, losses and registry: shapes, masking, subjects, clear errors, config round trip."""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import mne
import numpy as np
import pytest
import torch
import yaml

from neurorecon.models.base import ModelInputError
from neurorecon.models.fmri.encoder import FmriEncoder
from neurorecon.models.losses import ClipLoss, CombinedLoss, MseLoss
from neurorecon.models.meg import brain_module
from neurorecon.models.meg.brain_module import MegBrainModule, _Conv1d
from neurorecon.models.registry import MODEL_TYPES, build
from neurorecon.pipelines.preprocess.meg import sensor_layout

REPO = Path(__file__).resolve().parents[1]
N_TIMES, EMB = 40, 16


def tiny_meg(**kwargs) -> MegBrainModule:
    torch.manual_seed(0)
    config = {"n_outputs": EMB, "n_times": N_TIMES, "sfreq": 100.0, "n_subjects": 2,
              "n_virtual_chans": 16, "n_fourier": 4, "hidden_dim": 16, "depth": 2, **kwargs}
    return MegBrainModule(**config)


@pytest.fixture(scope="module")
def layouts() -> dict[str, torch.Tensor]:
    """Real 2D sensor layouts: CTF-275 (274 channels) and CTF-151 (151 channels)."""
    out = {}
    for system in ("ctf275", "ctf151"):
        info = mne.channels.read_meg_canonical_info(system)
        picks = mne.pick_types(info, meg=True, ref_meg=False)
        out[system] = torch.from_numpy(sensor_layout(info, picks).astype(np.float32))
    return out


def meg_batch(pos: torch.Tensor, *, batch: int = 3, subject=0, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    c = len(pos)
    x = torch.randn(batch, c, N_TIMES, generator=gen)
    kw = {"positions": pos.expand(batch, c, 2).clone(),
          "mask": torch.ones(batch, c, dtype=torch.bool),
          "subject": torch.full((batch,), subject, dtype=torch.long)}
    return x, kw


# ---------------------------------------------------------------------------------- MEG
def test_meg_shapes_on_two_channel_sets(layouts):
    assert len(layouts["ctf275"]) == 274 and len(layouts["ctf151"]) == 151
    model = tiny_meg().eval()
    with torch.no_grad():
        for pos in layouts.values():
            out = model(*meg_batch(pos)[:1], **meg_batch(pos)[1])
            assert set(out) == {"clip", "mse"}
            assert out["clip"].shape == out["mse"].shape == (3, EMB)
            assert torch.isfinite(out["clip"]).all()
    # train mode (BatchNorm batch statistics, spatial dropout) and gradients reach the input
    model.train()
    x, kw = meg_batch(layouts["ctf151"])
    x.requires_grad_(True)
    model(x, **kw)["clip"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("aggregation", ["affine", "mean", "attention"])
def test_meg_token_outputs_and_aggregations(layouts, aggregation):
    x, kw = meg_batch(layouts["ctf151"], batch=2)
    model = tiny_meg(aggregation=aggregation, n_tokens=3).eval()
    with torch.no_grad():
        out = model(x, **kw)
    assert out["clip"].shape == out["mse"].shape == (2, 3, EMB)
    assert tiny_meg(aggregation=aggregation).get_output_shape() == {"clip": (2, EMB),
                                                                   "mse": (2, EMB)}


def test_masked_channels_do_not_influence_output(layouts):
    model = tiny_meg().eval()
    x, kw = meg_batch(layouts["ctf275"], batch=2)
    bad = [3, 100, 200]
    kw["mask"][:, bad] = False
    with torch.no_grad():
        ref = model(x, **kw)
        x2, kw2 = x.clone(), {k: v.clone() for k, v in kw.items()}
        x2[:, bad] = torch.randn(2, len(bad), N_TIMES) * 1e3
        x2[0, bad[0], 5] = float("nan")
        kw2["positions"][:, bad] = torch.rand(2, len(bad), 2)  # even their positions
        out = model(x2, **kw2)
        # a good channel does matter
        x3 = x.clone()
        x3[:, 50] += 10.0
        changed = model(x3, **kw)
    for key in ("clip", "mse"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0)
        assert not torch.allclose(changed[key], ref[key])
    weights = model.spatial.attention(kw["positions"], kw["mask"])
    assert (weights[:, :, bad] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 16))


def test_eval_attention_cache_follows_layout_mask_and_weights(layouts):
    model = tiny_meg().eval()
    x, kw = meg_batch(layouts["ctf151"], batch=1)
    fresh = tiny_meg(n_fourier=4).eval()  # same seed, same weights
    with torch.no_grad():
        first = model(x, **kw)["clip"]
        torch.testing.assert_close(model(x, **kw)["clip"], first, rtol=0, atol=0)
        kw_bad = {**kw, "mask": kw["mask"].clone()}
        kw_bad["mask"][0, :40] = False
        torch.testing.assert_close(model(x, **kw_bad)["clip"], fresh(x, **kw_bad)["clip"])
        other = {k: v + 0.1 for k, v in model.state_dict().items() if v.is_floating_point()}
        model.load_state_dict(other, strict=False)
        fresh.load_state_dict(other, strict=False)
        torch.testing.assert_close(model(x, **kw)["clip"], fresh(x, **kw)["clip"])
    assert not torch.allclose(model(x, **kw)["clip"], first)  # with autograd: no cache


def test_spatial_dropout_drops_a_disc_only_in_training(layouts):
    model = tiny_meg(spatial_dropout_radius=0.25)
    pos = layouts["ctf275"].expand(8, -1, -1)
    mask = torch.ones(8, 274, dtype=torch.bool)
    torch.manual_seed(1)
    dropped = (model.spatial.attention(pos, mask) == 0).all(dim=1)  # (8, 274)
    assert dropped.any() and (~dropped).any(dim=1).all()  # some sensors, never all
    model.eval()
    assert not (model.spatial.attention(pos, mask) == 0).any()


def test_subject_layer_is_per_subject(layouts):
    model = tiny_meg().eval()
    with torch.no_grad():
        model.subject_layer.weight[1] += 0.5 * torch.randn(16, 16)
        x, kw = meg_batch(layouts["ctf151"], batch=2)
        out0 = model(x, **{**kw, "subject": torch.tensor([0, 0])})["clip"]
        out1 = model(x, **{**kw, "subject": torch.tensor([1, 1])})["clip"]
        mixed = model(x, **{**kw, "subject": torch.tensor([0, 1])})["clip"]
    assert not torch.allclose(out0, out1)
    torch.testing.assert_close(mixed, torch.stack([out0[0], out1[1]]))


def test_meg_clear_errors(layouts):
    model = tiny_meg().eval()
    x, kw = meg_batch(layouts["ctf151"], batch=2)
    with pytest.raises(ModelInputError, match=r"unknown subject index: got 2.*indices 0\.\.1"):
        model(x, **{**kw, "subject": torch.tensor([0, 2])})
    with pytest.raises(ModelInputError, match=r"window too short: got 30 samples \(0\.3 s"):
        model(x[..., :30], **kw)
    with pytest.raises(ModelInputError, match="window too long"):
        model(torch.cat([x, x], dim=-1), **kw)
    with pytest.raises(ModelInputError, match=r"positions axis 1 has size 274"):
        model(x, **{**kw, "positions": layouts["ctf275"].expand(2, -1, -1)})
    with pytest.raises(ModelInputError, match="positions and mask are required"):
        model(x, positions=None, mask=None, subject=0)
    with pytest.raises(ModelInputError, match="mask must be a bool tensor"):
        model(x, **{**kw, "mask": kw["mask"].float()})
    with pytest.raises(ModelInputError, match="no good channel"):
        model(x, **{**kw, "mask": torch.zeros_like(kw["mask"])})
    fixed = tiny_meg(n_chans=274)
    with pytest.raises(ModelInputError, match="wrong channel count: got 151, expected 274"):
        fixed(x, **kw)
    # the message says what to do
    try:
        model(x[..., :30], **kw)
    except ModelInputError as exc:
        assert "tmin/tmax and sfreq" in str(exc)


def test_signal_shape_is_derived_and_checked():
    model = MegBrainModule(n_outputs=4, sfreq=120.0, input_window_seconds=1.5)
    assert model.n_times == 180 and model.input_window_seconds == pytest.approx(1.5)
    with pytest.raises(ValueError, match="contradicts"):
        MegBrainModule(n_outputs=4, n_times=100, sfreq=120.0, input_window_seconds=1.5)
    with pytest.raises(ValueError, match="give n_times"):
        MegBrainModule(n_outputs=4, sfreq=120.0)
    with pytest.raises(ValueError, match="Allowed values"):
        MegBrainModule(n_outputs=4, n_times=10, aggregation="max")


def test_single_window_fast_path_equals_conv():
    torch.manual_seed(0)
    for kernel, dilation in [(3, 1), (3, 8), (1, 1), (5, 2)]:
        conv = _Conv1d(6, 7, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation)
        x = torch.randn(1, 6, 50)
        expected = torch.nn.functional.conv1d(x, conv.weight, conv.bias,
                                              padding=conv.padding, dilation=conv.dilation)
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(conv(x.expand(2, -1, -1))[1:], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- fMRI
def test_fmri_two_voxel_counts_and_errors():
    torch.manual_seed(0)
    model = FmriEncoder(subjects={"01": 50, "02": 73}, n_outputs=EMB, hidden_dim=32).eval()
    with torch.no_grad():
        a = model(torch.randn(4, 50), subject=0)
        b = model(torch.randn(4, 73), subject=torch.ones(4, dtype=torch.long))
        c = model(torch.randn(4, 73), subject="02")
    assert a["clip"].shape == b["mse"].shape == c["clip"].shape == (4, EMB)
    tokens = FmriEncoder(subjects={"01": 50}, n_outputs=EMB, hidden_dim=32, n_tokens=5)
    assert tokens(torch.randn(3, 50), subject=0)["mse"].shape == (3, 5, EMB)
    with pytest.raises(ModelInputError, match=r"wrong voxel count for sub-02: got 50, expected 73"):
        model(torch.randn(4, 50), subject=1)
    with pytest.raises(ModelInputError, match=r"unknown subject: got '03'.*\['01', '02'\]"):
        model(torch.randn(4, 50), subject="03")
    with pytest.raises(ModelInputError, match="unknown subject index: got 5"):
        model(torch.randn(4, 50), subject=5)
    with pytest.raises(ModelInputError, match="one subject"):
        model(torch.randn(2, 50), subject=torch.tensor([0, 1]))
    sub = FmriEncoder(subjects={"01": 50}, n_outputs=EMB, hidden_dim=32, adapter="subspace",
                      n_components=4)
    with pytest.raises(ModelInputError, match="fit_subspace: wrong voxel count for sub-01: got "
                                              "49, expected 50"):
        sub.fit_subspace("01", torch.randn(8, 49))


def test_fmri_new_subject_adaptation_freezes_shared_part():
    torch.manual_seed(0)
    model = FmriEncoder(subjects={"01": 30, "02": 40}, n_outputs=EMB, hidden_dim=32)
    index = model.add_subject("03", 25)
    assert index == 2 and model.subjects == {"01": 30, "02": 40, "03": 25}
    trainable = model.freeze_shared("03")
    assert {id(p) for p in trainable} == {id(p) for p in model.adapters["03"].parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = CombinedLoss(lambda_clip=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        loss, _ = loss_fn(model(torch.randn(8, 25), subject="03"), torch.randn(8, EMB))
        loss.backward()
        opt.step()
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.startswith("adapters.03.") for k in changed)
    # the adapted model rebuilds from its config (subject map included)
    clone = FmriEncoder.from_config(json.loads(json.dumps(model.get_config())))
    clone.load_state_dict(model.state_dict())
    with pytest.raises(ModelInputError, match="add_subject"):
        model.freeze_shared("04")


def test_fmri_subset_keeps_the_subjects_outputs_and_the_shared_layers():
    """A model reduced to some subjects (a new subject's own model, averaged with another of
    its own by ``adapt.way=ensemble``) decodes them as before, indexed from 0."""
    torch.manual_seed(0)
    model = FmriEncoder(subjects={"01": 30, "02": 40, "03": 25}, n_outputs=EMB,
                        hidden_dim=32).eval()
    model.freeze_shared("03")
    own = model.subset(["03", "01"])
    assert own.subjects == {"03": 25, "01": 30} and own is not model
    assert not own.training and own.get_config()["hidden_dim"] == 32
    x3, x1 = torch.randn(6, 25), torch.randn(6, 30)
    for head in ("clip", "mse"):
        assert torch.equal(own(x3, subject=0)[head], model(x3, subject=2)[head])
        assert torch.equal(own(x1, subject=1)[head], model(x1, subject="01")[head])
    assert [n for n, p in own.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad and "adapters.01." not in n
        and "adapters.02." not in n]
    own.adapters["03"][0].weight.data.add_(1.0)  # a copy: the model is not touched
    assert not torch.equal(own(x3, subject=0)["clip"], model(x3, subject=2)["clip"])
    with pytest.raises(ModelInputError, match="unknown subjects"):
        model.subset(["04"])


def test_meg_subset_keeps_the_subjects_outputs_and_the_shared_layers():
    """An MEG model reduced to some subjects (a new subject's fine-tuned copy, averaged with
    its scratch model by ``adapt.way=ensemble``) decodes them as before, indexed from 0: their
    subject-layer matrices, read-outs and deep shares come along."""
    model = tiny_meg(n_subjects=3, focus=[5, 35], readout={"bins": [[0, 20], [20, 40]],
                                                           "n_chans": 12}).eval()
    with torch.no_grad():
        model.subject_layer.weight.add_(0.1 * torch.randn_like(model.subject_layer.weight))
        model.readout_weight.normal_()
        model.readout_bias.normal_()
    model.set_readout_mix([0.2, 0.5, 0.9])
    model.freeze_shared([2])
    own = model.subset([2, 0])
    assert own is not model and not own.training and own.n_subjects == 2
    assert own.get_config() == {**model.get_config(), "n_subjects": 2}
    assert own.readout_mix.tolist() == pytest.approx([0.9, 0.2])
    x, inputs = own.example_inputs(batch_size=4)
    for head in ("clip", "mse"):
        for mine, theirs in ((0, 2), (1, 0)):
            assert torch.equal(own(x, **{**inputs, "subject": mine})[head],
                               model(x, **{**inputs, "subject": theirs})[head])
    assert [n for n, p in own.named_parameters() if p.requires_grad] == ["subject_layer.weight"]
    with torch.no_grad():
        own.subject_layer.weight.add_(1.0)  # a copy: the model is not touched
    assert not torch.equal(own(x, **{**inputs, "subject": 0})["clip"],
                           model(x, **{**inputs, "subject": 2})["clip"])
    with pytest.raises(ModelInputError, match="unknown subjects"):
        model.subset([3])


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_config_round_trip_gives_identical_outputs(model_type):
    cls = MODEL_TYPES[model_type]
    torch.manual_seed(0)
    model = build(model_type, cls.example_config()).eval()
    config = json.loads(json.dumps(model.get_config()))
    assert list(config) == list(inspect.signature(cls).parameters)  # keys = argument names
    clone = build(model_type, config).eval()
    clone.load_state_dict(model.state_dict())
    x, kw = model.example_inputs(batch_size=3)
    with torch.no_grad():
        a, b = model(x, **kw), clone(x, **kw)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown config key"):
        cls.from_config({**config, "hidden": 3})


def test_registry_is_complete():
    with pytest.raises(ValueError, match="known types"):
        build("NoSuchModel", {})
    for name, cls in MODEL_TYPES.items():
        assert name == cls.__name__
        model = build(name, cls.example_config())
        shapes = model.get_output_shape()
        assert shapes["clip"] == shapes["mse"] == (2, model.n_outputs)
    # every encoder config targets a registered class, and every registered class has one
    targets = {cfg["_target_"].rsplit(".", 1)[1]
               for path in (REPO / "configs" / "encoder").glob("*.yaml")
               for cfg in yaml.safe_load(path.read_text()).values()}
    assert targets == set(MODEL_TYPES)


# ---------------------------------------------------------------------------------- losses
def test_clip_loss_prefers_matched_pairs_and_trains():
    torch.manual_seed(0)
    target = torch.randn(16, EMB)
    noisy = target + 0.3 * torch.randn(16, EMB)
    loss_fn = ClipLoss(init_temperature=0.1)
    matched = loss_fn(noisy, target)
    shuffled = loss_fn(noisy[torch.randperm(16)], target)
    assert matched < shuffled
    assert ClipLoss(symmetric=False)(noisy, target) > 0

    # a tiny model learns to pick its pair among 16 random ones, through the CLIP gradient
    inputs = torch.randn(16, 32)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, EMB))
    loss_fn = ClipLoss()
    opt = torch.optim.Adam([*net.parameters(), *loss_fn.parameters()], lr=1e-2)
    with torch.no_grad():
        start = loss_fn(net(inputs), target).item()
    for _ in range(200):
        opt.zero_grad()
        loss = loss_fn(net(inputs), target)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * start
    with torch.no_grad():
        top1 = (loss_fn.logits(net(inputs), target).argmax(1) == torch.arange(16)).float()
    assert top1.mean() == 1.0
    assert loss_fn.log_scale.grad is not None  # the temperature is learned


def test_clip_temperature_is_clamped_and_token_targets_work():
    loss_fn = ClipLoss(max_scale=100.0)
    with torch.no_grad():
        loss_fn.log_scale.fill_(20.0)
    assert loss_fn.scale.item() == pytest.approx(100.0)
    frozen = ClipLoss(learn_temperature=False)
    assert not list(frozen.parameters())
    tokens = torch.randn(4, 3, EMB)
    assert frozen(tokens, tokens).shape == ()


def test_combined_loss_weights_and_errors():
    torch.manual_seed(0)
    out = {"clip": torch.randn(8, EMB), "mse": torch.randn(8, EMB)}
    y = torch.randn(8, EMB)
    clip_only, parts = CombinedLoss(lambda_clip=1.0)(out, y)
    mse_only, _ = CombinedLoss(lambda_clip=0.0)(out, y)
    torch.testing.assert_close(clip_only, ClipLoss()(out["clip"], y))
    torch.testing.assert_close(mse_only, MseLoss()(out["mse"], y))
    mixed, parts = CombinedLoss(lambda_clip=0.25)(out, y)
    torch.testing.assert_close(mixed, 0.25 * parts["clip"] + 0.75 * parts["mse"])
    assert set(parts) == {"clip", "mse", "temperature"}
    assert parts["temperature"].item() == pytest.approx(0.07)
    with pytest.raises(ModelInputError, match="embedding dimension"):
        CombinedLoss()(out, torch.randn(8, EMB + 1))
    with pytest.raises(ValueError, match="lambda_clip"):
        CombinedLoss(lambda_clip=1.5)


def test_generator_registry_resolves_every_backend():
    """Bundles name their generator class; every name resolves to that class (lazily)."""
    import importlib

    from neurorecon.models.registry import GENERATOR_TYPES, build_generator

    for name, module in GENERATOR_TYPES.items():
        assert getattr(importlib.import_module(module), name).__name__ == name
    with pytest.raises(ValueError, match="known"):
        build_generator("NoSuchGenerator", {})


def test_subspace_fit_streamed_in_blocks():
    """The subspace adapter fitted from row blocks (trials that need not fit in memory) equals
    the in-memory fit, and its randomized SVD (many trials) finds the exact principal axes."""
    from neurorecon.models.fmri.encoder import SubspaceProjection

    g = torch.Generator().manual_seed(0)
    n, v, k = 700, 600, 256  # n, v > 2k: the randomized branch
    signal = torch.randn(n, 8, generator=g) @ (torch.randn(8, v, generator=g) * 5)
    X = (signal + torch.randn(n, v, generator=g) + 3.0).numpy().astype(np.float32)
    fits = []
    for source in (X, lambda: (X[i : i + 64] for i in range(0, n, 64))):
        torch.manual_seed(1)
        proj = SubspaceProjection(v, k)
        assert proj.fit(source) == k
        fits.append(proj)
    torch.testing.assert_close(fits[0].mean, fits[1].mean)
    a, b = (f.components[:8].double() * np.sqrt(v) for f in fits)  # the signal axes (the rest
    assert torch.linalg.svdvals(a @ b.T).min() > 0.9999  # are noise, equal up to rotation)
    centred = torch.as_tensor(X, dtype=torch.float64) - torch.as_tensor(X, dtype=torch.float64
                                                                         ).mean(0)
    exact = torch.linalg.svd(centred, full_matrices=False)[2][:8]
    top = fits[1].components[:8].double() * np.sqrt(v)
    cosines = torch.linalg.svdvals(exact @ top.T)  # principal angles of the top-8 spans
    assert cosines.min() > 0.999


def test_meg_linear_readout_mixes_with_the_deep_embedding_and_round_trips():
    torch.manual_seed(0)
    net = MegBrainModule(**MegBrainModule.example_config())
    x, inputs = net.example_inputs(batch_size=4)
    inputs["mask"][:, 3] = False  # a bad channel counts as 0 in the read-out
    net.eval()
    with torch.no_grad():
        deep = net(x, **inputs)
    bins = [[5, 10], [10, 20]]
    net.add_readout(bins=bins, n_chans=x.shape[1])
    c = x.shape[1]
    weight = torch.randn(2, 8, c * len(bins))
    for s in range(2):
        net.set_readout(s, weight[s], torch.full((8,), float(s)))
    feats = torch.stack([x[..., a:b].mean(-1) for a, b in bins], -1) * inputs["mask"][..., None]
    linear = torch.stack([feats[i].flatten() @ weight[int(s)].T + float(s)
                          for i, s in enumerate(inputs["subject"])])
    with torch.no_grad():
        assert torch.allclose(net(x, **inputs)["mse"], deep["mse"])  # mix 1: deep alone
        net.readout_mix.fill_(0.0)
        out = net(x, **inputs)
        assert torch.allclose(out["mse"], linear, atol=1e-5)
        assert torch.allclose(out["clip"], torch.nn.functional.normalize(linear, dim=-1),
                              atol=1e-5)
        net.readout_mix.fill_(0.25)
        mixed = net(x, **inputs)
    assert torch.allclose(mixed["mse"], 0.25 * deep["mse"] + 0.75 * linear, atol=1e-5)
    # the config records the read-out: a rebuilt model with the state dict gives the same
    rebuilt = build("MegBrainModule", json.loads(json.dumps(net.get_config())))
    rebuilt.load_state_dict(net.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt(x, **inputs)["clip"], mixed["clip"], atol=1e-6)
    # one deep share per subject: subject 0 deep alone, subject 1 read-out alone
    one = inputs["subject"] == 1
    with torch.no_grad():
        net.readout_mix.copy_(torch.tensor([1.0, 0.0]))
        per = net(x, **inputs)["mse"]
    assert torch.allclose(per[~one], deep["mse"][~one], atol=1e-5)
    assert torch.allclose(per[one], linear[one], atol=1e-5)
    # a state dict with one share for all (bundles written before) loads as that share each
    state = {**net.state_dict(), "readout_mix": torch.tensor(0.25)}
    rebuilt.load_state_dict(state)
    assert rebuilt.readout_mix.tolist() == [0.25, 0.25]
    with pytest.raises(ValueError, match="does not fit"):
        net.set_readout(0, torch.zeros(8, c * len(bins) + 1), torch.zeros(8))


def test_traced_single_window_model_equals_forward_for_any_mask(monkeypatch):
    """The real-time decoder's traced model (layout fixed, mask an input) gives forward's
    outputs, for the mask it was traced with and for another one, read-out included; the
    traced path turns no tensor into a Python value (no TracerWarning, with no filter)."""
    monkeypatch.setattr(brain_module, "_quiet_tracing", lambda: None)
    torch.manual_seed(0)
    net = MegBrainModule(**MegBrainModule.example_config(), sensor_aware=True)
    x, inputs = net.example_inputs(batch_size=2)
    c = x.shape[1]
    net.add_readout(bins=[[5, 10], [10, 20]], n_chans=c)
    # rank 2, as a ridge fitted on few trials: a single window multiplies by its factors
    net.set_readout(1, torch.randn(8, 2) @ torch.randn(2, 2 * c), torch.randn(8))
    net.readout_mix.fill_(0.4)
    net.eval()
    kw = {"positions": inputs["positions"][0], "sensors": inputs["sensors"][0], "subject": 1}
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        traced = {head: net.trace_window(head=head, **kw) for head in ("clip", "mse")}
    # nothing to filter (a filter is process-wide and races other threads' catch_warnings)
    assert [str(w.message) for w in said if w.category is torch.jit.TracerWarning] == []
    assert [f.shape for f in net._readout_factors_cache[1][1]] == [(8, 2), (2, 2 * c)]
    for bad in ([], [0, 3, 7]):
        mask = torch.ones(1, c, dtype=torch.bool)
        mask[0, bad] = False
        x1 = x[:1].clone()
        x1[:, ~mask[0]] = float("nan")  # masked channels may hold anything
        with torch.no_grad():
            ref = net(x1, positions=inputs["positions"][:1], mask=mask, subject=1,
                      sensors=inputs["sensors"][:1])
            for head, module in traced.items():
                torch.testing.assert_close(module(x1, mask), ref[head], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ref["clip"], net(x[:1], positions=inputs["positions"][:1],
                                                   mask=mask, subject=0,
                                                   sensors=inputs["sensors"][:1])["clip"])
    with pytest.raises(ValueError, match="Allowed values"):
        net.trace_window(head="both", **kw)


# ---------------------------------------------------------------------------------- ensemble
def test_ensemble_averages_its_members_everywhere_a_model_is_used():
    """An ensemble's outputs are the mean of its members' (unit-norm for retrieval); what
    changes a model (read-out, deep share, new subjects, freezing) reaches every member; the
    registry rebuilds it from its config and state dict, and its traced single-window model
    (the streamer's) gives forward's outputs."""
    from neurorecon.models.ensemble import EncoderEnsemble

    torch.manual_seed(0)
    members = [MegBrainModule(**MegBrainModule.example_config()) for _ in range(2)]
    ens = EncoderEnsemble(members).eval()
    x, inputs = members[0].example_inputs(batch_size=4)
    c = x.shape[1]
    ens.add_readout(bins=[[5, 10], [10, 20]], n_chans=c)
    weight, bias = torch.randn(8, 2 * c), torch.randn(8)
    ens.set_readout(1, weight, bias)
    ens.set_readout_mix(0.5)
    for m in members:
        assert [list(b) for b in m.readout_bins] == [[5, 10], [10, 20]]
        torch.testing.assert_close(m.readout_weight[1], weight)
        assert m.readout_mix.tolist() == [0.5, 0.5]
    with torch.no_grad():
        out, parts = ens(x, **inputs), [m(x, **inputs) for m in members]
    unit = torch.nn.functional.normalize
    torch.testing.assert_close(out["clip"], (unit(parts[0]["clip"], dim=-1)
                                             + unit(parts[1]["clip"], dim=-1)) / 2)
    torch.testing.assert_close(out["mse"], (parts[0]["mse"] + parts[1]["mse"]) / 2)
    assert not torch.allclose(parts[0]["clip"], parts[1]["clip"])  # two models, not one
    # rebuilt from JSON config + state dict (a bundle's files): the same outputs
    rebuilt = build("EncoderEnsemble", json.loads(json.dumps(ens.get_config())))
    rebuilt.load_state_dict(ens.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x, **inputs)["clip"], out["clip"])
    # the streamer's traced window model
    kw = {"positions": inputs["positions"][0], "subject": 1}
    with torch.no_grad():
        one = ens(x[:1], positions=inputs["positions"][:1], mask=inputs["mask"][:1],
                  subject=torch.tensor([1]))
        for head in ("clip", "mse"):
            traced = ens.trace_window(head=head, **kw)
            torch.testing.assert_close(traced(x[:1], inputs["mask"][:1]), one[head],
                                       rtol=1e-5, atol=1e-6)
    # a new subject in every member, at the same index; freezing leaves each one's own part
    assert ens.add_subjects(1, n_chans=c) == [2]
    assert [m.n_subjects for m in members] == [3, 3] and ens.n_subjects == 3
    trainable = ens.freeze_shared([2])
    assert {id(p) for p in trainable} == {id(m.subject_layer.weight) for m in members}
    # nothing that would change the first member alone, and clear errors
    with pytest.raises(AttributeError, match="does not forward"):
        ens.check_inputs(x, **inputs)
    with pytest.raises(ValueError, match="at least 2"):
        EncoderEnsemble(members[:1])
    with pytest.raises(ValueError, match="one class"):
        EncoderEnsemble([members[0], FmriEncoder(**FmriEncoder.example_config())])


def test_weighted_ensemble_weighs_its_members_and_keeps_its_weights():
    """A weighted ensemble (a new subject's adapted ways): the weighted mean of the members'
    unit-norm and regression outputs, the same in its traced window model; a member of weight
    0 counts for nothing; the weights survive the bundle's JSON config; bad weights are
    refused by name. MEG members each keep their own temporal focus (a scratch model's is
    chosen on the new subject's trials): every one takes the whole window."""
    from neurorecon.models.ensemble import EncoderEnsemble

    torch.manual_seed(0)
    members = [MegBrainModule(**MegBrainModule.example_config(), focus=focus)
               for focus in (None, [5, 25], [10, 30])]
    assert [m.focus for m in members] == [(0, 30), (5, 25), (10, 30)]
    x, inputs = members[0].example_inputs(batch_size=4)
    ens = EncoderEnsemble(members, weights=[2, 1, 1]).eval()
    assert ens.weights == [0.5, 0.25, 0.25]
    unit = torch.nn.functional.normalize
    with torch.no_grad():
        out, parts = ens(x, **inputs), [m(x, **inputs) for m in members]
        torch.testing.assert_close(out["clip"], sum(w * unit(p["clip"], dim=-1) for w, p in
                                                    zip(ens.weights, parts, strict=True)))
        torch.testing.assert_close(out["mse"], sum(w * p["mse"] for w, p in
                                                   zip(ens.weights, parts, strict=True)))
        only_first = EncoderEnsemble(members, weights=[1, 0, 0]).eval()(x, **inputs)
        torch.testing.assert_close(only_first["clip"], unit(parts[0]["clip"], dim=-1))
        torch.testing.assert_close(only_first["mse"], parts[0]["mse"])
        kw = {"positions": inputs["positions"][0], "subject": 1}
        one = ens(x[:1], positions=inputs["positions"][:1], mask=inputs["mask"][:1],
                  subject=torch.tensor([1]))
        traced = ens.trace_window(head="clip", **kw)
        torch.testing.assert_close(traced(x[:1], inputs["mask"][:1]), one["clip"],
                                   rtol=1e-5, atol=1e-6)
    config = json.loads(json.dumps(ens.get_config()))
    assert config["weights"] == [0.5, 0.25, 0.25]
    assert "weights" not in EncoderEnsemble(members).get_config()  # equal: as before
    rebuilt = build("EncoderEnsemble", config)
    rebuilt.load_state_dict(ens.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x, **inputs)["clip"], out["clip"])
    for bad in ([1, 1], [1, -1, 1], [0, 0, 0], [1, float("nan"), 1]):
        with pytest.raises(ValueError, match="3 non-negative numbers"):
            EncoderEnsemble(members, weights=bad)
    with pytest.raises(ValueError, match="config must be"):
        build("EncoderEnsemble", {**config, "mix": 1})
