"""Benchmark: the embedded generator's ceiling against the retrieval floor, its training time and
sampling seconds per image on CPU.

For each stimulus set (a ``stimuli`` folder written by ``neurorecon sample``, with its
``stimuli.tsv`` ``split`` column), the generator is trained on the train exemplars with the
packaged default config (``configs/reconstruct/default.yaml``,
``configs/reconstruct/generator/embedded.yaml``; EfficientNet-Lite0 embeddings, the default
embedder) through the stage's own function, then fed the *true* embeddings of the held-out test
exemplars, which it never saw. Rows printed per set, scored as the run scores reconstructions
(two-way identification among the set's test images at the generator's resolution; PixCorr):

- ``floor``: the training image whose embedding is nearest to the true one (retrieval, no
  generation; the run's floor retrieves with the decoded embedding, so this floor is higher);
- ``ceiling (<start>, <strength>)``: the generator fed the true embedding, from the run's
  start (``reconstruct.start``: noise, the retrieved neighbours, or the true 8x8 thumbnail
  standing in for a perfect low-level pathway), at each strength a run may choose
  (``reconstruct.strength=auto``: 0, the start itself, then 0.05, 0.1, 0.25; else the one
  configured).

Issue 20's target: ceiling >= floor on AlexNet-2/5 and Inception. Not a test (no assertions)::

    .venv/bin/python tests/benchmarks/bench_reconstruction.py \
        --stimuli data/sample/meg/stimuli data/hard/meg/stimuli [--set key=value ...]

``--set`` takes Hydra overrides of the run config (e.g.
``--set reconstruct.generator.train_steps=600``). ``--cache DIR`` keeps trained generators
between calls (the training time printed is then that of the first call).
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

METRICS = ("alexnet2", "alexnet5", "inception", "pixcorr")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("neurorecon.configs", version_base="1.3"):
        return hydra_compose(config_name="run", overrides=overrides)


def bench_set(stim_dir: Path, cfg, *, cache_dir: str, starts: list[str]) -> dict:
    """Train (or reuse) the generator on one stimulus set's train split; score its test split."""
    from neurorecon.models.common.checks import read_tsv
    from neurorecon.models.generators.base import (
        image_thumbnails,
        retrieved_starts,
        thumbnails_to_images,
        unit_rows,
    )
    from neurorecon.pipelines.embed.images import EfficientNetLiteEmbedder
    from neurorecon.pipelines.evaluate.recon_metrics import compare_reconstructions
    from neurorecon.pipelines.reconstruct.generation import STRENGTH_GRID, embedded_generator

    table = read_tsv(stim_dir / "stimuli.tsv", what="stimulus table", text=True)
    images = [Image.open(stim_dir / f).convert("RGB") for f in table["stim_file"]]
    is_test = (table["split"] == "test").to_numpy()
    t0 = time.perf_counter()
    emb = unit_rows(EfficientNetLiteEmbedder(variant="lite0").embed(images, batch_size=32))
    embed_s = time.perf_counter() - t0
    train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    gen, info = embedded_generator(cfg.generator, images=[images[i] for i in train],
                                   embeddings=emb[train], cache_dir=cache_dir)
    res = gen.resolution
    sized = [im.resize((res, res), Image.BICUBIC) for im in images]
    kw = dict(steps=int(cfg.steps), guidance_scale=float(cfg.guidance_scale),
              seed=int(cfg.seed))
    strengths = STRENGTH_GRID if str(cfg.strength) == "auto" else (float(cfg.strength),)
    nearest = train[(emb[test] @ emb[train].T).argmax(1)]
    sets = {"floor": [sized[i] for i in nearest]}
    per_image = {}
    for start in starts:
        if start == "retrieved":
            inits = retrieved_starts(emb[test], emb[train], [images[i] for i in train],
                                     k=int(cfg.retrieval_k), resolution=res)
        elif start == "lowlevel":  # a perfect low-level pathway: the true thumbnail
            inits = thumbnails_to_images(image_thumbnails([images[i] for i in test]),
                                         resolution=res)
        else:
            inits = None
        for strength in strengths if inits is not None else (1.0,):
            if strength == 0:  # the start itself
                sets[f"ceiling ({start}, 0)"] = inits
                continue
            t1 = time.perf_counter()
            sets[f"ceiling ({start}, {strength:g})"] = gen.generate(
                emb[test], init_images=inits, strength=strength, **kw)
            per_image[f"{start}, {strength:g}"] = (time.perf_counter() - t1) / len(test)
    skip = [m for m in ("ssim", "effnet") if m not in METRICS]
    scores = compare_reconstructions(sets, [sized[i] for i in test], skip=skip)
    return {"stimuli": str(stim_dir), "n_train": len(train), "n_test": len(test),
            "resolution": res, "embed_seconds": round(embed_s, 1), "training": info,
            "seconds_per_image": per_image,
            "n_params": sum(p.numel() for p in gen.pipe.unet.parameters()),
            "scores": {name: {m: scores[name][m] for m in METRICS} for name in sets}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stimuli", nargs="+", default=["data/sample/meg/stimuli"],
                        help="stimulus folders with a stimuli.tsv (split column)")
    parser.add_argument("--starts", nargs="+", default=None,
                        help="ceiling starts among noise retrieved lowlevel (default: noise "
                             "and the configured reconstruct.start)")
    parser.add_argument("--set", action="append", default=[], help="Hydra override")
    parser.add_argument("--cache", default=None, help="keep trained generators here")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = compose(args.set).reconstruct
    starts = args.starts or list(dict.fromkeys(["noise", str(cfg.start)]))
    g = cfg.generator
    print(f"embedded generator {g.resolution}px blocks={list(g.block_out_channels)} "
          f"prediction={g.prediction_type} steps={g.train_steps} batch={g.batch_size}; "
          f"sampler {cfg.steps} steps, guidance {cfg.guidance_scale}, strength {cfg.strength}; "
          f"{torch.get_num_threads()} threads")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for stim in args.stimuli:
            stim_dir = Path(stim)
            if not (stim_dir / "stimuli.tsv").is_file():
                raise SystemExit(f"no stimuli.tsv under {stim_dir}: run `neurorecon sample`")
            r = bench_set(stim_dir, cfg, cache_dir=args.cache or tmp, starts=starts)
            results.append(r)
            info = r["training"] or {}
            print(f"\n{stim_dir}  train {r['n_train']}  test {r['n_test']}  "
                  f"params {r['n_params']:,}  training {info.get('seconds')} s "
                  f"({info.get('steps')} steps, loss {info.get('final_loss', float('nan')):.4f})  "
                  + "  ".join(f"{s}: {v:.3f} s/image" for s, v in r["seconds_per_image"].items()))
            print(f"  {'images':<28}" + "".join(f"{m:>11}" for m in METRICS))
            for name, sc in r["scores"].items():
                print(f"  {name:<28}" + "".join(f"{sc[m]:>11.3f}" for m in METRICS))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"torch": torch.__version__, "threads": torch.get_num_threads(),
             "cpu": platform.processor() or platform.machine(),
             "generator": dict(g), "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
