"""A randomized family of simulated MEG and fMRI datasets (``neurorecon sample sample=random``).

Decoder defaults tuned on one simulated dataset do not transfer to a lab's recording: the
informative latencies, the sensor system, the rate, the number of trials and the noise all
move. ``sample=random`` therefore draws a whole dataset's physics from wide ranges (the
``random`` block of the ``sample`` config) with ``sample.seed``: sensor system, sampling rate,
mains frequency, early and concept response latencies and widths, how much of the later
response a concept shares and how much is specific to each image, how many stages (each with
its own sources) the later response passes through, trial jitter, SNR, number
of subjects, train trials per subject, test images and repeats, head position, noisy channels,
eye blinks and the heartbeat. With ``sample.fmri.enabled=true`` the fMRI of the same subjects
and trials is drawn too (``random.fmri``): voxel size per subject, TR, stimulus timing, SNR, the
HRF's delay, the two tuned responses' gains and the noise's amplitude, autocorrelation and
smoothness.
The concrete values of a draw are a plain sample config (the same code writes every preset),
logged, stored in ``sample_config.json`` and in each root's ``dataset_description.json``
(``GeneratedBy[0].Description``).

Develop and compare decoders on many draws (``tests/benchmarks/bench_decoding.py``), never on
one draw or preset.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from neurorecon.models.common.checks import DataError

#: trials per MEG run of a drawn dataset (runs of ~5-8 minutes, as in THINGS-MEG)
TRIALS_PER_RUN = 320


def _uniform(rng: np.random.Generator, bounds, *, log: bool = False) -> float:
    lo, hi = (float(b) for b in bounds)
    if not lo <= hi or (log and lo <= 0):
        raise DataError(f"sample.random: bounds {[lo, hi]} must be increasing"
                        + (" and > 0 (log-uniform)" if log else ""))
    if log:
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return float(rng.uniform(lo, hi))


def _integer(rng: np.random.Generator, bounds) -> int:
    lo, hi = (int(b) for b in bounds)
    if lo > hi:
        raise DataError(f"sample.random: integer bounds {[lo, hi]} must be increasing")
    return int(rng.integers(lo, hi + 1))


def draw_parameters(ranges: DictConfig | dict, seed: int, *, fmri: bool = False
                    ) -> dict[str, Any]:
    """The concrete dataset parameters of draw ``seed`` from ``ranges`` (``sample.random``).

    Returns ``{"stimuli": {...}, "meg": {...}}`` (and ``"fmri"`` with ``fmri=True``): values
    for the ``sample.stimuli``, ``sample.meg`` and ``sample.fmri`` config blocks. The same seed
    always gives the same draw, and each parameter has its own random stream: narrowing one
    range (e.g. ``n_subjects``) leaves the others of the draw as they were, and drawing the
    fMRI leaves the MEG draw as it was.
    """
    r = OmegaConf.create(ranges) if isinstance(ranges, dict) else ranges

    def rng(name: str) -> np.random.Generator:
        return np.random.default_rng([int(seed), 20261204, zlib.crc32(name.encode())])

    def uniform(name: str, *, log: bool = False) -> float:
        return _uniform(rng(name), r[name], log=log)

    def choice(name: str, values) -> Any:
        return rng(name).choice(list(values)).item()

    n_concepts = int(r.n_concepts)
    train_trials = _integer(rng("train_trials"), r.train_trials)
    n_train_exemplars = max(1, round(train_trials / n_concepts))
    n_test_exemplars = _integer(rng("n_test_exemplars"), r.n_test_exemplars)
    n_test_repeats = _integer(rng("n_test_repeats"), r.n_test_repeats)
    n_trials = n_concepts * (n_train_exemplars + n_test_exemplars * n_test_repeats)
    concept_peak = uniform("concept_peak")
    lowlevel_peak = uniform("lowlevel_peak")
    meg = {
        "n_subjects": _integer(rng("n_subjects"), r.n_subjects),
        "n_runs": max(1, round(n_trials / TRIALS_PER_RUN)),
        "system": str(choice("systems", r.systems)),
        "sfreq": float(choice("sfreqs", r.sfreqs)),
        "line_freq": float(choice("line_freqs", r.line_freqs)),
        "snr": uniform("snr", log=True),
        "lowlevel_gain": uniform("lowlevel_gain", log=True),
        "lowlevel_peak": lowlevel_peak,
        "lowlevel_width": uniform("lowlevel_width") * lowlevel_peak,
        "concept_gain": uniform("concept_gain", log=True),
        "concept_peak": concept_peak,
        "concept_width": uniform("concept_width") * concept_peak,
        "latency_jitter": uniform("latency_jitter"),
        "n_noisy_channels": _integer(rng("n_noisy_channels"), r.n_noisy_channels),
        "head_shift": uniform("head_shift"),
        "head_rotation": uniform("head_rotation"),
        "concept_share": uniform("concept_share"),
        "concept_stages": _integer(rng("concept_stages"), r.concept_stages),
        "concept_stage_spacing": uniform("concept_stage_spacing"),
        "blink_rate": uniform("blink_rate"),
        "blink_after_image": uniform("blink_after_image"),
        "blink_gain": uniform("blink_gain", log=True),
        "ecg_gain": uniform("ecg_gain", log=True),
    }
    stimuli = {"n_concepts": n_concepts, "n_train_exemplars": n_train_exemplars,
               "n_test_exemplars": n_test_exemplars, "n_test_repeats": n_test_repeats}
    out = {"stimuli": stimuli, "meg": meg}
    if fmri:
        out["fmri"] = _draw_fmri(r.fmri, rng, n_subjects=meg["n_subjects"], n_trials=n_trials)
    return out


def _draw_fmri(r: DictConfig, rng, *, n_subjects: int, n_trials: int) -> dict[str, Any]:
    """The ``sample.fmri`` values of a draw (``rng(name)``: the draw's stream of a parameter)."""
    def uniform(name: str, *, log: bool = False) -> float:
        return _uniform(rng(f"fmri.{name}"), r[name], log=log)

    lo, hi = (float(b) for b in r.voxel_size)
    if not 0 < lo <= hi:
        raise DataError(f"sample.random.fmri.voxel_size: bounds {[lo, hi]} must be increasing "
                        "and > 0")
    # one stream for all subjects: subject k's size does not depend on how many there are
    sizes = rng("fmri.voxel_size").uniform(lo, hi, n_subjects)
    soa = uniform("soa")
    soa_max = soa + uniform("soa_spread")
    return {
        "n_subjects": n_subjects,
        "n_runs": max(1, round(n_trials * (soa + soa_max) / 2 / float(r.run_seconds))),
        "voxel_sizes": [round(float(v), 1) for v in sizes],
        "tr": round(uniform("tr"), 2),
        "soa": [round(soa, 2), round(soa_max, 2)],
        "image_duration": round(min(uniform("image_duration"), soa - 0.5), 2),
        "snr": uniform("snr", log=True),
        "hrf_onset": uniform("hrf_onset"),
        "lowlevel_gain": uniform("lowlevel_gain", log=True),
        "concept_gain": uniform("concept_gain", log=True),
        "noise": uniform("noise"),
        "noise_ar": uniform("noise_ar"),
        "noise_fwhm": uniform("noise_fwhm"),
    }


def resolve_draw(cfg: DictConfig) -> tuple[DictConfig, dict[str, Any] | None]:
    """``cfg`` (the ``sample`` group) with a random draw applied, and the drawn values.

    Without a ``random`` block (every fixed preset) ``cfg`` comes back as it is, with None.
    """
    ranges = cfg.get("random")
    if not ranges:
        return cfg, None
    drawn = draw_parameters(ranges, int(cfg.seed), fmri=bool(cfg.fmri.enabled))
    return OmegaConf.merge(cfg, drawn), drawn
