"""The trained-decoder bundle: offline == bundle, relocation, bad bundles, streaming, no
Lightning/Hydra on the inference path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neurorecon.models.common.checks import DataError

from .conftest import compose_stage
from .test_train import SMALL_FMRI

FAST = ["trainer.max_epochs=3", "trainer.min_epochs=1", "datamodule.batch_size=8",
        "evaluate.time_resolved=false", "trainer.enable_progress_bar=false"]
#: a few steps: the generator only has to exist and round-trip, not to be good
TINY_GENERATOR = ["reconstruct.generator.resolution=16", "reconstruct.generator.train_steps=20",
                  "reconstruct.generator.block_out_channels=[8,16,16]", "reconstruct.steps=3",
                  "reconstruct.skip_metrics=[inception,alexnet2,alexnet5,effnet,swav]",
                  "reconstruct.grid_rows=2"]


@pytest.fixture(scope="module")
def fmri_run(sample_root, tmp_path_factory):
    from neurorecon.pipelines.run import run

    cfg = compose_stage("train", tmp_path_factory.mktemp("fmri"), [
        "data=bids", f"data.root={sample_root / 'fmri'}", "data.modality=fmri",
        "reconstruct.enabled=false", *FAST, *SMALL_FMRI])
    metrics = run(cfg)
    return Path(cfg.paths.output_dir), cfg, metrics


def _offline(run_dir: Path, cfg):
    """The run's final encoder and data module, rebuilt from its checkpoint."""
    from neurorecon.pipelines.export import data_of_checkpoint

    ckpt = json.loads((run_dir / "metrics.json").read_text())["training"]["best_checkpoint"]
    net, dm, _, _ = data_of_checkpoint(ckpt, cfg)
    return net, dm


@pytest.mark.parametrize("which", [pytest.param("meg", marks=pytest.mark.slow), "fmri"])
def test_bundle_decodes_like_the_training_run(which, request, sample_root, tmp_path):
    from neurorecon.pipelines.evaluate.stage import run as evaluate
    from neurorecon.pipelines.inference import Decoder, predict_split

    run_dir, cfg, metrics = request.getfixturevalue(f"{which}_run")
    decoder = Decoder.from_pretrained(run_dir / "bundle")
    assert decoder.modality == which and decoder.subjects == metrics["subjects"]

    # same embeddings for the cached test rows (model, layout, subspace buffers)
    net, dm = _offline(run_dir, cfg)
    offline = predict_split(net, dm, "test")
    test = dm.splits["test"]
    for k, label in enumerate(dm.labels):
        rows, X = dm.subject_rows("test", k)
        np.testing.assert_allclose(decoder.encode(X.numpy(), subject=label), offline[rows],
                                   atol=1e-5, rtol=0)
    assert len(test) == metrics["n_test"]

    # the raw dataset through the bundle's own transforms: identical retrieval metrics
    overrides = ["data=bids", f"data.root={sample_root / which}"]
    if which == "fmri":
        overrides.append("data.modality=fmri")
    ev = evaluate(compose_stage("evaluate", tmp_path, [f"bundle={run_dir / 'bundle'}",
                                                       *overrides]))
    for key in ("top1", "top5", "median_rank"):
        assert ev["retrieval"]["encoder"][key] == pytest.approx(
            metrics["retrieval"]["encoder"][key], abs=1e-9)
    assert ev["retrieval_per_subject"] == {
        s: {"encoder": m["encoder"]} for s, m in metrics["retrieval_per_subject"].items()}

    # retrieval among the gallery's test images == the offline top-1
    hits = decoder.retrieve(offline, k=5, split="test")
    truth = [dm.embedding_index["stim_file"].iloc[t] for t in test.target]
    top1 = np.mean([h[0]["image_id"] == t for h, t in zip(hits, truth, strict=True)])
    assert top1 == pytest.approx(metrics["retrieval"]["encoder"]["top1"])
    n = min(5, metrics["n_test_images"])
    assert all(len(h) == n and h[0]["score"] >= h[-1]["score"] for h in hits)


@pytest.mark.slow  # trains the MEG run (~30 s on 2 cores)
def test_meg_prepare_equals_the_preprocessing_cache(meg_run, sample_root):
    """prepare_meg on the raw recording (frozen scaler) == the cached training epochs."""
    from neurorecon.pipelines.data.events import EventSpec, read_events
    from neurorecon.pipelines.data.studies import find_recordings
    from neurorecon.pipelines.inference import Decoder
    from neurorecon.pipelines.preprocess.meg import read_raw

    run_dir, cfg, _ = meg_run
    decoder = Decoder.from_pretrained(run_dir / "bundle")
    _, dm = _offline(run_dir, cfg)
    rec = find_recordings(sample_root / "meg", modality="meg")[0]
    events = read_events(rec.events_path, bids_root=sample_root / "meg", spec=EventSpec())
    X = decoder.prepare_meg(read_raw(rec), subject=rec.subject, events=events)
    k = dm.labels.index(rec.subject)
    trials = dm.data.subjects[rec.subject].trials
    cached = np.asarray(dm.data.subjects[rec.subject].X)
    train = np.flatnonzero((trials["recording"] == rec.fpath.name).to_numpy()
                           & (trials["n_repeats"] == 1).to_numpy())
    onsets = events["onset"].to_numpy()
    for row in train[:20]:
        i = int(np.argmin(np.abs(onsets - trials["onset"].iloc[row])))
        np.testing.assert_allclose(X[i], cached[row], atol=1e-5, rtol=0)
    assert dm.labels[k] == rec.subject


@pytest.mark.slow  # trains the MEG run (~30 s on 2 cores)
def test_streamed_windows_through_the_bundle(meg_run, sample_root, tmp_path):
    """streaming_filter + meg_window == prepare_meg (causal bundle); zero-phase refused."""
    from neurorecon.pipelines.data.events import EventSpec, read_events
    from neurorecon.pipelines.data.studies import find_recordings
    from neurorecon.pipelines.inference import Decoder
    from neurorecon.pipelines.preprocess.meg import read_raw

    run_dir, _, _ = meg_run
    decoder = Decoder.from_pretrained(run_dir / "bundle")
    rec = find_recordings(sample_root / "meg", modality="meg")[0]
    events = read_events(rec.events_path, bids_root=sample_root / "meg", spec=EventSpec())
    raw = read_raw(rec)
    offline = decoder.prepare_meg(raw, subject=rec.subject, events=events)
    info = decoder.config.subjects[rec.subject]
    data = raw.copy().pick(info.ch_names).get_data()
    stream = decoder.streaming_filter(rec.subject, sfreq=raw.info["sfreq"])
    out = np.concatenate([stream.process(data[:, s : s + 333])
                          for s in range(0, data.shape[1], 333)], axis=1)
    p = decoder.meg_params
    first = int(round(p.tmin * p.sfreq))
    for i, onset in enumerate(events["onset"].to_numpy()[:10]):
        s = int(round(onset * p.sfreq)) + first
        win = decoder.meg_window(out[:, s : s + info.n_times], subject=rec.subject)
        np.testing.assert_allclose(win, offline[i], atol=1e-4, rtol=0)
    with pytest.raises(DataError, match="window of shape"):
        decoder.meg_window(out[:, :5], subject=rec.subject)

    zero = tmp_path / "zero"
    shutil.copytree(run_dir / "bundle", zero)
    config = json.loads((zero / "config.json").read_text())
    config["preprocessing"]["params"]["phase"] = "zero"
    (zero / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"(?s)zero-phase.*preprocess\.meg\.phase=causal"):
        Decoder.from_pretrained(zero).streaming_filter(rec.subject)


def test_bundle_survives_a_copy_and_holds_no_absolute_path(fmri_run, tmp_path):
    from omegaconf import OmegaConf

    from neurorecon.pipelines.export import localized
    from neurorecon.pipelines.inference import Decoder

    run_dir, cfg, _ = fmri_run
    moved = tmp_path / "elsewhere" / "decoder"
    shutil.copytree(run_dir / "bundle", moved)
    for f in moved.rglob("*"):
        if f.suffix in (".json", ".tsv", ".md"):
            text = f.read_text()
            assert str(run_dir) not in text and str(tmp_path) not in text, f
    a, b = Decoder.from_pretrained(run_dir / "bundle"), Decoder.from_pretrained(moved)
    label = a.subjects[0]
    x = np.random.default_rng(0).standard_normal((3, a.config.subjects[label].n_voxels))
    np.testing.assert_array_equal(a.encode(x, subject=label), b.encode(x, subject=label))
    assert b.gallery.thumbnail(0).size[0] <= 96
    # the recipe a later stage reruns (adapt, evaluate) gets this machine's folders back
    portable = b.config.provenance.config
    assert portable["paths"]["cache_dir"] == "<paths.cache_dir>"
    paths = OmegaConf.to_container(cfg.paths, resolve=True)
    assert localized(portable, paths)["paths"] == {k: str(v) if isinstance(v, str) else v
                                                   for k, v in paths.items()}
    card = (moved / "README.md").read_text()
    assert "ridge" in card and "chance" in card and "Substitutes" in card


def test_a_bundle_loads_as_the_decoder_of_its_modality(fmri_run):
    """One class per modality: the fMRI bundle loads as an FmriDecoder, which has no MEG
    methods and says so (a clear error, not an AttributeError); a MEG-only loader refuses it."""
    from neurorecon.pipelines.inference import BundleError, Decoder, FmriDecoder, MegDecoder

    bundle = fmri_run[0] / "bundle"
    decoder = Decoder.from_pretrained(bundle)
    assert type(decoder) is FmriDecoder and FmriDecoder.from_pretrained(bundle).modality == "fmri"
    assert type(Decoder(net=decoder.net, config=decoder.config)) is FmriDecoder
    for name in MegDecoder.METHODS:
        with pytest.raises(DataError, match=f"{name} needs a MEG decoder; this bundle decodes "
                                            "FMRI"):
            getattr(decoder, name)
    with pytest.raises(AttributeError, match="no attribute 'no_such_method'"):
        decoder.no_such_method  # noqa: B018
    with pytest.raises(BundleError, match="MegDecoder loads MEG bundles; this one decodes FMRI"):
        MegDecoder.from_pretrained(bundle)


def test_broken_bundles_give_one_line_errors(fmri_run, tmp_path):
    import nibabel as nib

    from neurorecon.pipelines.inference import BundleError, Decoder

    run_dir, _, _ = fmri_run

    def copy(name):
        shutil.copytree(run_dir / "bundle", tmp_path / name)
        return tmp_path / name

    def one_line(exc_info, *words):
        msg = str(exc_info.value)
        assert "\n" not in msg, msg
        for w in words:
            assert w in msg, msg

    bad = copy("truncated")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(BundleError) as e:
        Decoder.from_pretrained(bad)
    one_line(e, "model.safetensors", "truncated")

    bad = copy("nomask")
    label = json.loads((bad / "config.json").read_text())["subjects"]
    first = next(iter(label))
    (bad / "masks" / f"sub-{first}_mask.nii.gz").unlink()
    with pytest.raises(BundleError) as e:
        Decoder.from_pretrained(bad)
    one_line(e, f"sub-{first}_mask.nii.gz", "missing")

    bad = copy("version")
    config = json.loads((bad / "config.json").read_text())
    config["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError) as e:
        Decoder.from_pretrained(bad)
    one_line(e, "config.json", "version 99", "neurorecon export")

    # a writer that drifts from the schema (a renamed field, a missing one) fails at load,
    # naming the field, instead of a reader finding the key missing later
    bad = copy("schema")
    config = json.loads((bad / "config.json").read_text())
    config["embedder"]["dim"] = config["embedder"].pop("emb_dim")
    del config["subjects"][first]["n_voxels"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError) as e:
        Decoder.from_pretrained(bad)
    one_line(e, "config.json", "schema", "embedder.emb_dim", "embedder.dim",
             f"subjects.{first}")

    decoder = Decoder.from_pretrained(run_dir / "bundle")
    mask = decoder.mask(first)
    betas = nib.Nifti1Image(np.random.default_rng(0).standard_normal(
        (*mask.shape, 4)).astype(np.float32), mask.affine)
    coarse = nib.Nifti1Image(np.asarray(betas.dataobj)[::2, ::2, ::2],  # another grid
                             betas.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
    nib.save(coarse, tmp_path / "sub-x_betas.nii.gz")
    with pytest.raises(DataError) as e:
        decoder.prepare_betas(tmp_path / "sub-x_betas.nii.gz", subject=first)
    one_line(e, "sub-x_betas.nii.gz", "another voxel grid", "mask shape (")
    assert decoder.prepare_betas(betas, subject=first).shape == (
        4, decoder.config.subjects[first].n_voxels)


@pytest.mark.slow  # trains the MEG run (~30 s on 2 cores)
def test_bundle_reconstructs_like_the_run(meg_run):
    from PIL import Image

    from neurorecon.pipelines.inference import Decoder

    run_dir, cfg, metrics = meg_run
    decoder = Decoder.from_pretrained(run_dir / "bundle")
    net, dm = _offline(run_dir, cfg)
    label = dm.labels[0]
    rows, X = dm.subject_rows("test", 0)
    emb = decoder.encode(X.numpy(), subject=label, head=decoder.generation_head)
    found = decoder.encode(X.numpy()[:2], subject=label, head="clip")
    images = decoder.reconstruct(emb[:2], subject=label, lowlevel=X.numpy()[:2],
                                 retrieval=found, seed=int(rows[0]))
    assert len(images) == 2 and "stand-in" in images[0].info["neurorecon_note"]
    saved = sorted((run_dir / "reconstructions").glob(f"test{rows[0]:03d}_*.png"))
    offline = np.asarray(Image.open(saved[0]).convert("RGB"), np.float32)
    diff = np.abs(np.asarray(images[0], np.float32) - offline).mean()
    assert diff < 2.0, diff  # same seed, generator and start (up to float rounding)
    assert metrics["reconstruction"]["n_images"] == len(dm.splits["test"])
    # retrieval-augmented start: the gallery's training image nearest to the embedding (k=1)
    split = decoder.gallery.index["split"].to_numpy()
    train = np.flatnonzero((split == "train") | (split == "val"))
    g = decoder.gallery.embeddings[train]
    best = train[np.argmax((g / np.linalg.norm(g, axis=1, keepdims=True)) @ emb[0])]
    start = decoder.retrieved_starts(emb[:1], k=1)[0]
    res = decoder.generator.resolution
    expected = decoder.gallery.thumbnail(int(best)).resize((res, res), Image.BICUBIC)
    assert np.abs(np.asarray(start, float) - np.asarray(expected, float)).max() <= 1
    assert decoder.reconstruct(emb[:1], start="retrieved")[0].size == (res, res)
    with pytest.raises(DataError, match="start='bogus'"):
        decoder.reconstruct(emb[:1], start="bogus")
    # strength 0 (a run that found generating added nothing): the starts themselves
    kept = decoder.reconstruct(emb[:2], strength=0)
    for im, first in zip(kept, decoder.start_images(emb[:2]), strict=True):
        assert np.array_equal(np.asarray(im), np.asarray(first))
        assert "stand-in" in im.info["neurorecon_note"]
    with pytest.raises(DataError, match="strength=0 keeps the start image"):
        decoder.reconstruct(emb[:1], strength=0, start="noise")


@pytest.mark.slow  # trains the MEG run (~30 s on 2 cores)
def test_reconstruct_stage_through_the_bundle_reproduces_the_run(meg_run, sample_root,
                                                                  tmp_path):
    """``neurorecon reconstruct bundle=<run>/bundle`` on the run's data: the raw recordings
    through the bundle's recipe, encoder, low-level pathway, start and generator give the
    run's own reconstructions (the run scores the same decoder before writing it)."""
    from PIL import Image

    from neurorecon.pipelines.evaluate.reconstruction import run as reconstruct

    run_dir, cfg, metrics = meg_run
    overrides = [f"bundle={run_dir / 'bundle'}", "data=bids",
                 f"data.root={sample_root / 'meg'}", *TINY_GENERATOR[4:]]
    rc = compose_stage("reconstruct", tmp_path, overrides)
    out = reconstruct(rc)
    out_dir, ran = Path(rc.paths.output_dir), metrics["reconstruction"]
    assert out["n_images"] == ran["n_images"] and set(out["metrics"]) == set(ran["metrics"])
    assert out["retrieval"]["lowlevel_rerank"] == ran["retrieval"]["lowlevel_rerank"]
    assert out["retrieval"]["lowlevel_rerank_choice"]["source"] == "the bundle"
    assert out["generator_training"] == ran["generator_training"]
    # the model card says how the bundle generates (a strength of 0 runs no sampler step)
    card = (run_dir / "bundle" / "README.md").read_text()
    assert f"strength {ran['strength']:g}" in card
    assert ("no sampler step" in card) == (ran["strength"] == 0)
    mine = sorted((out_dir / "reconstructions").glob("*.png"))
    theirs = sorted((run_dir / "reconstructions").glob("*.png"))
    assert [p.name for p in mine] == [p.name for p in theirs]
    for a, b in zip(mine, theirs, strict=True):
        # starts come from the gallery's 96 px thumbnails where the run had the photos
        diff = np.abs(np.asarray(Image.open(a), np.float32)
                      - np.asarray(Image.open(b), np.float32)).mean()
        assert diff < 2.0, (a.name, diff)
    for name, m in out["metrics"].items():
        assert m["pixcorr"] == pytest.approx(ran["metrics"][name]["pixcorr"], abs=0.05), name
    saved = json.loads((out_dir / "metrics.json").read_text())
    assert saved["bundle"] == str(run_dir / "bundle") and "checkpoint" not in saved
    with pytest.raises(DataError, match="caption pathway is fitted on a training run") as e:
        reconstruct(compose_stage("reconstruct", tmp_path / "c",
                                  [*overrides, "reconstruct/generator=stable_unclip",
                                   "reconstruct.captions=true"]))
    assert "neurorecon run ... reconstruct.captions=true" in str(e.value)


@pytest.mark.slow  # trains the MEG run (~30 s on 2 cores)
def test_inference_imports_neither_lightning_nor_hydra(meg_run):
    run_dir, _, _ = meg_run
    code = (
        "import sys, numpy as np\n"
        "from neurorecon.pipelines.inference import Decoder\n"
        f"d = Decoder.from_pretrained({str(run_dir / 'bundle')!r})\n"
        "s = d.subjects[0]; c = d.config.subjects[s]\n"
        "x = np.zeros((2, len(c.ch_names), c.n_times), np.float32)\n"
        "d.retrieve(d.encode(x, subject=s), k=3)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'hydra', "
        "'pytorch_lightning'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.slow  # trains the MEG run (~30 s on 2 cores)
def test_ensemble_bundle_stores_the_shared_readout_once(meg_run, tmp_path):
    """The MEG ensemble's members share their read-out: the bundle's model file holds it once
    (the copy named in the file's metadata) and the loaded members hold equal read-outs; a
    copy naming a tensor the file lacks is a one-line error naming the file."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from neurorecon.pipelines.inference import BundleError, Decoder

    run_dir, _, _ = meg_run
    weights = run_dir / "bundle" / "model.safetensors"
    with safe_open(weights, framework="pt") as f:
        keys, tied = set(f.keys()), json.loads(f.metadata()["neurorecon.tied"])
        state = {k: f.get_tensor(k) for k in keys}
    assert tied["members.1.readout_weight"] == "members.0.readout_weight"
    assert all(copy.startswith("members.1.") and src == "members.0." + copy[10:]
               for copy, src in tied.items()) and not set(tied) & keys
    readout = state["members.0.readout_weight"]
    assert weights.stat().st_size < 1.2 * readout.numel() * readout.element_size()
    members = Decoder.from_pretrained(run_dir / "bundle").net.members
    assert torch.equal(members[0].readout_weight, readout)
    assert torch.equal(members[1].readout_weight, readout)

    bad = tmp_path / "bundle"
    shutil.copytree(run_dir / "bundle", bad)
    save_file(state, bad / "model.safetensors",
              metadata={"neurorecon.tied": json.dumps({**tied, "members.1.readout_bias": "x"})})
    with pytest.raises(BundleError, match="names tensors the file lacks") as e:
        Decoder.from_pretrained(bad)
    assert "model.safetensors" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow  # trains the MEG run (~30 s on 2 cores)
def test_export_stage_round_trips(meg_run, tmp_path):
    from neurorecon.pipelines.export import run as export
    from neurorecon.pipelines.inference import Decoder

    run_dir, _, metrics = meg_run
    out = tmp_path / "exported"
    cfg = compose_stage("export", tmp_path, [
        f"checkpoint={metrics['training']['best_checkpoint']}", f"export.out={out}",
        "export.generator=false"])
    export(cfg)
    a, b = Decoder.from_pretrained(run_dir / "bundle"), Decoder.from_pretrained(out)
    assert a.config.net_config == b.config.net_config
    assert b.config.generator is None
    with pytest.raises(DataError, match="bundle directory exists"):
        export(cfg)
    with pytest.raises(DataError, match="no generator"):
        b.reconstruct(np.zeros((1, a.config.embedder.emb_dim), np.float32))


def test_fmri_train_statistics_normalise_single_trials(sample_root, tmp_path):
    """zscore=train: per-voxel statistics of the train trials only, stored in the cache and the
    bundle; one new run is normalised with them exactly as in training."""
    from neurorecon.pipelines.data.events import EventSpec, read_events
    from neurorecon.pipelines.data.studies import find_recordings
    from neurorecon.pipelines.evaluate.stage import run as evaluate
    from neurorecon.pipelines.inference import NORMALISATION, Decoder
    from neurorecon.pipelines.preprocess.fmri import as_stim_file
    from neurorecon.pipelines.run import run

    cfg = compose_stage("train", tmp_path / "t", [
        "data=bids", f"data.root={sample_root / 'fmri'}", "data.modality=fmri",
        "preprocess.fmri.zscore=train", "reconstruct.enabled=false", *FAST, *SMALL_FMRI])
    metrics = run(cfg)
    bundle = Path(cfg.paths.output_dir) / "bundle"
    assert (bundle / NORMALISATION).is_file()
    decoder = Decoder.from_pretrained(bundle)
    net, dm = _offline(Path(cfg.paths.output_dir), cfg)
    sub = dm.data.subjects[dm.labels[0]]
    X, trials = np.asarray(sub.X), sub.trials
    train = (trials["split"] == "train").to_numpy()
    np.testing.assert_allclose(X[train].mean(0), 0, atol=1e-4)  # fitted on train trials only
    np.testing.assert_allclose(X[train].std(0), 1, atol=1e-3)
    assert abs(X[~train].mean(0)).max() > 1e-3  # the test trials did not shape the statistics

    rec = next(r for r in find_recordings(sample_root / "fmri", modality="fmri")
               if r.subject == dm.labels[0])
    events = as_stim_file(read_events(rec.events_path, bids_root=sample_root / "fmri",
                                      spec=EventSpec()), EventSpec())
    # the run's GLM uses the HRF delay chosen for the subject in training (hrf_onset=auto)
    assert decoder.config.subjects[rec.subject].hrf_onset == (
        dm.recipe["subjects"][rec.subject]["hrf_onset"])
    B = decoder.prepare_fmri(rec.fpath, events, subject=rec.subject)
    rows = np.flatnonzero(train & (trials["run"].astype(str) == str(rec.run)).to_numpy())
    onsets = events["onset"].to_numpy()
    for r in rows:
        i = int(np.argmin(np.abs(onsets - trials["onset"].iloc[r])))
        np.testing.assert_allclose(B[i], X[r], atol=1e-4, rtol=0)
    ev = evaluate(compose_stage("evaluate", tmp_path / "e", [
        f"bundle={bundle}", "data=bids", f"data.root={sample_root / 'fmri'}",
        "data.modality=fmri"]))
    assert ev["retrieval"]["encoder"] == pytest.approx(metrics["retrieval"]["encoder"])
