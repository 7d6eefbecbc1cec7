"""The deep encoder's own time-resolved decoding (``evaluate.time_resolved_deep=true``).

As Benchetrit et al. (2023, Fig. 2) do for their brain module, one deep encoder is trained per
sliding 250 ms window (every ``step`` s, at least 100 ms; the window is the encoder's temporal
focus), with the run's recipe, early stopping on the validation trials and no read-out, and
scored on the test trials of every subject (pooled). The curve sits beside the sliding-window
ridge curve in ``time_resolved.png`` and ``metrics.json``. It costs one training per window.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger
from neurorecon.models.retrieval import candidate_rows, retrieval_metrics, sliding_windows

from .fit import build_module, fit
from .ridge import flat_targets

#: window width (s), as the ridge curve's, and the smallest step allowed
WIDTH, MIN_STEP = 0.25, 0.1


def deep_time_resolved(cfg: DictConfig, dm, *, out_dir: Path, step: float = 0.1
                       ) -> dict[str, Any]:
    """Train one deep encoder per sliding window of ``dm``'s epochs; pooled test top-5.

    Returns ``{"times", "top5", "top1", "width", "step"}`` (window centres in s).
    """
    from lightning import seed_everything

    from ..inference import predict_split

    if step < MIN_STEP:
        raise DataError(f"evaluate.time_resolved_deep_step={step} s: one training per window "
                        f"makes steps under {MIN_STEP} s too costly",
                        hint=f"use a step of at least {MIN_STEP} s")
    params = dm.recipe["params"]
    n_times = int(next(iter(dm.subjects.values())).n_times)
    starts, times = sliding_windows(n_times, sfreq=float(params["sfreq"]),
                                    tmin=float(params["tmin"]), width=WIDTH, step=step)
    n_win = max(1, int(round(WIDTH * float(params["sfreq"]))))
    test = dm.splits["test"]
    cand_rows, true_idx = candidate_rows(test.target)
    cand = flat_targets(dm)[cand_rows]
    top1, top5 = [], []
    for i, start in enumerate(starts):
        seed_everything(int(cfg.seed), workers=True, verbose=False)
        focus = {"samples": [int(start), int(start) + n_win]}
        lit = build_module(cfg, dm, focus=focus)
        fit(cfg, lit, dm, out_dir=Path(out_dir) / "time_resolved_deep" / f"window-{i:02d}",
            quiet=True)
        m = retrieval_metrics(predict_split(lit.net, dm, "test"), cand, true_idx)
        top1.append(m["top1"])
        top5.append(m["top5"])
        logger.info("deep encoder on the %.2f s window (%d/%d): test top-5 %.3f", times[i],
                    i + 1, len(starts), m["top5"])
    return {"times": np.round(times, 4).tolist(), "top5": np.round(top5, 4).tolist(),
            "top1": np.round(top1, 4).tolist(), "width": WIDTH, "step": step}
