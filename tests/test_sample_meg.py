"""The MEG simulator of the sample dataset: block-wise generation and its noise spectrum."""

from __future__ import annotations

from pathlib import Path

import mne
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from scipy import signal

from neurorecon.pipelines.sample import meg

CFG = OmegaConf.load(Path(__file__).parents[1] / "configs" / "sample" / "default.yaml").meg


def _slope(x: np.ndarray, sfreq: float, f_lo: float, f_hi: float, skip=(6.0, 15.0)) -> float:
    """Log-log slope of the median power spectrum of the rows of ``x`` over ``f_lo..f_hi``."""
    f, psd = signal.welch(x, fs=sfreq, nperseg=int(4 * sfreq), axis=-1)
    band = (f >= f_lo) & (f <= f_hi) & ~((f > skip[0]) & (f < skip[1]))
    return float(np.polyfit(np.log10(f[band]), np.log10(np.median(psd, 0)[band]), 1)[0])


@pytest.mark.parametrize("exponent", [0.5, 1.0, 2.0])
def test_colored_noise_is_unit_variance_one_over_f(exponent):
    sfreq = 600.0
    noise = meg._ColoredNoise(np.random.default_rng(0), 100, exponent, sfreq)
    x = np.concatenate([noise(n) for n in (7001, 12000, 17000)], axis=1)
    # stationary from the first sample; mean square (not variance: brown noise drifts)
    assert np.mean(x[:, :6000] ** 2) == pytest.approx(1, rel=0.15)
    assert np.mean(x**2) == pytest.approx(1, rel=0.15)
    assert _slope(x, sfreq, 1.0, 100.0, skip=(0, 0)) == pytest.approx(-exponent, abs=0.1)


def test_blocks_do_not_change_the_data_and_noise_is_one_over_f(tmp_path):
    rng = np.random.default_rng(0)
    info = mne.channels.read_meg_canonical_info(CFG.system)
    with info._unlock():
        info["sfreq"] = float(CFG.sfreq)
        info["dev_head_t"] = meg._head_transform(rng)
    info = meg._add_channels(mne.pick_info(info, mne.pick_types(info, meg=True, ref_meg=False)),
                            {meg.STIM_CHANNEL: "stim"})
    model = meg._subject_model(info, rng, 10, meg.N_CODE)
    trials = pd.DataFrame(rng.standard_normal((16, 10)), columns=[f"ll{j}" for j in range(10)])
    trials["concept"] = np.array(["a", "b"])[np.arange(16) % 2]
    trials["stim_file"] = trials["concept"]  # codes are per image; here one per concept
    codes = {c: rng.standard_normal(meg.N_CODE) for c in "ab"}

    data = []
    for block_s in (meg.BLOCK_S, 1.37):
        run_rng = np.random.default_rng(1)
        raw, onsets = meg._simulate_run(info, model, trials, codes, cfg=CFG, rng=run_rng,
                                        fname=tmp_path / f"{block_s}.f32", block_s=block_s)
        assert not raw.preload and raw.info["bads"]
        data.append(raw.get_data())
    np.testing.assert_allclose(data[0], data[1], rtol=1e-6, atol=1e-20)
    stim = data[0][raw.ch_names.index(meg.STIM_CHANNEL)]
    np.testing.assert_array_equal(np.flatnonzero(stim), onsets)

    good = mne.pick_types(raw.info, meg=True, exclude="bads")
    x = data[0][good]
    sfreq = raw.info["sfreq"]
    assert -1.6 < _slope(x, sfreq, 1.0, 40.0) < -0.9
    # background in 1-40 Hz: ~200 fT per channel (brain, alpha, sensor noise; evoked is small)
    sos = signal.butter(4, [1.0, 40.0], "bandpass", fs=sfreq, output="sos")
    band_std = np.median(signal.sosfiltfilt(sos, x, axis=-1)[:, int(2 * sfreq):].std(axis=1))
    assert 120e-15 < band_std < 320e-15, band_std
