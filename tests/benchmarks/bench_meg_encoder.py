"""Benchmark: MegBrainModule latency and training throughput on CPU (prints figures).

One 1.5 s CTF-275 window at 120 Hz (274 channels x 181 samples, real sensor layout from
``mne.channels.read_meg_canonical_info('ctf275')``): median and p99 inference latency in eval
mode without gradients after warm-up, then training throughput (samples/s) at batch 64 with
AdamW and the CLIP+MSE loss. Target (issue 3): ≤ 5 ms median on 2 cores.

Not a test (no ``test_`` names, no assertions); run it::

    .venv/bin/python tests/benchmarks/bench_meg_encoder.py [--threads 2] [--json out.json]

Extra ``--config`` JSON overrides constructor arguments, e.g. ``'{"hidden_dim": 320}'``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from neurorecon.models.losses import CombinedLoss
from neurorecon.models.meg.brain_module import MegBrainModule

SFREQ, N_TIMES, EMB_DIM = 120.0, 181, 768


def ctf275_layout() -> np.ndarray:
    """(274, 2) positions of the CTF-275 gradiometers in the shared 2D layout."""
    import mne

    from neurorecon.pipelines.preprocess.meg import sensor_layout

    info = mne.channels.read_meg_canonical_info("ctf275")
    picks = mne.pick_types(info, meg=True, ref_meg=False)
    return sensor_layout(info, picks).astype(np.float32)


def latency(model: MegBrainModule, inputs: dict, *, n_warmup: int, n_iter: int,
            new_layout_each_call: bool = False) -> np.ndarray:
    """Per-call wall time (s) of ``model(**inputs)`` in eval mode without gradients.

    The model reuses its spatial-attention weights while the layout (positions, mask) stays
    the same, as in real-time decoding; ``new_layout_each_call`` alternates two masks so the
    weights are recomputed on every call.
    """
    model.eval()
    masks = [inputs["mask"], inputs["mask"].clone()]
    masks[1][0, 0] = False
    times = []
    with torch.inference_mode():
        for i in range(n_warmup + n_iter):
            kw = {**inputs, "mask": masks[i % 2]} if new_layout_each_call else inputs
            t0 = time.perf_counter()
            model(**kw)
            if i >= n_warmup:
                times.append(time.perf_counter() - t0)
    return np.asarray(times)


def train_throughput(model: MegBrainModule, pos: torch.Tensor, *, batch_size: int,
                     n_steps: int) -> float:
    """Training samples per second (forward + backward + AdamW step)."""
    model.train()
    loss_fn = CombinedLoss(lambda_clip=0.75)
    opt = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=3e-4)
    c = pos.shape[0]
    x = torch.randn(batch_size, c, N_TIMES)
    y = torch.randn(batch_size, EMB_DIM)
    kw = {"positions": pos.expand(batch_size, c, 2), "mask": torch.ones(batch_size, c,
                                                                        dtype=torch.bool),
          "subject": torch.zeros(batch_size, dtype=torch.long)}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model(x, **kw), y)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    return batch_size * n_steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-iter", type=int, default=500)
    parser.add_argument("--n-warmup", type=int, default=50)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--config", default="{}", help="JSON constructor overrides")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pos = torch.from_numpy(ctf275_layout())
    config = {"n_outputs": EMB_DIM, "n_times": N_TIMES, "sfreq": SFREQ, "n_subjects": 4,
              **json.loads(args.config)}
    model = MegBrainModule(**config)
    n_params = sum(p.numel() for p in model.parameters())
    c = pos.shape[0]
    inputs = {"x": torch.randn(1, c, N_TIMES), "positions": pos[None],
              "mask": torch.ones(1, c, dtype=torch.bool),
              "subject": torch.zeros(1, dtype=torch.long)}
    t = latency(model, inputs, n_warmup=args.n_warmup, n_iter=args.n_iter) * 1e3
    t_new = latency(model, inputs, n_warmup=args.n_warmup, n_iter=args.n_iter,
                    new_layout_each_call=True) * 1e3
    tput = train_throughput(model, pos, batch_size=args.batch_size, n_steps=args.train_steps)
    figures = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "input": f"(1, {c}, {N_TIMES}) CTF-275 @ {SFREQ:g} Hz", "n_params": n_params,
        "config": model.get_config(),
        "latency_ms": {"median": float(np.median(t)), "p99": float(np.percentile(t, 99)),
                       "min": float(t.min()), "n": len(t)},
        "latency_new_layout_each_call_ms": {"median": float(np.median(t_new)),
                                            "p99": float(np.percentile(t_new, 99))},
        "train_samples_per_s": tput, "train_batch_size": args.batch_size,
    }
    print(f"MegBrainModule  params={n_params:,}  threads={figures['threads']}  "
          f"input={figures['input']}")
    print(f"  inference latency: median {figures['latency_ms']['median']:.2f} ms  "
          f"p99 {figures['latency_ms']['p99']:.2f} ms  (min {t.min():.2f} ms, n={len(t)})  "
          f"target <= 5 ms median")
    print(f"  (layout changing every call: median {np.median(t_new):.2f} ms  "
          f"p99 {np.percentile(t_new, 99):.2f} ms)")
    print(f"  training throughput: {tput:.0f} samples/s (batch {args.batch_size}, AdamW, "
          "CLIP+MSE)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
