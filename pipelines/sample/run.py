"""``neurorecon sample``: write the embedded sample datasets (MEG and fMRI BIDS roots).

Layout under ``sample.out_dir``: ``meg/`` and ``fmri/``, each a BIDS root with its own
``stimuli/`` folder (images + ``stimuli.tsv``). The whole tree is written into a temporary
sibling and renamed into place, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger

from .family import resolve_draw
from .stimuli import make_stimuli

STIM_TABLE = "stimuli.tsv"
SAMPLE_CONFIG = "sample_config.json"


def write_stimuli(root: Path, stimuli, *, source: Path | None = None) -> None:
    """Write (or copy from ``source``) the stimulus images and table into ``root/stimuli``."""
    dest = root / "stimuli"
    if source is not None:
        shutil.copytree(source, dest)
        return
    dest.mkdir(parents=True, exist_ok=True)
    cols = ["stim_file", "concept", "exemplar", "split", "caption"]
    stimuli[cols].to_csv(dest / STIM_TABLE, sep="\t", index=False)


def make_sample(cfg: DictConfig, out_dir: str | Path) -> Path:
    """Generate the sample datasets described by ``cfg`` (the ``sample`` group) into ``out_dir``."""
    from .fmri import simulate_fmri_bids
    from .meg import simulate_meg_bids

    out_dir = Path(out_dir)
    cfg, drawn = resolve_draw(cfg)
    if drawn is not None:
        logger.info("sample: random draw %d: %s", cfg.seed, json.dumps(drawn))
    wanted = OmegaConf.to_container(cfg, resolve=True)
    wanted.pop("overwrite", None)
    if out_dir.exists() and not cfg.overwrite:
        done = out_dir / SAMPLE_CONFIG
        if done.is_file() and json.loads(done.read_text())["config"] == wanted:
            logger.info("sample: %s already holds this sample dataset; nothing to do", out_dir)
            return out_dir
        raise DataError(
            "already exists and was not made with this sample configuration", path=out_dir,
            hint="pass sample.overwrite=true to replace it or sample.out_dir=<path> to write "
            "elsewhere",
        )
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{time.monotonic_ns()}"
    tmp.mkdir(parents=True)
    try:
        rng = np.random.default_rng(cfg.seed)
        s = cfg.stimuli
        stim_dir = tmp / "meg" / "stimuli"
        t0 = time.perf_counter()
        stimuli = make_stimuli(
            stim_dir,
            n_concepts=s.n_concepts,
            n_train_exemplars=s.n_train_exemplars,
            n_test_exemplars=s.n_test_exemplars,
            image_size=s.image_size,
            rng=rng,
        )
        write_stimuli(tmp / "meg", stimuli)
        logger.info("sample: %d stimulus images (%.1f s)", len(stimuli), time.perf_counter() - t0)
        timings = {}
        if cfg.meg.enabled:
            t0 = time.perf_counter()
            simulate_meg_bids(tmp / "meg", stimuli, cfg=cfg.meg, seed=cfg.seed,
                              n_test_repeats=s.n_test_repeats, draw=drawn)
            timings["meg_s"] = round(time.perf_counter() - t0, 2)
            logger.info("sample: MEG written (%.1f s)", timings["meg_s"])
        if cfg.fmri.enabled:
            t0 = time.perf_counter()
            write_stimuli(tmp / "fmri", stimuli, source=stim_dir)
            simulate_fmri_bids(tmp / "fmri", stimuli, cfg=cfg.fmri, seed=cfg.seed,
                               n_test_repeats=s.n_test_repeats)
            timings["fmri_s"] = round(time.perf_counter() - t0, 2)
            logger.info("sample: fMRI written (%.1f s)", timings["fmri_s"])
        if not cfg.meg.enabled:
            shutil.rmtree(tmp / "meg")
        (tmp / SAMPLE_CONFIG).write_text(
            json.dumps({"config": wanted, "draw": drawn, "timings": timings}, indent=2)
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def run(cfg: DictConfig) -> Path:
    """Stage entry point (Hydra root config ``sample.yaml``)."""
    t0 = time.perf_counter()
    out = make_sample(cfg.sample, cfg.sample.out_dir)
    logger.info("sample datasets written to %s in %.1f s", out, time.perf_counter() - t0)
    return out
