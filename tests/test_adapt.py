"""``neurorecon adapt``: a trained bundle gains a new participant; the old ones are unchanged, the
new one decodes, the adapted causal MEG bundle still streams (online == offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from neurorecon.models.common.checks import DataError
from neurorecon.pipelines.train.adaptation import DEFAULT_WAY, ENSEMBLED, choose_way
from neurorecon.pipelines.train.fit import refit_epochs as chosen_epochs

from .conftest import compose_stage, scored_sample
from .test_bundle import FAST, TINY_GENERATOR
from .test_train import SMALL_FMRI, SMALL_MEG

MODALITY = {"meg": ["preprocess.meg.phase=causal", *SMALL_MEG, *TINY_GENERATOR],
            # fMRI trains in about a second here: as many epochs as test_decoding
            "fmri": ["data.modality=fmri", *SMALL_FMRI, "reconstruct.enabled=false",
                     "datamodule.batch_size=16"]}
EPOCHS = {"meg": 6, "fmri": 20}


@pytest.fixture(scope="module")
def fmri_root(tmp_path_factory) -> Path:
    """Two fMRI subjects with enough test images to score retrieval (16)."""
    return scored_sample(tmp_path_factory.mktemp("adapt-sample"),
                         ["sample.meg.enabled=false", "sample.fmri.n_subjects=2"])


@pytest.fixture(scope="module")
def trained(sample_root, tmp_path_factory):
    """The bundle trained on sub-01, per modality (built once): ``trained(modality)`` ->
    (data overrides, bundle, folder)."""
    from neurorecon.pipelines.run import run as train

    done: dict[str, tuple[list[str], Path, Path]] = {}

    def get(modality: str, request) -> tuple[list[str], Path, Path]:
        if modality not in done:
            root = tmp_path_factory.mktemp(f"adapt-{modality}")
            data_root = sample_root if modality == "meg" else request.getfixturevalue(
                "fmri_root")
            data = ["data=bids", f"data.root={data_root / modality}"]
            cfg = compose_stage("train", root, [*data, "data.subjects=[01]", *FAST,
                                                f"trainer.max_epochs={EPOCHS[modality]}",
                                                *MODALITY[modality]])
            train(cfg)
            done[modality] = data, Path(cfg.paths.output_dir) / "bundle", root
        return done[modality]

    yield get
    for _, _, root in done.values():  # the suite's disk (pyproject: tmp_path_retention_policy)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module", params=["meg", *(
    pytest.param(p, marks=pytest.mark.slow) for p in ("meg-frozen", "meg-finetune", "meg-scratch",
                                                      "meg-auto", "fmri", "fmri-frozen"))])
def adapted(request, trained):
    """(modality, bundle trained on sub-01, adapted bundle with sub-02, adapt metrics, adapt
    config); ``meg`` and ``fmri`` adapt each modality's default way (the three ways'
    models averaged), ``<modality>-<way>`` that way (``auto``: the best of them on
    validation trials; ``frozen``: the shared layers frozen; ``finetune``: a fine-tuned copy)."""
    from neurorecon.pipelines.adapt import run as adapt

    modality, _, way = request.param.partition("-")
    data, base, root = trained(modality, request)
    acfg = compose_stage("adapt", root / (way or "default"), [
        *data, *(["data.modality=fmri"] if modality == "fmri" else []), "data.subjects=[02]",
        f"bundle={base}", f"adapt.max_epochs={EPOCHS[modality]}",
        *([f"adapt.way={way}"] if way else [])])
    metrics = adapt(acfg)
    yield modality, base, Path(acfg.paths.output_dir) / "bundle", metrics, acfg
    shutil.rmtree(root / (way or "default"), ignore_errors=True)  # up to 0.7 GB per way


def members(net) -> list:
    """The models an encoder averages: an ensemble's members (MEG: ``ensemble.meg``), else
    the encoder itself."""
    return list(getattr(net, "members", [net]))


def test_adapted_bundle_keeps_old_subjects_and_decodes_the_new_one(adapted):
    import torch

    from neurorecon.pipelines.inference import Decoder

    modality, base, out, metrics, cfg = adapted
    old, new = Decoder.from_pretrained(base), Decoder.from_pretrained(out)
    assert old.subjects == ["01"] and new.subjects == ["01", "02"]
    # the old subject's outputs are unchanged, bit for bit, on any input
    n_in = (old.subject_info("01").n_chans if modality == "meg"
            else old.subject_info("01").n_voxels)
    shape = (5, n_in, old.subject_info("01").n_times) if modality == "meg" else (5, n_in)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for head in ("clip", "mse"):
        assert np.array_equal(old.encode(x, subject="01", head=head),
                              new.encode(x, subject="01", head=head))
    way, asked = metrics["adapt"]["way"], cfg.adapt.way or DEFAULT_WAY
    if asked == "auto":  # each way tried, the best on the new subject's validation trials kept
        tried, choice = metrics["adapt"]["val_rank_score"], metrics["adapt"]["way_choice"]
        assert set(tried) == {"ensemble", "finetune", "frozen", "scratch"}, tried
        assert metrics["adapt"]["chosen"] == "auto"
        assert choice["validation"] == {w: round(v, 4) for w, v in tried.items()}
        # the kept way: within one standard error of the best; every way before it is not
        se, best = choice["standard_error"], max(tried.values())
        order = ["ensemble", "finetune", "frozen", "scratch"]
        assert tried[way] >= best - se[way] - 1e-4
        assert all(tried[w] < best - se[w] + 1e-4 for w in order[:order.index(way)])
    else:
        assert way == asked
    own = new.subject_net("02")  # the model that decodes the new subject
    index = new.config.subjects["02"].index  # its index in that model
    if way in ("finetune", "scratch", "ensemble"):  # a model of its own beside the bundle's
        assert own is not new.net and new.subject_net("01") is new.net
        assert all(torch.equal(v, new.net.state_dict()[k]) for k, v in old.net.state_dict().items())
        weights = new.config.subjects["02"].model.weights
        assert weights == "subjects/sub-02.safetensors" and (out / weights).is_file()
        if way == "ensemble":  # the three ways' models, reduced to the new subject, averaged
            _check_ensemble(modality, old, new, own, metrics, out)
        else:
            assert not torch.equal(members(old.net)[0].merge.weight,
                                   members(own)[0].merge.weight)  # every layer trained
            assert index == (1 if way == "finetune" else 0)  # scratch: the new subject alone
    else:  # the bundle's model with the new subject's own parts; the shared layers identical
        assert own is new.net and new.config.subjects["02"].model is None
        assert set(old.net.state_dict()) <= set(new.net.state_dict())
        assert index == 1
        if modality == "meg":
            assert all(torch.equal(a.merge.weight, b.merge.weight)
                       for a, b in zip(members(old.net), members(new.net), strict=True))
    if modality == "meg":  # a subject-layer matrix per subject of the model (of each member)
        assert all(m.subject_layer.weight.shape[0] == index + 1 for m in members(own))
    # the new subject decodes: its test trials through the adapted bundle (as `evaluate`)
    enc, chance = metrics["retrieval"]["encoder"], metrics["retrieval"]["chance"]
    assert metrics["subjects"] == ["02"]
    assert enc["rel_median_rank"] < chance["rel_median_rank"] - 0.1, metrics["retrieval"]
    block = metrics["adapt"]
    assert block["subjects"] == ["02"] and block["bundle_subjects"] == ["01"]
    assert set(block["ridge_same_trials"]) == {"top1", "top5"}
    run_dir = Path(cfg.paths.output_dir)
    assert json.loads((run_dir / "metrics.json").read_text())["adapt"] == block
    assert "## Adapted decoder" in (run_dir / "report.md").read_text()
    recorded = new.config.provenance.adaptations
    assert len(recorded) == 1 and recorded[0]["subjects"] == ["02"]
    assert recorded[0]["way"] == way
    # validation chose the epochs; the kept way then trained that long on train + validation
    # trials (refit.<modality>, on by default as for the run's own model)
    trainings = recorded[0]["members"] if way == "ensemble" else {way: recorded[0]}
    assert list(trainings) == (["frozen", "finetune", "scratch"] if way == "ensemble" else [way])
    for trained_way in trainings.values():  # an ensemble: each way it averages
        refit_epochs = trained_way["refit_epochs"]  # None: no refit ran
        assert isinstance(refit_epochs, int), recorded[0]
        # the smoothed peak of the curve validation ran: within the epochs it trained for
        assert refit_epochs >= 1, recorded[0]
        assert refit_epochs <= trained_way["epochs"], recorded[0]
        assert trained_way["epochs"] <= EPOCHS[modality], recorded[0]
        # ... read off the recorded validation curve, not the configured maximum
        assert trained_way["val_select"] and refit_epochs == chosen_epochs(trained_way)
    if modality == "meg":  # the read-out got its own ridge and deep share; low-level too
        assert float(own.readout_weight[index].abs().sum()) > 0
        assert new.net.readout_mix[0] == old.net.readout_mix[0]
        first = recorded[0]["members"]["frozen"] if way == "ensemble" else recorded[0]
        assert float(own.readout_mix[index]) == pytest.approx(first["readout_mix"])
        assert set(new.lowlevel) == {"01", "02"}
        assert np.array_equal(new.lowlevel["01"][0], old.lowlevel["01"][0])
    else:
        assert set(new.masks) == {"01", "02"}
        # sub-02's voxels weighted by where sub-01's carried the stimulus (its relevance,
        # measured when it was trained): the adapter's principal axes are the responsive
        # regions'; sub-02's own relevance is kept for the next new subject
        assert recorded[0]["region_prior"] == ["01"]
        assert old.net.voxel_relevance("01") is not None
        scale = members(own)[0].adapters["02"][0].scale  # an ensemble: its frozen way's
        assert float(scale.min()) < 0.5 < 1.5 < float(scale.max())
        assert own.voxel_relevance("02") is not None


#: a model's per-subject tensors (the rest: the layers every subject shares)
PER_SUBJECT = ("adapters.", "subject_layer.", "readout_")


def _check_ensemble(modality: str, old, new, own, metrics: dict, out: Path) -> None:
    """``adapt.way=ensemble``: the frozen, fine-tuned and scratch ways' models (each an
    ensemble's members, MEG's ``ensemble.meg``), reduced to the new subject and averaged,
    weighted by the trials behind each way, decode it as their weighted unit-norm mean."""
    import torch

    assert new.config.subjects["02"].index == 0
    bundle = members(old.net)  # the bundle's model (its members)
    k_old = len(bundle)
    parts = {"frozen": own.members[:k_old], "finetune": own.members[k_old:2 * k_old],
             "scratch": own.members[2 * k_old:]}
    assert parts["scratch"], len(own.members)
    for m in own.members:  # the new subject alone, at index 0
        if modality == "fmri":
            assert m.subjects == {"02": new.subject_info("02").n_voxels}
        else:
            assert m.n_subjects == 1 and m.subject_layer.weight.shape[0] == 1
    for frozen, trained in zip(parts["frozen"], bundle, strict=True):
        shared = [k for k in trained.state_dict() if not k.startswith(PER_SUBJECT)]
        assert shared and all(torch.equal(frozen.state_dict()[k], trained.state_dict()[k])
                              for k in shared)  # frozen: the bundle's shared layers as they were
    # every linear layer trained: the fine-tuned copies' (from the bundle's members), scratch's
    for m, start in zip([*parts["finetune"], *parts["scratch"]],
                        bundle + bundle[:1] * len(parts["scratch"]), strict=True):
        state = start.state_dict()
        assert not any(torch.equal(m.state_dict()[k], state[k]) for k in state
                       if state[k].ndim == 2 and not k.startswith(PER_SUBJECT)
                       and k in m.state_dict())
    # weighted by the trials behind each: scratch by sub-02's own, the pretrained ways by
    # those the bundle's model had for sub-01 (both in the bundle), as recorded; a way's
    # members share its weight
    n, k = (new.config.subjects[s].n_trials for s in ("02", "01"))
    assert n > 0 and k == old.config.subjects["01"].n_trials > 0
    weight = {w: m["weight"] for w, m in metrics["adapt"]["members"].items()}
    assert weight == pytest.approx({"frozen": k / (n + k) / 2, "finetune": k / (n + k) / 2,
                                    "scratch": n / (n + k)}, abs=1e-4)
    assert own.weights == pytest.approx([weight[w] / len(parts[w]) for w in ENSEMBLED
                                         for _ in parts[w]], abs=1e-4)
    rng = np.random.default_rng(1)
    if modality == "fmri":
        x = rng.standard_normal((4, new.subject_info("02").n_voxels)).astype(np.float32)
        inputs = {}
    else:  # the subject's layout, as the decoder passes it
        info = new.subject_info("02")
        x = rng.standard_normal((4, info.n_chans, info.n_times)).astype(np.float32)
        inputs = {k: v[None].expand(4, *v.shape) for k, v in new._model_inputs("02").items()}
    with torch.no_grad():
        outs = [m.eval()(torch.from_numpy(x), subject=0, **inputs)["clip"] for m in own.members]
    mean = sum(w * o / o.norm(dim=-1, keepdim=True)
               for w, o in zip(own.weights, outs, strict=True)).numpy()
    assert np.allclose(new.encode(x, subject="02", head="clip"), mean, atol=1e-5)
    if modality == "meg":  # one window: the members traced for single windows, averaged
        np.testing.assert_allclose(new.encode(x[:1], subject="02", head="clip"), mean[:1],
                                   atol=1e-4, rtol=0)
        return
    # the frozen and fine-tuned ways fit the same subspace: the bundle stores it once
    from safetensors import safe_open

    from neurorecon.pipelines.inference.files import TIED

    with safe_open(out / new.config.subjects["02"].model.weights, "pt") as f:
        tied = json.loads((f.metadata() or {}).get(TIED, "{}"))
    assert tied["members.1.adapters.02.0.components"] == \
        "members.0.adapters.02.0.components", tied


@pytest.mark.parametrize("adapted", ["meg", pytest.param(
    "meg-scratch", marks=pytest.mark.slow)], indirect=True)
def test_adapted_causal_bundle_streams_the_new_subject(adapted, sample_root):
    from neurorecon.pipelines.data.events import EventSpec, read_events
    from neurorecon.pipelines.data.studies import find_recordings
    from neurorecon.pipelines.inference import Decoder
    from neurorecon.pipelines.preprocess.meg import read_raw

    from .test_streaming import _feed, _online

    _, _, out, _, _ = adapted
    decoder = Decoder.from_pretrained(out)
    rec = next(r for r in find_recordings(sample_root / "meg", modality="meg")
               if r.subject == "02")
    events = read_events(rec.events_path, bids_root=sample_root / "meg", spec=EventSpec())
    raw = read_raw(rec).load_data(verbose=False)
    offline = decoder.encode(decoder.prepare_meg(raw, subject="02", events=events),
                             subject="02")
    online, messages = _online((decoder, raw, events, offline, "02"), hop=0, embeddings=True)
    for onset, stim in zip(events["onset"], events["stim_file"], strict=True):
        online.add_marker(100.0 + onset, stim)
    data = raw.get_data().T
    _feed(online, data, 100.0 + np.arange(len(data)) / raw.info["sfreq"])
    decoded = [m for m in messages if m["mode"] == "event"]
    assert [m["marker"] for m in decoded] == list(events["stim_file"])
    np.testing.assert_allclose([m["embedding"] for m in decoded], offline, atol=1e-4, rtol=0)


def test_adapt_refuses_subjects_the_bundle_knows_and_its_own_directory(adapted, tmp_path):
    from neurorecon.pipelines.adapt import run as adapt

    modality, base, _, _, acfg = adapted
    data = ["data=bids", f"data.root={acfg.data.root}",
            *(["data.modality=fmri"] if modality == "fmri" else [])]
    cfg = compose_stage("adapt", tmp_path, [*data, "data.subjects=[01]", f"bundle={base}"])
    with pytest.raises(DataError, match="sub-01 already in the decoder"):
        adapt(cfg)
    cfg = compose_stage("adapt", tmp_path, [*data, "data.subjects=[02]", f"bundle={base}",
                                            f"adapt.out={base}"])
    with pytest.raises(DataError, match="adapt.out is the input bundle"):
        adapt(cfg)


@pytest.mark.slow
def test_run_writes_the_adaptation_curve(fmri_root, tmp_path):
    """`run` with evaluate.adaptation=true: adapted vs scratch vs ridge on the last subject by
    fraction and seed (the same adaptation as `neurorecon adapt`); the adapted model decodes
    the new subject once it has all its trials."""
    from neurorecon.pipelines.run import run

    cfg = compose_stage("train", tmp_path, [
        "data=bids", f"data.root={fmri_root / 'fmri'}", *MODALITY["fmri"], *FAST,
        "trainer.max_epochs=20", "evaluate.ridge=false", "evaluate.adaptation=true",
        "evaluate.adaptation_fractions=[0.25,1.0]", "evaluate.adaptation_seeds=[0,1]",
        "evaluate.adaptation_new=all"])  # leave-one-subject-out: each subject new in turn
    ad = run(cfg)["adaptation"]
    assert ad["new_subjects"] == ["01", "02"] and list(ad["per_subject_top5"]) == ["01", "02"]
    assert ad["fractions"] == [0.25, 1.0] and ad["seeds"] == [0, 1]
    assert ad["n_train_trials"][0] < ad["n_train_trials"][1]
    models = ["adapted (shared frozen)", "adapted (fine-tuned copy)", "from scratch",
              "adapted (three ways averaged)", "adapted (best on validation)", "ridge"]
    assert list(ad["top5"]) == list(ad["top5_sd"]) == models
    # the way auto keeps, in each of the 4 (subject, seed) runs of each fraction
    kept = ad["best_on_validation"]
    assert list(kept) == ["0.25", "1"] and all(sum(c.values()) == 4 for c in kept.values())
    ways = ["frozen", "finetune", "scratch", "ensemble"]
    assert all(list(c) == ways for c in kept.values())
    row_of = dict(zip(ways, models[:4], strict=True))
    for fi, counts in enumerate(kept.values()):  # one way kept every time: its row, exactly
        chosen = [w for w, n in counts.items() if n]
        if len(chosen) == 1:
            assert ad["top5"][models[4]][fi] == ad["top5"][row_of[chosen[0]]][fi]
    assert ad["region_prior"] == {"01": ["02"], "02": ["01"]}  # the adapted ways' prior
    # each (subject, seed) run's own scores, whose mean is the curve
    runs = ad["per_run_top5"]
    assert list(runs) == ["01/seed-0", "01/seed-1", "02/seed-0", "02/seed-1"]
    for m in models:
        assert np.mean([r[m] for r in runs.values()], axis=0) == pytest.approx(
            ad["top5"][m], abs=1e-3)
    # what the new subject starts from: the shared model decodes its own subject
    assert list(ad["shared_top5"]) == ["01", "02"]
    assert all(v >= ad["chance"]["top5"] + 0.2 for v in ad["shared_top5"].values()), ad
    assert ad["chance"]["top5"] == pytest.approx(5 / 16)
    for m in models[:4]:  # with all its trials, each way decodes the new subject
        assert ad["top5"][m][-1] >= ad["chance"]["top5"] + 0.2, (m, ad)
    out = Path(cfg.paths.output_dir)
    assert (out / "adaptation.png").is_file()
    report = (out / "report.md").read_text()
    assert "adapted (shared frozen) | " in report and "Best on validation kept" in report
    assert f"without sub-01 {ad['shared_top5']['01']:.3f}" in report


def test_auto_keeps_the_first_way_within_one_standard_error_of_the_best():
    """Per-trial validation scores: scratch better by far more than its standard error wins;
    better by less (the best of more tries on a few trials) does not; ties and missing
    ways go to the order finetune, frozen, scratch."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.9, 60)
    def noise():  # zero mean: the gaps between the ways' means are the ones written
        e = 0.05 * rng.standard_normal(60)
        return e - e.mean()

    clear = {"finetune": base, "frozen": base - 0.02 + noise(), "scratch": base + 0.1 + noise()}
    assert choose_way(clear)["value"] == "scratch"
    slight = {"finetune": base, "frozen": base - 0.05, "scratch": base + 0.005 + noise()}
    choice = choose_way(slight)
    assert choice["best"] == "scratch" and choice["value"] == "finetune"
    assert choice["standard_error"]["finetune"] > 0.005
    assert choose_way({"finetune": base, "frozen": base, "scratch": base})["value"] == "finetune"
    assert choose_way({"finetune": None, "frozen": base - 0.3, "scratch": base})["value"] == \
        "scratch"
    assert choose_way({"finetune": None, "frozen": None, "scratch": base})["value"] == "scratch"
    assert choose_way({"finetune": None, "frozen": None, "scratch": None})["value"] == "finetune"


def test_ensemble_weighs_each_way_by_the_trials_behind_it():
    """``adapt.way=ensemble``'s weights: scratch by the new subjects' own train + validation
    trials per subject (n), the two pretrained ways together by the trained model's per
    subject (K; a bundle that does not record them: the region prior's count)."""
    from neurorecon.pipelines.train.adaptation import ensemble_weights
    from neurorecon.pipelines.train.datamodule import BrainDataModule
    from neurorecon.pipelines.train.region_prior import PRIOR_TRIALS

    class NewSubjects:  # what the weights read of a data module
        labels = ["05", "06"]

        @staticmethod
        def trained_trials(label: str) -> int:
            return {"05": 30, "06": 90}[label]

        mean_trained_trials = BrainDataModule.mean_trained_trials  # the real averaging

    for k in (300, None):
        w = ensemble_weights(NewSubjects(), k)
        k = k or PRIOR_TRIALS
        assert w == pytest.approx({"frozen": k / (60 + k) / 2, "finetune": k / (60 + k) / 2,
                                   "scratch": 60 / (60 + k)})
    assert ensemble_weights(NewSubjects(), 60)["scratch"] == pytest.approx(0.5)
