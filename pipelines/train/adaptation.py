"""New subjects added to a trained encoder (``adaptation.<modality>``):

- ``frozen``: their own parts trained, the shared layers frozen; one model for everyone. MEG:
  a subject-layer matrix per new subject (the mean of the trained subjects' to start); fMRI:
  the subject's input adapter (subspace on its train trials, then a linear layer), its voxels
  weighted by its relevance mixed with the trained subjects' region prior
  (:mod:`.region_prior`). The trained subjects' weights are restored bit for bit afterwards
  (weight decay would otherwise shrink the old rows of a stacked tensor).
- ``finetune``: a copy of the model with the new subjects added, every layer trained on their
  trials (MindEye2's fine-tuning of a pretrained multi-subject model): a model of their own,
  which the bundle keeps beside its own (:class:`~neurorecon.models.bundle.OwnModel`); the
  trained subjects' model is not touched.
- ``scratch``: a model of their own trained on their trials alone with the run's recipe (what
  the others are measured against: with many trials, pretraining need not help).
- ``ensemble``: the three above, each trained, and their new subjects' models averaged
  (:class:`~neurorecon.models.ensemble.EncoderEnsemble` of the frozen and fine-tuned models
  reduced to the new subjects, :meth:`~neurorecon.models.fmri.encoder.FmriEncoder.subset` /
  :meth:`~neurorecon.models.meg.brain_module.MegBrainModule.subset`, and the scratch one): a
  model of their own; the default. An MEG member keeps its own temporal focus and read-out
  (each takes the whole window), so the scratch model's may differ from the bundle's. Which
  way decodes a new subject best depends on how good the shared model is, and a few dozen
  validation trials cannot tell (README: on a family draw whose shared model was weak, scratch
  won at 100 % and the pretrained ways at 10 %, where validation favoured the wrong way in most
  runs); the average does not have to choose. It weighs each model by the trials behind it
  (:func:`ensemble_weights`): scratch by the new subject's own, the two pretrained ways
  together by as many as the trained model had per subject.
- ``auto``: the ways, scored per trial on the new subjects' validation trials; the first of
  :data:`CANDIDATES` (``ensemble`` first) within one standard error of the best is kept
  (:func:`choose_way`). Picking the plain best kept ``scratch`` in 11 of 12 runs with all
  trials of a 4-subject family draw where the fine-tuned copy was better on test on average:
  scratch's score is the best of more read-out choices on the same few validation trials, a
  gain by selection that the standard-error rule discounts.

Either way the epochs are chosen on the new subjects' validation trials (and, MEG, their
read-out's deep share, as :func:`_new_subjects_mix` says); with ``refit.<modality>`` (the
default, as for a run's own model) the way is then trained again that many epochs on their
train + validation trials (fMRI: the subspace adapter fitted on all of them), so a new subject
with a few dozen trials is not decoded from a fraction of them while the ridge baseline beside
it sees all. Then (MEG) their linear read-out is fitted by ridge over the encoder's own bins
on train + validation trials. The one implementation behind ``neurorecon adapt``
(:mod:`neurorecon.pipelines.adapt`) and the new-subject adaptation curve of a run
(:mod:`neurorecon.pipelines.evaluate.adaptation`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger

#: how new subjects are adapted (``adaptation.<modality>``), and the default of both modalities
WAYS = ("frozen", "finetune", "scratch", "ensemble", "auto")
DEFAULT_WAY = "ensemble"
#: the ways ``auto`` tries (in this order of preference on equal validation scores; ``ensemble``
#: averages the three others)
CANDIDATES = ("ensemble", "finetune", "frozen", "scratch")
#: the ways an ``ensemble`` averages
ENSEMBLED = ("frozen", "finetune", "scratch")


def adaptation_way(cfg: DictConfig, modality: str) -> str:
    """``cfg.adaptation.<modality>`` (a config without it: :data:`DEFAULT_WAY`)."""
    way = str((cfg.get("adaptation") or {}).get(modality) or DEFAULT_WAY)
    if way not in WAYS:
        raise DataError(f"adaptation.{modality}={way!r}: one of {list(WAYS)}")
    return way


def add_subjects(net, dm, *, prior=None, weigh: bool = True) -> dict[str, int]:
    """Add ``dm``'s subjects to ``net`` and freeze everything else; ``{label: index}``.
    fMRI: their voxels weighted (``weigh``) by their relevance and the region ``prior``
    (:func:`.fit.fit_subspaces`)."""
    if dm.modality == "meg":
        n_chans = max(info.n_chans for info in dm.subjects.values())
        indices = net.add_subjects(len(dm.labels), n_chans=n_chans)
        net.freeze_shared(indices)
        return dict(zip(dm.labels, indices, strict=True))
    from .fit import fit_subspaces

    index = {label: net.add_subject(label, dm.subjects[label].n_voxels) for label in dm.labels}
    fit_subspaces(net, dm, labels=dm.labels, prior=prior, weigh=weigh)
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


def adapt_subjects(cfg: DictConfig, net, dm, *, out_dir: Path, quiet: bool = False,
                   way: str | None = None, prior=None, shared_trials: float | None = None
                   ) -> tuple[Any, dict[str, int], dict[str, Any]]:
    """Adapt ``net`` (a trained encoder, left untouched; a copy is trained) to ``dm``'s
    subjects ``way`` (default :func:`adaptation_way`) with ``cfg``'s loss, optimizer and
    trainer (the epoch chosen on ``dm``'s validation trials), then fit their MEG read-out on
    train + validation trials. ``prior`` (fMRI, :func:`.region_prior.new_subject_prior`):
    the new subjects' voxels weighted by where the trained subjects' carried the stimulus,
    in the ways that keep the trained model (``frozen``, ``finetune``). ``shared_trials``:
    the train + validation trials per subject that ``net`` was trained on (the ensemble's
    weights, :func:`ensemble_weights`).

    Returns ``(the model that decodes them, {label: index in it}, info)``: the training
    summary of :func:`.fit.fit` (empty when nothing was trainable), ``way`` (for ``auto``, the
    way kept, ``tried``: each way's ``val_rank_score``, and ``way_choice``: :func:`choose_way`'s
    means and standard errors; for ``ensemble``, ``members``: each averaged way's training
    summary), ``val_rank_score`` (the new subjects' validation trials decoded by the model, its
    read-out fitted on their train trials; ``val_rows``: per trial, and ``val_pred``: the
    predictions, MEG's at the chosen deep share; arrays) and ``readout_alpha`` /
    ``readout_mix`` (MEG, per new subject).
    """
    from lightning import seed_everything

    way = way or adaptation_way(cfg, dm.modality)
    if way in ("auto", "ensemble"):
        return _from_every_way(cfg, net, dm, way, out_dir=out_dir, quiet=quiet, prior=prior,
                               shared_trials=shared_trials)
    # each way starts from the seed (initialisation, batch order), not from what the ways tried
    # before it left: ``auto`` keeps the very model that its way alone gives
    seed_everything(int(cfg.seed), workers=True, verbose=False)
    if way == "scratch":
        model, info = train_alone(cfg, dm, out_dir=out_dir, quiet=quiet)
        return model, {label: k for k, label in enumerate(dm.labels)}, {**info, "way": way}
    from .fit import refit_epochs, refitting
    from .readout import fit_subject_readout

    model, index, info = _trained_way(cfg, net, dm, way, out_dir=out_dir, quiet=quiet,
                                      prior=prior)
    meg = bool(getattr(model, "readout_bins", None))  # MEG: the new subjects' read-out
    alphas = (cfg.get("evaluate") or {}).get("ridge_alphas")
    if meg:  # their deep share, chosen on validation before any refit has seen it
        info["readout_mix"], info["val_rows"], info["val_pred"] = _new_subjects_mix(
            model, dm, index, alphas=alphas)
    else:
        info.update(validation_scores(model, dm, index))
    if refitting(cfg, dm.modality) and info.get("best_checkpoint") and len(dm.splits["val"]):
        epochs = refit_epochs(info)
        seed_everything(int(cfg.seed), workers=True, verbose=False)
        model, index, again = _trained_way(cfg, net, dm.with_validation_in_train(), way,
                                           out_dir=out_dir / "refit", quiet=True, epochs=epochs,
                                           prior=prior)
        info.update(refit_epochs=epochs, refit_seconds=again["train_seconds"])
        if meg:
            model.set_readout_mix(info["readout_mix"], [index[s] for s in dm.labels])
    if meg:
        info["readout_alpha"] = {
            label: fit_subject_readout(model, dm, k, index=index[label], alphas=alphas)
            for k, label in enumerate(dm.labels)}
    return model, index, _with_mean(info)


def _trained_way(cfg: DictConfig, net, dm, way: str, *, out_dir: Path, quiet: bool,
                 epochs: int | None = None, prior=None
                 ) -> tuple[Any, dict[str, int], dict[str, Any]]:
    """A copy of ``net`` with ``dm``'s subjects added, their parts (``frozen``) or every layer
    (``finetune``) trained on ``dm``'s train trials: until validation stops it (the best
    epoch kept), or for ``epochs`` without validation (a refit). The trained subjects'
    weights restored for ``frozen``. Returns it, ``{label: index}`` and the training
    summary (:func:`.fit.fit`'s; ``train_seconds`` for a refit)."""
    from .fit import build_module, fit, train_epochs
    from .module import Reindexed
    from .region_prior import voxel_weighting

    model = copy.deepcopy(net)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()} if way == "frozen" else None
    index = add_subjects(model, dm, prior=prior, weigh=voxel_weighting(cfg))
    if way == "finetune":
        model.requires_grad_(True)
    if not quiet:
        logger.info("new subjects sub-%s (%s): %d parameters trained, %d frozen",
                    ", sub-".join(dm.labels), way,
                    sum(p.numel() for p in model.parameters() if p.requires_grad),
                    sum(p.numel() for p in model.parameters() if not p.requires_grad))
    info: dict[str, Any] = {"way": way,
                            "region_prior": None if prior is None else prior.subjects}
    if any(p.requires_grad for p in model.parameters()):
        lit = build_module(cfg, dm, net=Reindexed(model, [index[s] for s in dm.labels]))
        if epochs is None:
            info.update(fit(cfg, lit, dm, out_dir=out_dir, quiet=quiet)[1])
        else:
            info["train_seconds"] = round(train_epochs(cfg, lit, dm, epochs,
                                                       out_dir=out_dir)[0], 2)
    model.requires_grad_(False)
    if before is not None:
        restore(model, before)
    return model, index, info


def _with_mean(info: dict[str, Any]) -> dict[str, Any]:
    rows = info.get("val_rows")
    return {**info, "val_rank_score": None if rows is None else float(rows.mean())}


def validation_scores(model, dm, index: dict[str, int] | None = None
                      ) -> dict[str, np.ndarray | None]:
    """``model``'s clip-head predictions for ``dm``'s validation trials (``val_pred``) and
    their per-trial rank scores among their images (``val_rows``); both None where there are
    too few images to rank. ``index``: :func:`~..inference.predict_split`'s
    ``subject_index``."""
    from ..inference import predict_split

    if len(np.unique(dm.splits["val"].target)) < 2:
        return {"val_pred": None, "val_rows": None}
    pred = predict_split(model, dm, "val", subject_index=index)
    return {"val_pred": pred, "val_rows": _rank_rows(pred, dm)}


def _rank_rows(pred: np.ndarray, dm) -> np.ndarray:
    from neurorecon.models.retrieval import candidate_rows, rank_score_rows

    from .ridge import flat_targets

    stims, true = candidate_rows(dm.splits["val"].target)
    return rank_score_rows(pred, flat_targets(dm)[stims], true)


def choose_way(rows: dict[str, np.ndarray | None]) -> dict[str, Any]:
    """The way ``auto`` keeps, from each way's per-trial validation rank scores ``rows`` (the
    same trials): the first of :data:`CANDIDATES` within one standard error of the best
    (:func:`neurorecon.models.retrieval.one_standard_error`), so the ensemble, then a
    way that keeps the pretrained layers, wins unless another is better beyond the noise of
    the validation trials. Ways without rows are left out; with none, the first way of
    ``rows``. Returns the rule's output (``value``: the way)."""
    from neurorecon.models.retrieval import one_standard_error

    scored = {w: rows[w] for w in CANDIDATES if rows.get(w) is not None}
    if not scored:
        return {"value": next(w for w in CANDIDATES if w in rows), "validation": {}}
    return one_standard_error(scored, order=list(scored))


def _from_every_way(cfg: DictConfig, net, dm, way: str, *, out_dir: Path, quiet: bool,
                    prior=None, shared_trials: float | None = None
                    ) -> tuple[Any, dict[str, int], dict[str, Any]]:
    """``ensemble``: each way of :data:`ENSEMBLED` trained, their models averaged
    (:func:`ensemble_of`); ``auto``: of those and their ensemble, the one
    :func:`choose_way` picks on their ``val_rank_score``."""
    tried = {w: adapt_subjects(cfg, net, dm, out_dir=out_dir / w, quiet=quiet, way=w,
                               prior=prior) for w in ENSEMBLED}
    tried["ensemble"] = ensemble_of(dm, tried, shared_trials=shared_trials)
    if way == "ensemble":
        return tried["ensemble"]
    scores = {w: tried[w][2].get("val_rank_score") for w in CANDIDATES}
    choice = choose_way({w: result[2].get("val_rows") for w, result in tried.items()})
    best = choice["value"]
    model, index, info = tried[best]
    if not quiet:
        se = choice.get("standard_error") or {}
        logger.info("new subjects sub-%s: validation rank score %s; %s kept (the first within "
                    "one standard error of the best)", ", sub-".join(dm.labels), ", ".join(
                        f"{w} {'-' if v is None else f'{v:.3f}'}"
                        + (f" ± {se[w]:.3f}" if w in se else "") for w, v in scores.items()),
                    best)
    return model, index, {**info, "way": best, "chosen": "auto", "tried": scores,
                          "way_choice": {k: v for k, v in choice.items() if k != "value"}}


def _new_subjects_mix(net, dm, index: dict[str, int], *, alphas=None
                      ) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """The new subjects' deep share, chosen on their validation trials as a run chooses its
    own (:func:`.readout.choose_readout` over the net's bins, the read-out fitted on their
    train trials): their deep part may be weaker than the trained subjects'. Without
    validation trials, the trained subjects' mean share. Set in ``net``; returned with the
    per-trial validation rank scores at that share and the predictions behind them (None
    without validation trials)."""
    from ..inference import predict_split
    from .readout import choose_readout

    new = torch.tensor([index[s] for s in dm.labels])
    old = torch.ones(net.n_subjects, dtype=torch.bool)
    old[new] = False
    net.set_readout_mix(1.0, new)  # the deep part alone, for its validation predictions
    bins = net.readout_bins
    sfreq = float(dm.recipe["params"]["sfreq"])
    choice = choose_readout(dm, span=(bins[0][0], bins[-1][1]),
                            deep_val=predict_split(net, dm, "val", subject_index=index),
                            bin_widths=[(bins[0][1] - bins[0][0]) / sfreq], alphas=alphas)
    mix = (float(choice["mix"]) if choice is not None
           else float(net.readout_mix[old].mean()) if old.any() else 1.0)
    net.set_readout_mix(mix, new)
    if choice is None:
        return mix, None, None
    return mix, choice["val_rows"], choice["val_pred"]


def train_alone(cfg: DictConfig, dm, *, out_dir: Path, quiet: bool = True
                ) -> tuple[Any, dict[str, Any]]:
    """A decoder trained on ``dm`` alone with the run's recipe (MEG focus and read-out, the
    refit on train + validation trials with ``refit.<modality>``): the model the adapted ones
    start from (trained on the other subjects), and the one trained from scratch that they
    are measured against. Returns it and the training summary with its ``val_rank_score`` /
    ``val_rows`` and, MEG, its ``readout_mix`` / ``readout_alpha`` (:func:`adapt_subjects`')."""
    from .fit import build_module, fit, refit, refitting, resolve_focus
    from .readout import attach_readout, choose_meg_readout

    focus = resolve_focus(cfg, dm)
    lit = build_module(cfg, dm, focus=focus)
    _, info = fit(cfg, lit, dm, out_dir=out_dir, quiet=quiet)
    readout = choose_meg_readout(cfg, lit.net, dm, focus)
    info.update(validation_scores(lit.net, dm) if readout is None
                else {k: readout[k] for k in ("val_rows", "val_pred")})
    if refitting(cfg, dm.modality) and len(dm.splits["val"]):
        lit, dm = refit(cfg, info, dm, out_dir=out_dir, focus=focus) or (lit, dm)
    if readout is not None:
        attach_readout(lit.net, dm, readout, alphas=cfg.evaluate.get("ridge_alphas"))
        info["readout_mix"], info["readout_alpha"] = readout["mix"], readout["alpha"]
    return lit.net, _with_mean(info)


def ensemble_of(dm, tried: dict[str, tuple[Any, dict[str, int], dict[str, Any]]], *,
                shared_trials: float | None = None
                ) -> tuple[Any, dict[str, int], dict[str, Any]]:
    """``adapt.way=ensemble``: the models of the ways of :data:`ENSEMBLED`
    (``tried[way]``: :func:`adapt_subjects`' output) reduced to ``dm``'s subjects and averaged
    (:class:`~neurorecon.models.ensemble.EncoderEnsemble`; an ensemble's members each), indexed
    in ``dm``'s order, weighted by :func:`ensemble_weights`, with its validation rows
    (:func:`ensemble_rows`)."""
    from neurorecon.models.ensemble import EncoderEnsemble

    labels, weight = list(dm.labels), ensemble_weights(dm, shared_trials)
    members, weights = [], []
    for w in ENSEMBLED:  # an ensemble's members share its way's weight
        model, index, _ = tried[w]
        parts = list(getattr(model, "members", [model]))  # fMRI by label, MEG by index
        keep = labels if dm.modality == "fmri" else [index[label] for label in labels]
        members += [member.subset(keep) for member in parts]
        weights += [weight[w] / len(parts)] * len(parts)
    model = EncoderEnsemble(members, weights=weights).requires_grad_(False)
    info = {"way": "ensemble", "region_prior": tried["frozen"][2].get("region_prior"),
            "members": {w: {"weight": round(weight[w], 4), **{k: tried[w][2].get(k) for k in (
                "epochs", "best_epoch", "val_select", "refit_epochs", "val_rank_score")},
                **{k: tried[w][2][k] for k in ("readout_mix", "readout_alpha")  # MEG
                   if k in tried[w][2]}} for w in ENSEMBLED},
            "val_rows": ensemble_rows(dm, tried, weight)}
    return model, {label: k for k, label in enumerate(labels)}, _with_mean(info)


def ensemble_weights(dm, shared_trials: float | None = None) -> dict[str, float]:
    """Each way's weight in ``adapt.way=ensemble``: the trials behind its model. Scratch has
    the new subjects' own (``n``: train + validation per subject, what its refit trains on);
    the frozen and fine-tuned models start from the trained model, which counts as the trials
    it had per subject (``K``, ``shared_trials``; unknown, from a bundle older than its
    subjects' ``n_trials``: :data:`.region_prior.PRIOR_TRIALS`, as much as its region prior
    counts): ``n / (n + K)`` for scratch, ``K / (n + K)`` shared by the other two. A few dozen
    trials lean on the trained model; as many as it had, and the subject's own model weighs
    as much as the two others together (README: family draw 7, where the shared model was
    weak and scratch won with all trials)."""
    from .region_prior import PRIOR_TRIALS

    n = dm.mean_trained_trials()
    k = float(shared_trials) if shared_trials else float(PRIOR_TRIALS)
    shared = k / (n + k)
    return {"frozen": shared / 2, "finetune": shared / 2, "scratch": 1 - shared}


def ensemble_rows(dm, tried: dict[str, tuple[Any, dict[str, int], dict[str, Any]]],
                  weight: dict[str, float]) -> np.ndarray | None:
    """The ensemble's per-trial validation rank scores: the ways' validation predictions
    (``val_pred``, made before any refit, as each way's own rows) averaged as the ensemble
    averages its members (their unit-norm mean weighted by :func:`ensemble_weights`'
    ``weight``, :func:`~neurorecon.models.ensemble.contrastive_mean`); None where a way has
    none."""
    from neurorecon.models.ensemble import contrastive_mean

    preds = [tried[w][2].get("val_pred") for w in ENSEMBLED]
    if any(p is None for p in preds):
        return None
    return _rank_rows(contrastive_mean([torch.as_tensor(p) for p in preds],
                                       [weight[w] for w in ENSEMBLED]).numpy(), dm)
