"""New subjects added to a trained encoder: their own parts trained, the shared layers frozen.

The one implementation behind ``neurorecon adapt`` (:mod:`neurorecon.pipelines.adapt`) and
the new-subject adaptation curve of a run (:mod:`neurorecon.pipelines.evaluate.adaptation`).
MEG: a subject-layer matrix per new subject (the mean of the trained subjects' to start),
trained by gradient descent, then its linear read-out by ridge over the encoder's own bins
and its deep share chosen on its validation trials;
fMRI: the subject's input adapter (subspace on its train trials, then a linear layer). The
trained subjects' weights are restored bit for bit afterwards (weight decay would otherwise
shrink the old rows of a stacked tensor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from neurorecon.models.common.logging import logger


def add_subjects(net, dm) -> dict[str, int]:
    """Add ``dm``'s subjects to ``net`` and freeze everything else; ``{label: index}``."""
    if dm.modality == "meg":
        n_chans = max(info.n_chans for info in dm.subjects.values())
        indices = net.add_subjects(len(dm.labels), n_chans=n_chans)
        net.freeze_shared(indices)
        return dict(zip(dm.labels, indices, strict=True))
    from .fit import fit_subspaces

    index = {label: net.add_subject(label, dm.subjects[label].n_voxels) for label in dm.labels}
    fit_subspaces(net, dm, labels=dm.labels)
    net.freeze_shared(*dm.labels)
    return index


def restore(net, before: dict[str, torch.Tensor]) -> None:
    """Put the trained subjects' weights of ``before`` back into ``net``: a tensor of the
    same shape is shared (frozen: restored exactly); a larger one stacks subjects (its
    leading block is the old subjects'); a new one belongs to a new subject."""
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            old = before.get(name)
            if old is not None:
                tensor[tuple(slice(0, s) for s in old.shape)] = old


def adapt_subjects(cfg: DictConfig, net, dm, *, out_dir: Path, quiet: bool = False
                   ) -> tuple[dict[str, int], dict[str, Any]]:
    """Add ``dm``'s subjects to ``net`` (a trained encoder, modified in place) and train their
    own parts on ``dm`` with ``cfg``'s loss, optimizer and trainer (the epoch chosen on
    ``dm``'s validation trials), then fit their MEG read-out on train + validation trials.

    Returns ``({label: index in net}, info)``: the training summary of :func:`.fit.fit` (empty
    when nothing was trainable) and ``readout_alpha`` (MEG, per new subject).
    """
    from .fit import build_module, fit
    from .module import Reindexed
    from .readout import fit_subject_readout

    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    index = add_subjects(net, dm)
    if not quiet:
        logger.info("new subjects sub-%s: %d parameters trained, %d frozen",
                    ", sub-".join(dm.labels),
                    sum(p.numel() for p in net.parameters() if p.requires_grad),
                    sum(p.numel() for p in net.parameters() if not p.requires_grad))
    info: dict[str, Any] = {}
    if any(p.requires_grad for p in net.parameters()):
        lit = build_module(cfg, dm, net=Reindexed(net, [index[s] for s in dm.labels]))
        _, info = fit(cfg, lit, dm, out_dir=out_dir, quiet=quiet)
    net.requires_grad_(False)
    restore(net, before)
    if getattr(net, "readout_bins", None):  # MEG: the new subjects' read-out, the net's bins
        alphas = (cfg.get("evaluate") or {}).get("ridge_alphas")
        info["readout_mix"] = _new_subjects_mix(net, dm, index, alphas=alphas)
        info["readout_alpha"] = {
            label: fit_subject_readout(net, dm, k, index=index[label], alphas=alphas)
            for k, label in enumerate(dm.labels)}
    return index, info


def _new_subjects_mix(net, dm, index: dict[str, int], *, alphas=None) -> float:
    """The new subjects' deep share, chosen on their validation trials as a run chooses its
    own (:func:`.readout.choose_readout` over the net's bins, the read-out fitted on their
    train trials): their deep part may be weaker than the trained subjects'. Without
    validation trials, the trained subjects' mean share. Set in ``net``; returned."""
    from ..inference import predict_split
    from .readout import choose_readout

    new = torch.tensor([index[s] for s in dm.labels])
    old = torch.ones(net.n_subjects, dtype=torch.bool)
    old[new] = False
    with torch.no_grad():
        net.readout_mix[new] = 1.0  # the deep part alone, for its validation predictions
        bins = net.readout_bins
        sfreq = float(dm.recipe["params"]["sfreq"])
        choice = choose_readout(dm, span=(bins[0][0], bins[-1][1]),
                                deep_val=predict_split(net, dm, "val", subject_index=index),
                                bin_widths=[(bins[0][1] - bins[0][0]) / sfreq], alphas=alphas)
        mix = (float(choice["mix"]) if choice is not None
               else float(net.readout_mix[old].mean()) if old.any() else 1.0)
        net.readout_mix[new] = mix
    return mix
