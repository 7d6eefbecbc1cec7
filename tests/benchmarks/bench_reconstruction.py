"""Benchmark: embedded generator training time and sampling seconds per image on CPU.

Uses the packaged default config (``configs/reconstruct/default.yaml`` and
``configs/reconstruct/generator/embedded.yaml``) and the sample stimuli written by
``neurorecon sample`` (train exemplars for training, the held-out test exemplars for
sampling; EfficientNet-Lite0 embeddings, the default embedder). Prints the training time and
final loss, then seconds per image from noise and from a low-level initial image (img2img),
and the ceiling quality (generator fed the true embeddings of unseen test images; PixCorr and
SSIM at the generator's resolution). Target (issue 4): ``make demo`` with reconstruction
within 10 minutes on 2 cores.

Not a test (no ``test_`` names, no assertions); run it after ``neurorecon sample``::

    .venv/bin/python tests/benchmarks/bench_reconstruction.py [--threads 2] [--json out.json]

``--set key=value`` overrides the config (e.g. ``--set reconstruct.generator.train_steps=600``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("neurorecon.configs", version_base="1.3"):
        return hydra_compose(config_name="run", overrides=overrides)


def main() -> None:
    from neurorecon.pipelines.embed.images import EfficientNetLiteEmbedder
    from neurorecon.pipelines.evaluate.recon_metrics import compare_reconstructions
    from neurorecon.pipelines.reconstruct.generation import embedded_generator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stimuli", default="data/sample/meg/stimuli",
                        help="folder of <concept>/<concept>_NN.jpg; _09 = test exemplar")
    parser.add_argument("--set", action="append", default=[], help="Hydra override")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = compose(args.set).reconstruct
    g = cfg.generator
    files = sorted(Path(args.stimuli).glob("*/*.jpg"))
    if not files:
        raise SystemExit(f"no stimuli under {args.stimuli}: run `neurorecon sample` first")
    images = [Image.open(f).convert("RGB") for f in files]
    is_test = np.array([f.stem.endswith("_09") for f in files])
    emb = EfficientNetLiteEmbedder(variant="lite0").embed(images, batch_size=32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    train = np.flatnonzero(~is_test)
    test = np.flatnonzero(is_test)

    # trained through the stage's own function, into a fresh cache so the time is real
    with tempfile.TemporaryDirectory() as cache_dir:
        gen, info = embedded_generator(g, images=[images[i] for i in train],
                                       embeddings=emb[train], cache_dir=cache_dir)
    res = gen.resolution
    kw = dict(steps=int(cfg.steps), guidance_scale=float(cfg.guidance_scale))
    gen.generate(emb[test[:2]], **kw)  # warm-up
    timings = {}
    for name, batch_size, init in (("noise, batch 16", 16, False), ("noise, batch 1", 1, False),
                                   ("img2img, batch 16", 16, True)):
        inits = ([images[i].resize((8, 8), Image.BOX).resize((res, res), Image.BICUBIC)
                  for i in test] if init else None)
        t0 = time.perf_counter()
        out = gen.generate(emb[test], batch_size=batch_size, init_images=inits,
                           strength=float(cfg.strength), **kw)
        timings[name] = (time.perf_counter() - t0) / len(test)
        if name == "noise, batch 16":
            ceiling = out
    truth = [images[i].resize((res, res), Image.BICUBIC) for i in test]
    quality = compare_reconstructions({"ceiling": ceiling}, truth,
                                      skip=("alexnet2", "alexnet5", "inception", "effnet"))
    n_params = sum(p.numel() for p in gen.pipe.unet.parameters())
    figures = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "n_params": n_params,
        "generator": {k: v for k, v in dict(g).items()}, "training": info,
        "sampler": {**kw, "strength": float(cfg.strength)},
        "seconds_per_image": timings,
        "ceiling_unseen_test": {k: quality["ceiling"][k] for k in ("pixcorr", "ssim")},
    }
    print(f"embedded generator  {res}px  params={n_params:,}  threads={figures['threads']}  "
          f"blocks={list(g.block_out_channels)}  prediction={g.prediction_type}")
    print(f"  training: {info['steps']} steps (batch {g.batch_size}) on {info['n_images']} "
          f"images in {info['seconds']:.1f} s  ({info['seconds'] / info['steps']:.3f} s/step), "
          f"final loss {info['final_loss']:.4f}")
    for name, sec in timings.items():
        print(f"  sampling ({kw['steps']} steps, guidance {kw['guidance_scale']}, {name}): "
              f"{sec:.3f} s/image")
    print(f"  ceiling on {len(test)} unseen test images: PixCorr "
          f"{figures['ceiling_unseen_test']['pixcorr']:.3f}  SSIM "
          f"{figures['ceiling_unseen_test']['ssim']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2, default=str)


if __name__ == "__main__":
    main()
