"""Stable unCLIP and Stable Diffusion + IP-Adapter generators, loaded from local directories.

Tiny random-config components (after diffusers' ``get_dummy_components``, nothing from a hub)
are assembled into the real pipelines, written with ``save_pretrained`` and loaded back through
the generator classes; 2 denoising steps on CPU. The tokenizer is built from a byte-level
``vocab.json`` + ``merges.txt`` written here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neurorecon.models.common.checks import DataError

EMB_DIM = 16  # CLIP image-embedding size of the tiny unCLIP
IPA_EMB_DIM = 12  # image-embedding size of the tiny IP-Adapter
HIDDEN = 16  # text hidden size == UNet cross-attention dim
MAX_LEN = 16  # tokenizer / text-encoder context length
RESOLUTION = 32  # unet sample_size 16 x vae_scale_factor 2


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models run on one thread: with 2 threads on the shared 2-core machine, OpenMP
    waiting made each 2-step generation take seconds instead of ~0.1 s."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ tiny components

def _write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """Byte-level CLIP vocab (every byte, alone and word-final) and an empty merge list."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder / "vocab.json", folder / "merges.txt"


def _text_components(root: Path) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = _write_tokenizer_files(root / "tokenizer_src")
    tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=MAX_LEN)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=HIDDEN, intermediate_size=16,
        num_attention_heads=2, num_hidden_layers=1, vocab_size=len(tokenizer),
        max_position_embeddings=MAX_LEN, projection_dim=HIDDEN))
    return {"tokenizer": tokenizer, "text_encoder": text_encoder}


def _unet(**extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(16, 32),
        cross_attention_dim=HIDDEN, attention_head_dim=(2, 4), norm_num_groups=8, **extra)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=RESOLUTION)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@pytest.fixture(scope="module")
def unclip_dir(tmp_path_factory) -> Path:
    """A tiny StableUnCLIPImg2ImgPipeline written with save_pretrained."""
    import torch
    from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import StableUnCLIPImageNormalizer
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    root = tmp_path_factory.mktemp("unclip")
    torch.manual_seed(0)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=EMB_DIM))
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                crop_size={"height": 32, "width": 32}),
        image_encoder=image_encoder,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=EMB_DIM),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        unet=_unet(class_embed_type="projection",
                   projection_class_embeddings_input_dim=2 * EMB_DIM),
        scheduler=_scheduler(), vae=_vae(), **_text_components(root))
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny StableDiffusionPipeline and a basic IP-Adapter weight file for its UNet."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = _unet()
    pipe = StableDiffusionPipeline(unet=unet, scheduler=_scheduler(), vae=_vae(),
                                   safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False,
                                   **_text_components(root))
    pipe.save_pretrained(root / "sd")
    # basic IP-Adapter layout (diffusers' load_ip_adapter): "image_proj.*" is the projection of the
    # pooled embedding to 4 tokens; "ip_adapter.<k>.to_{k,v}_ip.weight" are the extra key/value
    # maps of the k-th attention processor in unet.attn_processors order (cross-attention
    # processors only, so k = 1, 3, 5, ...)
    state = {"image_proj.proj.weight": 0.1 * torch.randn(4 * HIDDEN, IPA_EMB_DIM),
             "image_proj.proj.bias": torch.zeros(4 * HIDDEN),
             "image_proj.norm.weight": torch.ones(HIDDEN),
             "image_proj.norm.bias": torch.zeros(HIDDEN)}
    cross_attention = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for k, name in zip(range(1, 2 * len(cross_attention), 2), cross_attention, strict=True):
        hidden_size = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        for proj in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{k}.{proj}.weight"] = 0.3 * torch.randn(hidden_size, HIDDEN)
    (root / "ipa" / "models").mkdir(parents=True)
    save_file(state, root / "ipa" / "models" / "ip-adapter_tiny.safetensors")
    # a "Plus"-style file (image-token resampler, no pooled projection) to be refused
    save_file({"image_proj.latents": torch.zeros(1, 4, HIDDEN),
               **{k: v for k, v in state.items() if k.startswith("ip_adapter.")}},
              root / "ipa" / "models" / "ip-adapter-plus_tiny.safetensors")
    return {"sd": root / "sd", "ipa": root / "ipa"}


@pytest.fixture(scope="module")
def unclip(unclip_dir):
    from neurorecon.models.generators.diffusers_unclip import StableUnclipGenerator

    return StableUnclipGenerator(path=unclip_dir)


@pytest.fixture(scope="module")
def ip_adapter(sd_dirs):
    from neurorecon.models.generators.diffusers_ip_adapter import IpAdapterGenerator

    return IpAdapterGenerator(path=sd_dirs["sd"], ip_adapter_path=sd_dirs["ipa"],
                              ip_adapter_weight_name="ip-adapter_tiny.safetensors")


def _embeddings(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _arrays(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


# ------------------------------------------------------------------ Stable unCLIP

def test_unclip_generates_images_of_expected_size(unclip):
    from neurorecon.models.generators.base import Generator

    assert isinstance(unclip, Generator)
    assert (unclip.emb_dim, unclip.resolution) == (EMB_DIM, RESOLUTION)
    assert "StableUnCLIPImg2ImgPipeline" in unclip.note
    images = unclip.generate(_embeddings(3, EMB_DIM), steps=2, batch_size=2)
    assert len(images) == 3
    assert all(im.size == (RESOLUTION, RESOLUTION) and im.mode == "RGB" for im in images)


def test_unclip_is_deterministic_per_image(unclip):
    emb = _embeddings(3, EMB_DIM)
    first = _arrays(unclip.generate(emb, seed=7, steps=2, batch_size=3))
    again = _arrays(unclip.generate(emb, seed=7, steps=2, batch_size=3))
    np.testing.assert_array_equal(first, again)
    # image i is seeded with seed + i, whatever the batching (up to batched-matmul rounding)
    one_by_one = _arrays(unclip.generate(emb, seed=7, steps=2, batch_size=1))
    assert np.abs(first - one_by_one).max() <= 2
    other = _arrays(unclip.generate(emb, seed=8, steps=2, batch_size=3))
    assert np.abs(first - other).max() > 2


def test_unclip_starts_from_images_through_the_latents(unclip):
    """A start image (the retrieval-augmented or low-level start) is VAE-encoded, noised, and
    only the last ``strength`` of the schedule is run; the next call has its full schedule."""
    emb = _embeddings(2, EMB_DIM)
    starts = [Image.new("RGB", (RESOLUTION, RESOLUTION), c) for c in ((250, 20, 20),
                                                                   (20, 20, 250))]
    calls = []
    hook = unclip.pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        warm = unclip.generate(emb, seed=3, steps=4, init_images=starts, strength=0.5)
        n_img2img = len(calls)
        again = unclip.generate(emb, seed=3, steps=4, init_images=starts, strength=0.5)
        calls.clear()
        noise = unclip.generate(emb, seed=3, steps=4)
        n_full = len(calls)
    finally:
        hook.remove()
    assert (n_img2img, n_full) == (2, 4)  # half the schedule, then the whole one again
    assert np.array_equal(_arrays(warm), _arrays(again))  # deterministic per seed
    assert not np.array_equal(_arrays(warm), _arrays(noise))  # the start matters
    swapped = unclip.generate(emb, seed=3, steps=4, init_images=starts[::-1], strength=0.5)
    assert not np.array_equal(_arrays(warm)[0], _arrays(swapped)[0])


def test_unclip_text_embeddings(unclip):
    emb = _embeddings(2, EMB_DIM)
    text = np.random.default_rng(1).standard_normal((2, MAX_LEN, HIDDEN)).astype(np.float32)
    images = unclip.generate(emb, steps=2, text_embeddings=text)
    assert len(images) == 2
    with pytest.raises(DataError, match=rf"\(n=2, seq_len, {HIDDEN}\); got \(2, {HIDDEN}\)"):
        unclip.generate(emb, steps=2, text_embeddings=text[:, 0])


def test_unclip_encode_captions(unclip):
    """The caption pathway's targets: the pipeline's own prompt_embeds, fed back unchanged."""
    text = unclip.encode_captions(["a cat on a mat", "a rocket"])
    assert text.shape == (2, MAX_LEN, HIDDEN) and text.dtype == np.float32
    assert not np.allclose(text[0], text[1])
    assert len(unclip.generate(_embeddings(2, EMB_DIM), steps=2, text_embeddings=text)) == 2


def test_run_with_pretrained_unclip_and_captions(unclip_dir, sample_root, hf_dirs, tmp_path):
    """`run` end to end with a local CLIP embedder and a local Stable unCLIP: the decoded CLIP
    image embeddings condition the pipeline, and the caption pathway (ridge brain -> the
    pipeline's caption prompt_embeds, captions from the sample's stimuli.tsv) adds text."""
    from neurorecon.pipelines.run import run

    from .conftest import compose_stage
    from .test_train import FAST, SMALL_MEG

    cfg = compose_stage("run", tmp_path, [
        "data=bids", f"data.root={sample_root / 'meg'}", *FAST, *SMALL_MEG,
        "embedder=clip", f"embedder.path={hf_dirs['clip']}", "embedder.output=pooled",
        "reconstruct.enabled=true", "reconstruct/generator=stable_unclip",
        f"reconstruct.generator.path={unclip_dir}", "reconstruct.lowlevel=false",
        "reconstruct.captions=true", "reconstruct.steps=2",
        "reconstruct.skip_metrics=[inception,effnet]"])
    rec = run(cfg)["reconstruction"]
    assert rec["caption_pathway"] and rec["resolution"] == RESOLUTION
    assert rec["generator"].startswith("Stable unCLIP")
    assert rec["generator_training"] is None  # pretrained: nothing trained here
    # unCLIP takes raw CLIP image_embeds: decoded directions get the training targets' norm
    norms = rec["embedding_norm"]
    assert rec["embedding_scale"] == "raw"
    assert norms["conditioning_mean"] == pytest.approx(norms["training_targets_mean"], rel=1e-3)
    assert abs(norms["training_targets_mean"] - 1.0) > 0.05  # not unit: the test can tell
    # the retrieval-augmented start (the default) goes in through the latents
    assert rec["start"] == "retrieved"
    assert set(rec["metrics"]) == {"brain", "floor_retrieved", "ceiling", "start_only"}
    assert 0 <= rec["metrics"]["brain"]["alexnet2"] <= 1
    report = (Path(cfg.paths.output_dir) / "report.md").read_text()
    assert "caption pathway" in report and "Stable unCLIP" in report

    # the bundle names the pretrained backend (its local path, not a copy) and reloads it
    from neurorecon.pipelines.inference import Decoder

    decoder = Decoder.from_pretrained(Path(cfg.paths.output_dir) / "bundle")
    assert decoder.config.generator.kind == "diffusers"
    assert decoder.config.generator.target_norm == pytest.approx(
        norms["training_targets_mean"], rel=1e-3)
    assert not (Path(cfg.paths.output_dir) / "bundle" / "generator").exists()
    assert type(decoder.generator).__name__ == "StableUnclipGenerator"
    emb = decoder.encode(np.zeros((1, *_window_shape(decoder)), np.float32), subject="01",
                         head=decoder.generation_head)
    assert decoder.reconstruct(emb, steps=2)[0].size == (RESOLUTION, RESOLUTION)


def _window_shape(decoder):
    info = decoder.config.subjects["01"]
    return len(info.ch_names), info.n_times


def test_unclip_bad_input(unclip, unclip_dir, tmp_path):
    from neurorecon.models.generators.diffusers_unclip import StableUnclipGenerator

    with pytest.raises(DataError, match=rf"\(n, {EMB_DIM}\); got \(2, 10\)"):
        unclip.generate(_embeddings(2, 10), steps=2)
    with pytest.raises(DataError, match="2 start images for 1 embeddings"):
        unclip.generate(_embeddings(1, EMB_DIM), steps=2,
                        init_images=[Image.new("RGB", (RESOLUTION, RESOLUTION))] * 2)
    with pytest.raises(DataError, match="directory not found") as err:
        StableUnclipGenerator(path=tmp_path / "nowhere")
    assert "nowhere" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="model_index.json not found"):
        StableUnclipGenerator(path=tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(unclip_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(DataError, match="component folder 'vae'") as err:
        StableUnclipGenerator(path=broken)
    assert str(broken / "vae") in str(err.value)
    for weights in (broken / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    shutil.copytree(unclip_dir / "vae", broken / "vae")
    with pytest.raises(DataError, match="could not load") as err:
        StableUnclipGenerator(path=broken)
    assert str(broken) in str(err.value)


def test_unclip_from_hf_cache_revision(unclip_dir, tmp_path):
    from neurorecon.models.generators.diffusers_unclip import StableUnclipGenerator

    repo = tmp_path / "models--org--unclip"
    shutil.copytree(unclip_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    gen = StableUnclipGenerator(path=repo)
    assert gen.path == repo / "snapshots" / "abc123"
    assert StableUnclipGenerator(path=repo, revision="abc123").note.count("@abc123") == 1
    with pytest.raises(DataError, match="revision 'v2'.*abc123"):
        StableUnclipGenerator(path=repo, revision="v2")


# ------------------------------------------------------------------ SD + IP-Adapter

def test_ip_adapter_generates_images_of_expected_size(ip_adapter):
    from neurorecon.models.generators.base import Generator

    assert isinstance(ip_adapter, Generator)
    assert (ip_adapter.emb_dim, ip_adapter.resolution) == (IPA_EMB_DIM, RESOLUTION)
    assert "IP-Adapter" in ip_adapter.note
    emb = _embeddings(3, IPA_EMB_DIM)
    images = ip_adapter.generate(emb, seed=3, steps=2, batch_size=2)
    assert len(images) == 3
    assert all(im.size == (RESOLUTION, RESOLUTION) and im.mode == "RGB" for im in images)
    again = ip_adapter.generate(emb, seed=3, steps=2, batch_size=2)
    np.testing.assert_array_equal(_arrays(images), _arrays(again))
    # the embedding reaches the UNet: another embedding, same seed -> another image
    other = ip_adapter.generate(_embeddings(3, IPA_EMB_DIM, seed=1), seed=3, steps=2)
    assert np.abs(_arrays(images) - _arrays(other)).max() > 0
    # no guidance: (n, 1, emb_dim) without the negative half
    assert len(ip_adapter.generate(emb[:1], steps=2, guidance_scale=1.0)) == 1


def test_ip_adapter_low_level_init_images(ip_adapter):
    emb = _embeddings(2, IPA_EMB_DIM)
    init = [Image.new("RGB", (48, 48), color) for color in ("red", "blue")]
    images = ip_adapter.generate(emb, seed=0, steps=2, init_images=init, strength=0.5)
    assert [im.size for im in images] == [(RESOLUTION, RESOLUTION)] * 2
    again = ip_adapter.generate(emb, seed=0, steps=2, init_images=init, strength=0.5)
    np.testing.assert_array_equal(_arrays(images), _arrays(again))
    with pytest.raises(DataError, match="mixed sizes"):
        ip_adapter.generate(emb, steps=2, init_images=[init[0], Image.new("RGB", (40, 40))])
    with pytest.raises(DataError, match="1 init images for 2 embeddings"):
        ip_adapter.generate(emb, steps=2, init_images=init[:1])


def test_ip_adapter_bad_input(ip_adapter, sd_dirs, tmp_path):
    from neurorecon.models.generators.diffusers_ip_adapter import IpAdapterGenerator

    with pytest.raises(DataError, match=rf"\(n, {IPA_EMB_DIM}\); got \(2, {EMB_DIM}\)"):
        ip_adapter.generate(_embeddings(2, EMB_DIM), steps=2)
    kwargs = {"path": sd_dirs["sd"], "ip_adapter_path": sd_dirs["ipa"],
              "ip_adapter_weight_name": "ip-adapter_tiny.safetensors"}
    with pytest.raises(DataError, match="directory not found"):
        IpAdapterGenerator(**{**kwargs, "path": tmp_path / "nowhere"})
    with pytest.raises(DataError, match="IP-Adapter weight file not found") as err:
        IpAdapterGenerator(**{**kwargs, "ip_adapter_weight_name": "ip-adapter_sd15.safetensors"})
    assert "ip-adapter_sd15.safetensors" in str(err.value)
    with pytest.raises(DataError, match="not a basic IP-Adapter"):
        IpAdapterGenerator(**{**kwargs,
                              "ip_adapter_weight_name": "ip-adapter-plus_tiny.safetensors"})
    # an adapter for another Stable Diffusion version (cross-attention 8 instead of 16)
    import torch
    from safetensors.torch import save_file

    (tmp_path / "other").mkdir()
    save_file({"image_proj.proj.weight": torch.zeros(4 * 8, IPA_EMB_DIM)},
              tmp_path / "other" / "ip-adapter_sdxl.safetensors")
    with pytest.raises(DataError, match="cross-attention size 8, but .* UNet uses 16"):
        IpAdapterGenerator(**{**kwargs, "ip_adapter_path": tmp_path,
                              "ip_adapter_subfolder": "other",
                              "ip_adapter_weight_name": "ip-adapter_sdxl.safetensors"})
    broken = tmp_path / "sd"
    shutil.copytree(sd_dirs["sd"], broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(DataError, match="component folder 'text_encoder'"):
        IpAdapterGenerator(**{**kwargs, "path": broken})


def test_unclip_refuses_other_pipeline(sd_dirs):
    from neurorecon.models.generators.diffusers_unclip import StableUnclipGenerator

    with pytest.raises(DataError, match="declares pipeline 'StableDiffusionPipeline'"):
        StableUnclipGenerator(path=sd_dirs["sd"])
