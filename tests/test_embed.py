"""The embed stage: packaged and local-directory embedders on real photos, cache reuse, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from neurorecon.models.common.checks import DataError
from neurorecon.pipelines.embed import images as E
from neurorecon.pipelines.embed.run import load_embeddings, run

from .conftest import compose_stage

#: concept -> skimage.data photo; each concept gets crops of its own photo as exemplars
PHOTOS = {"astronaut": "astronaut", "cat": "chelsea", "coffee": "coffee"}
CAPTIONS = {
    "astronaut": "a portrait of an astronaut in a spacesuit",
    "cat": "a tabby cat looking at the camera",
    "coffee": "a cup of coffee on a saucer",
}
N_EXEMPLARS = 2
SIZE = 80


def _crops(photo: np.ndarray, n: int, rng: np.random.Generator) -> list[Image.Image]:
    """``n`` distinct random square crops (75% of the short side) of one photo."""
    h, w = photo.shape[:2]
    side = int(0.75 * min(h, w))
    out = []
    for _ in range(n):
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(photo[y : y + side, x : x + side, :3])
        out.append(crop.resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    return out


@pytest.fixture(scope="module")
def stim_root(tmp_path_factory) -> Path:
    """A BIDS-like root: stimuli/<concept>/<concept>_NN.jpg + stimuli.tsv, and one fMRI run.

    The run's events name 4 of the 6 images, so ``embed.images=events`` and ``all`` differ.
    """
    import nibabel as nib
    import skimage.data

    root = tmp_path_factory.mktemp("embed") / "bids"
    rng = np.random.default_rng(0)
    rows = []
    for concept, name in PHOTOS.items():
        photo = getattr(skimage.data, name)()
        for i, crop in enumerate(_crops(photo, N_EXEMPLARS, rng), start=1):
            rel = f"{concept}/{concept}_{i:02d}.jpg"
            (root / "stimuli" / concept).mkdir(parents=True, exist_ok=True)
            crop.save(root / "stimuli" / rel, quality=92)
            rows.append({"stim_file": rel, "concept": concept, "exemplar": i,
                         "split": "train", "caption": CAPTIONS[concept]})
    pd.DataFrame(rows).to_csv(root / "stimuli" / "stimuli.tsv", sep="\t", index=False)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "embed test", "BIDSVersion": "1.9.0"}))
    func = root / "sub-01" / "func"
    func.mkdir(parents=True)
    bold = nib.Nifti1Image(np.zeros((3, 3, 3, 10), np.float32), np.eye(4))
    nib.save(bold, func / "sub-01_task-images_bold.nii.gz")
    (func / "sub-01_task-images_bold.json").write_text(json.dumps({"RepetitionTime": 1.0}))
    shown = [r["stim_file"] for r in rows if r["exemplar"] == 1] + [rows[1]["stim_file"]]
    pd.DataFrame({
        "onset": [1.0, 3.0, 5.0, 7.0], "duration": 1.0, "stim_file": shown,
        "trial_type": ["train", "train", "test", "train"],
    }).to_csv(func / "sub-01_task-images_events.tsv", sep="\t", index=False)
    return root


@pytest.fixture(scope="module")
def photos(stim_root) -> tuple[list[Image.Image], np.ndarray]:
    table = pd.read_csv(stim_root / "stimuli" / "stimuli.tsv", sep="\t")
    images = [Image.open(stim_root / "stimuli" / s).convert("RGB") for s in table["stim_file"]]
    return images, table["concept"].to_numpy()


def _check_embedder(embedder, items, shape) -> np.ndarray:
    a = embedder.embed(items, batch_size=4)
    b = embedder.embed(items, batch_size=4)
    assert a.dtype == np.float32 and a.shape == (len(items), *shape)
    assert np.isfinite(a).all() and np.abs(a).sum() > 0
    np.testing.assert_array_equal(a, b)  # deterministic
    spec = embedder.spec
    assert list(spec["shape"]) == list(shape) and spec["emb_dim"] == shape[-1]
    for key in ("name", "source", "weights", "revision", "layer", "pooling", "substitute_note"):
        assert spec[key], key
    return a


@pytest.mark.parametrize(
    ("make", "dim"),
    [
        (lambda: E.EfficientNetLiteEmbedder(), 1280),
        (lambda: E.AlexNetEmbedder(layer="conv5"), 256),
        (lambda: E.AlexNetEmbedder(layer="conv2", pooling="flatten", pool_size=3), 192 * 9),
        (lambda: E.InceptionEmbedder(), 2048),
    ],
    ids=["efficientnet-lite0", "alexnet-conv5", "alexnet-conv2-flatten", "inception"],
)
def test_packaged_embedders(photos, make, dim):
    images, _ = photos
    embedder = make()
    _check_embedder(embedder, images[::2], (dim,))  # one exemplar per concept
    assert "not CLIP" in embedder.spec["substitute_note"]
    assert embedder.spec["weights"].startswith("sha256:")


def _cosine(x: np.ndarray) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


@pytest.mark.parametrize("make", [E.EfficientNetLiteEmbedder, E.AlexNetEmbedder],
                         ids=["efficientnet-lite0", "alexnet-conv5"])
def test_exemplars_of_a_concept_are_closer(photos, make):
    """Crops of one photo are nearer each other than crops of different photos."""
    images, concepts = photos
    sim = _cosine(make().embed(images))
    same = concepts[:, None] == concepts[None, :]
    off = ~np.eye(len(images), dtype=bool)
    assert sim[same & off].mean() > sim[~same].mean() + 0.05
    np.fill_diagonal(sim, -np.inf)
    assert (concepts[sim.argmax(axis=1)] == concepts).all()  # nearest neighbour: same concept


def test_local_clip_and_dinov2(photos, hf_dirs):
    images, _ = photos
    clip = E.ClipVisionEmbedder(path=str(hf_dirs["clip"]))
    _check_embedder(clip, images, (16,))
    tokens = E.ClipVisionEmbedder(path=str(hf_dirs["clip"]), output="tokens")
    _check_embedder(tokens, images[:3], ((32 // 8) ** 2 + 1, 32))
    assert tokens.spec["revision"] == clip.spec["revision"]  # same directory, same identity
    _check_embedder(E.DinoV2Embedder(path=str(hf_dirs["dinov2"])), images, (32,))
    mean = _check_embedder(E.DinoV2Embedder(path=str(hf_dirs["dinov2"]), pooling="mean"),
                           images[:2], (32,))
    cls = E.DinoV2Embedder(path=str(hf_dirs["dinov2"])).embed(images[:2])
    assert not np.allclose(mean, cls)


def test_local_dir_errors(tmp_path, hf_dirs):
    missing = tmp_path / "no-such-model"
    with pytest.raises(DataError, match="does not exist") as err:
        E.ClipVisionEmbedder(path=str(missing))
    assert str(missing) in str(err.value) and "save_pretrained" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="config.json") as err:
        E.DinoV2Embedder(path=str(empty))
    assert str(empty) in str(err.value)
    partial = tmp_path / "partial"  # model without its image processor
    partial.mkdir()
    for f in ("config.json", "model.safetensors"):
        (partial / f).write_bytes((hf_dirs["dinov2"] / f).read_bytes())
    with pytest.raises(DataError, match="preprocessor_config.json") as err:
        E.DinoV2Embedder(path=str(partial))
    assert str(partial) in str(err.value)
    with pytest.raises(DataError, match="no local model directory"):
        E.ClipVisionEmbedder(path="???")


def test_text_embedder():
    captions = ["a tabby cat looking at the camera", "a kitten sitting on a sofa",
                "a rocket on a launch pad", "a cup of coffee on a saucer"]
    text = E.TextEmbedder()
    emb = _check_embedder(text, captions, (384,))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 3]  # cat ~ kitten, not rocket/coffee
    assert "not CLIP" in text.spec["substitute_note"]


def _stage(tmp_path: Path, root: Path, *overrides: str):
    return compose_stage("embed", tmp_path, ["data=bids", f"data.root={root}",
                                             "data.modality=fmri", *overrides])


def test_embed_stage_cache(tmp_path, stim_root):
    first = run(_stage(tmp_path, stim_root))
    entry = Path(first["cache"])
    assert not first["reused_cache"] and first["n_items"] == 4 and first["emb_dim"] == 1280
    rel = entry.relative_to(tmp_path / "cache" / "embeddings")
    assert rel.parts[0].startswith("efficientnet-lite0@") and rel.parts[1] == "head-avg"
    assert rel.parts[2].startswith("images-")
    emb, index, spec = load_embeddings(entry)
    assert emb.shape == (4, 1280) and emb.dtype == np.float32
    assert list(index["stim_file"]) == sorted(index["stim_file"])
    assert set(index["concept"]) == set(PHOTOS)
    assert "not CLIP" in spec["substitute_note"]
    out = tmp_path / "runs" / "embed"
    summary = json.loads((out / "embed_summary.json").read_text())
    assert summary["cache"] == str(entry) and summary["spec"]["substitute_note"]
    assert (out / "embeddings.png").stat().st_size > 10_000

    manifest = (entry / "manifest.json").read_text()
    mtime = (entry / "manifest.json").stat().st_mtime_ns
    second = run(_stage(tmp_path, stim_root))
    assert second["reused_cache"] and second["cache"] == first["cache"]
    assert (entry / "manifest.json").read_text() == manifest
    assert (entry / "manifest.json").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(load_embeddings(entry)[0], emb)

    alex = run(_stage(tmp_path, stim_root, "embedder=alexnet", "embedder.layer=conv3"))
    assert Path(alex["cache"]).parent.name == "conv3-avg" and alex["emb_dim"] == 384
    alex5 = run(_stage(tmp_path, stim_root, "embedder=alexnet"))
    assert alex5["cache"] != alex["cache"] and not alex5["reused_cache"]

    every = run(_stage(tmp_path, stim_root, "embed.images=all"))
    assert every["n_items"] == 6 and every["cache"] != first["cache"]


def test_embed_stage_captions(tmp_path, stim_root):
    summary = run(_stage(tmp_path, stim_root, "embedder=minilm_text", "embed.images=all"))
    emb, index, spec = load_embeddings(summary["cache"])
    assert Path(summary["cache"]).name.startswith("captions-")
    assert emb.shape == (6, 384) and spec["input"] == "text"
    assert list(index["caption"]) == [CAPTIONS[c] for c in index["concept"]]

    table = tmp_path / "captions.tsv"
    pd.DataFrame({"stim_file": ["cat/cat_01.jpg"], "caption": ["a cat"]}).to_csv(
        table, sep="\t", index=False)
    with pytest.raises(DataError, match="no caption for 5 of 6") as err:
        run(_stage(tmp_path, stim_root, "embedder=minilm_text", "embed.images=all",
                   f"embed.captions={table}"))
    assert str(table) in str(err.value)


def test_embed_stage_local_clip_tokens(tmp_path, stim_root, hf_dirs):
    with pytest.raises(DataError, match="needs embedder.path"):
        run(_stage(tmp_path, stim_root, "embedder=clip"))
    summary = run(_stage(tmp_path, stim_root, "embedder=clip", f"embedder.path={hf_dirs['clip']}",
                         "embedder.output=tokens"))
    emb, index, spec = load_embeddings(summary["cache"])
    assert emb.shape == (4, 17, 32) and spec["shape"] == [17, 32]  # tokens kept 3-D
    assert Path(summary["cache"]).parent.name == "last_hidden_state-none"
    with pytest.raises(DataError, match="does not exist") as err:
        run(_stage(tmp_path, stim_root, "embedder=dinov2", f"embedder.path={tmp_path / 'nope'}"))
    assert str(tmp_path / "nope") in str(err.value)


def test_embed_stage_bad_image(tmp_path, stim_root):
    root = tmp_path / "bids"
    (root / "stimuli" / "cat").mkdir(parents=True)
    src = stim_root / "stimuli" / "cat" / "cat_01.jpg"
    (root / "stimuli" / "cat" / "cat_01.jpg").write_bytes(src.read_bytes())
    bad = root / "stimuli" / "cat" / "cat_02.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match="not a readable image") as err:
        run(_stage(tmp_path, root, "embed.images=all"))
    assert str(bad) in str(err.value)
    truncated = root / "stimuli" / "cat" / "cat_02.jpg"  # valid header, cut-off data
    truncated.write_bytes(src.read_bytes()[: len(src.read_bytes()) // 3])
    with pytest.raises(DataError, match="not a readable image") as err:
        run(_stage(tmp_path, root, "embed.images=all"))
    assert str(truncated) in str(err.value)
    assert not list((tmp_path / "cache").rglob("manifest.json"))  # nothing half-written


def test_load_embeddings_rejects_incomplete(tmp_path):
    with pytest.raises(DataError, match="manifest") as err:
        load_embeddings(tmp_path)
    assert str(tmp_path) in str(err.value)
