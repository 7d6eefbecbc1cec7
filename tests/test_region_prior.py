"""A new fMRI subject's region prior: each trained subject's voxel relevance (a cross-validated
encoding model) marks where its voxels carried the stimulus; a new subject's subspace adapter
weights its voxels by the trained subjects' maps, taken through MNI space onto its grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from neurorecon.models.fmri.encoder import FmriEncoder
from neurorecon.pipelines.train.region_prior import (
    PRIOR_TRIALS,
    RegionPrior,
    voxel_relevance,
    voxel_scale,
)


def test_voxel_relevance_finds_the_voxels_that_carry_the_stimulus():
    rng = np.random.default_rng(0)
    n, v = 150, 400
    embeddings = rng.standard_normal((n, 8)) @ rng.standard_normal((8, 64))  # a few axes vary
    weights = np.zeros((64, v))
    weights[:, :60] = rng.standard_normal((64, 60)) * 0.3  # 60 voxels respond to the image
    X = (embeddings @ weights + rng.standard_normal((n, v)) + 2.0).astype(np.float32)
    whole = voxel_relevance(lambda: [X], embeddings)
    assert whole.shape == (v,) and whole.dtype == np.float32 and whole.min() >= 0
    assert whole[:60].mean() > 0.3 and whole[60:].mean() < 0.01, (whole[:60].mean(),
                                                                  whole[60:].mean())
    # streamed in blocks of rows (trials that need not fit in memory): the same numbers
    blocks = voxel_relevance(lambda: (X[i : i + 23] for i in range(0, n, 23)), embeddings)
    np.testing.assert_allclose(blocks, whole, atol=1e-5)
    # the stimulus order shuffled against the responses: nothing is relevant
    shuffled = voxel_relevance(lambda: [X], embeddings[rng.permutation(n)])
    assert shuffled.mean() < 0.01
    # too few trials to cross-validate: not measured
    assert not voxel_relevance(lambda: [X[:6]], embeddings[:6]).any()
    assert not voxel_relevance(lambda: [X], np.ones_like(embeddings)).any()  # one image


def _mask(voxel: float) -> nib.Nifti1Image:
    """A box of brain in MNI space (x -40..40, y -100..20, z -20..40 mm) at ``voxel`` mm."""
    shape = tuple(int(np.ceil(s / voxel)) for s in (80, 120, 60))
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = (-40, -100, -20)
    return nib.Nifti1Image(np.ones(shape, np.uint8), affine)


def _world_y(mask: nib.Nifti1Image) -> np.ndarray:
    ijk = np.argwhere(np.asarray(mask.dataobj) > 0)  # nilearn's masking order (C order)
    return (mask.affine @ np.c_[ijk, np.ones(len(ijk))].T)[1]


def test_region_prior_weights_a_new_subject_where_the_trained_ones_responded():
    masks = {"01": _mask(4.0), "02": _mask(5.0)}  # trained subjects, their own grids
    nets = {}
    for label, mask in masks.items():
        y = _world_y(mask)
        net = FmriEncoder(subjects={label: len(y)}, n_outputs=4, hidden_dim=8, n_blocks=1,
                          adapter="subspace", n_components=4)
        assert net.voxel_relevance(label) is None  # not measured yet
        net.set_voxel_relevance(label, np.where(y < -60, 0.3, 0.0))  # occipital voxels
        nets[label] = net
    prior = RegionPrior.of(nets, masks)
    assert prior.subjects == ["01", "02"]
    new = _mask(3.0)  # a new subject on a third grid
    scale, y = voxel_scale(None, new, prior=prior), _world_y(new)
    assert scale.shape == y.shape and np.mean(scale**2) == pytest.approx(1.0, rel=1e-4)
    assert np.median(scale[y < -70]) > 1.0 and scale[y < -70].min() > 0.2  # edges smoothed
    assert scale[y > -40].max() < 0.05 * scale.max()
    # its own relevance (here: frontal voxels) mixed in by its train trials, the prior
    # counting as PRIOR_TRIALS of them: a few trials lean on the prior, many on its own map
    own = np.where(y > 0, 0.3, 0.0)
    front, back = y > 5, y < -70
    few, many = (voxel_scale(own, new, prior=prior, n_trials=n)
                 for n in (PRIOR_TRIALS // 4, PRIOR_TRIALS * 4))
    assert np.median(few[back]) > np.median(few[front]) > 0
    assert np.median(many[front]) > np.median(many[back]) > 0
    alone = voxel_scale(own, new, n_trials=10)  # a subject of the run itself: its own map
    assert np.median(alone[front]) > 1.0 and alone[back].max() < 0.05 * alone.max()
    assert voxel_scale(np.zeros(len(y)), new, n_trials=10) is None  # nothing relevant
    # a model saved before relevance was measured gives no prior
    blank = {label: FmriEncoder(**net.get_config()) for label, net in nets.items()}
    assert RegionPrior.of(blank, masks) is None


def test_subspace_adapter_weights_voxels_and_reads_weights_saved_without_a_scale():
    torch.manual_seed(0)
    net = FmriEncoder(subjects={"01": 300}, n_outputs=8, hidden_dim=16, n_blocks=1,
                      adapter="subspace", n_components=32).eval()
    train = torch.randn(40, 300)
    scale = torch.ones(300)
    scale[:100] = 0  # voxels the prior says carry nothing
    net.fit_subspace("01", train, scale=scale)
    x = train[:3] + 0.1
    out = net(x, subject=0)["clip"]
    noise = torch.zeros(300)
    noise[:100] = 5 * torch.randn(100)
    assert torch.allclose(net(x + noise, subject=0)["clip"], out, atol=1e-5)  # ignored
    # weights saved before the scale and relevance existed: scale 1, relevance not measured
    old = {k: v for k, v in net.state_dict().items()
           if not k.endswith((".scale", ".relevance"))}
    clone = FmriEncoder(**net.get_config())
    clone.load_state_dict(old)
    assert torch.equal(clone.adapters["01"][0].scale, torch.ones(300))
    assert clone.voxel_relevance("01") is None
    with pytest.raises(ValueError, match="scale"):
        net.fit_subspace("01", train, scale=torch.ones(299))
