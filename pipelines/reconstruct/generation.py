"""The generator of a run and the pathways that feed it from brain data.

:func:`build_generator` gives the configured generator (a pretrained diffusers backend from
local directories, or the embedded generator trained on the train-split stimuli and cached);
the weight with which the low-level pathway (ridge from brain data to a coarse colour
thumbnail, Brain-Diffuser / Takagi style; fitted into the bundle by :mod:`..export`) re-ranks
the retrieved img2img starts; the caption pathway (ridge to the generator's caption
embeddings) gives text conditioning. Scoring reconstructions of a test set is
:mod:`neurorecon.pipelines.evaluate.reconstruction`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger
from neurorecon.models.generators.base import (
    image_thumbnails,
    start_scores,
    unit_rows,
)
from neurorecon.models.vision.features import ALEXNET_SIZE

from ..common.cache import cache_entry

#: keys of the embedded generator config that define the trained model (its cache key)
TRAINING_KEYS = ("resolution", "block_out_channels", "prediction_type", "ema_decay",
                 "train_steps", "batch_size", "lr", "p_uncond", "seed")


def build_generator(gen_cfg: DictConfig, *, images: list[Image.Image],
                    embeddings: np.ndarray, cache_dir: str | Path):
    """The configured generator and its training figures (None for a pretrained one).

    A config with ``_target_`` is a pretrained backend loaded from local directories
    (``reconstruct/generator=stable_unclip`` / ``ip_adapter``); otherwise it is the recipe of
    the embedded generator, trained on ``images`` / ``embeddings`` (see
    :func:`embedded_generator`).
    """
    if gen_cfg.get("_target_"):
        from hydra.utils import instantiate

        # built from a partial so the backend's own errors (missing directory...) surface
        # as they are, not wrapped by Hydra
        return instantiate(gen_cfg, _partial_=True)(), None
    return embedded_generator(gen_cfg, images=images, embeddings=embeddings,
                              cache_dir=cache_dir)


def embedded_generator(gen_cfg: DictConfig, *, images: list[Image.Image],
                       embeddings: np.ndarray, cache_dir: str | Path):
    """Train (or reuse from the cache) the embedded generator on ``images``.

    The cache key covers the training recipe and the *content* of the training images and
    embeddings, so datasets sharing a stimulus set (and embedder) share one trained generator.
    """
    import hashlib

    from neurorecon.models.generators.embedding_diffusion import EmbeddingDiffusionGenerator

    from .train_generator import train_embedding_diffusion

    cfg = OmegaConf.to_container(gen_cfg, resolve=True)
    params = {k: cfg[k] for k in TRAINING_KEYS}
    digest = hashlib.sha256(np.ascontiguousarray(embeddings, np.float32).tobytes())
    for im in images:
        digest.update(im.tobytes())
    entry = cache_entry(cache_dir, "generators", "embedded", params,
                        upstream=[digest.hexdigest()[:16]])
    if not entry.exists():
        pipe, info = train_embedding_diffusion(
            images, unit_rows(embeddings), resolution=params["resolution"],
            block_out_channels=tuple(params["block_out_channels"]),
            prediction_type=params["prediction_type"], ema_decay=params["ema_decay"],
            steps=params["train_steps"], batch_size=params["batch_size"], lr=params["lr"],
            p_uncond=params["p_uncond"], seed=params["seed"])
        with entry.writing({**params, "training": info}) as tmp:
            pipe.save_pretrained(tmp)
    else:
        logger.info("generator: reusing %s", entry.path)
        info = entry.manifest()["params"].get("training")
    return EmbeddingDiffusionGenerator(path=entry.path), info


#: low-level re-ranking weights tried on the validation trials (``lowlevel_rerank=auto``)
RERANK_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: img2img strengths tried on the validation trials (``strength=auto``); 0: the start itself
STRENGTH_GRID = (0.0, 0.05, 0.1, 0.25)
#: standard errors a strength must beat the smaller ones by to be chosen: running the sampler
#: costs time and risks the start's quality, and on fMRI family draws 2, 4 and 5 the three
#: strengths that validation preferred by 1.1-1.9 se changed their test images' AlexNet-2/5
#: and Inception scores by -0.021 to +0.018 against their start, no gain on the whole
STRENGTH_N_SE = 2.0
#: the strength of a bundle exported from a run that chose none (it did not reconstruct)
STRENGTH_UNCHOSEN = 0.05


def one_standard_error(per_trial: dict[float, np.ndarray], *, what: str,
                       n_se: float = 1.0) -> dict:
    """The smallest candidate within one (``n_se``) standard error of the best validation score
    (:func:`neurorecon.models.retrieval.one_standard_error`), logged as ``what``: a gain within
    the noise of a few validation trials does not move a setting off its plainest value."""
    from neurorecon.models.retrieval import one_standard_error as choose

    out = choose(per_trial, n_se=n_se)
    value, best = out.pop("value"), out.pop("best")
    logger.info("reconstruct: %s %g (validation, the smallest within %g se of the best %g; mean "
                "± se of the difference to it: %s)", what, value, n_se, best, ", ".join(
                    f"{float(c):g}: {out['validation'][c]:.3f} ± {out['standard_error'][c]:.3f}"
                    for c in out["validation"]))
    return {"value": value, **out}


def as_repeat_averaged(pred: np.ndarray, truth: np.ndarray, *, groups: np.ndarray,
                       repeats: float) -> np.ndarray:
    """What the single-trial predictions ``pred`` would be had each row been decoded from the
    average of ``repeats`` trials, as a test row is (its repeats averaged): within each group
    of ``groups`` (a subject), ``pred`` is split into the part that a scalar slope on the
    true targets ``truth`` explains (with an intercept per column) and the rest, and the rest,
    the trial's noise, is divided by ``sqrt(repeats)``. Where the predictions carry nothing of
    the truth (slope 0) the rows shrink toward their mean, as averages of noise do.

    A choice made on single validation trials is made for starts far worse than a test
    row's: on fMRI family draw 4 the validation starts identified their images at 0.56, the
    test rows' at 0.84 (AlexNet-2/5), and a strength that helped the former blurred the
    latter."""
    if repeats <= 1:
        return pred
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    out = pred.copy()
    for g in np.unique(groups):
        rows = groups == g
        p_mean, t_dev = pred[rows].mean(0), truth[rows] - truth[rows].mean(0)
        slope = ((pred[rows] - p_mean) * t_dev).sum() / max((t_dev ** 2).sum(), 1e-12)
        fitted = p_mean + slope * t_dev
        out[rows] = fitted + (pred[rows] - fitted) / np.sqrt(repeats)
    return out.astype(np.float32)


class ValidationTrials:
    """A run's validation trials as the choices made on them see them, each part computed
    once and shared (:func:`lowlevel_rerank`, the strength choice): the data module with its
    validation split (a refit's rebuilt from the caches with the run's), the encoder's
    embeddings of the trials (``net`` must not have seen them),
    the low-level pathway's thumbnails of them, its ridge fitted on the train trials alone,
    and the number of repeats a test row averages (:attr:`test_repeats`, for
    :func:`as_repeat_averaged`)."""

    def __init__(self, cfg: DictConfig, net, dm, *, stim_images: list[Image.Image]):
        from ..train.fit import build_datamodule, prepare_caches

        if len(dm.splits["val"]) < 2 and cfg.datamodule.get("val_fraction"):
            dm = build_datamodule(cfg, *prepare_caches(cfg))
        self.dm, self.net, self.stim_images = dm, net, stim_images
        self.split = dm.splits["val"]
        self._embeddings: dict[str, np.ndarray] = {}

    def embeddings(self, head: str = "clip") -> np.ndarray:
        """The encoder's ``head`` embeddings of the trials (``"clip"``: the contrastive head,
        the retrieval queries), computed once per head."""
        from ..inference import predict_split

        if head not in self._embeddings:
            self._embeddings[head] = predict_split(self.net, self.dm, "val", head=head)
        return self._embeddings[head]

    @functools.cached_property
    def test_repeats(self) -> float:
        """The median number of trials a test row of the data module averages (its
        ``n_repeats``; 1 where the test repeats are not averaged)."""
        test = self.dm.splits["test"].trials
        if not len(test) or "n_repeats" not in test:
            return 1.0
        return float(np.median(test["n_repeats"]))

    def test_like(self, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
        """The validation trials' predictions ``pred`` as test rows would give them
        (:func:`as_repeat_averaged` with :attr:`test_repeats`); ``truth``: their targets."""
        return as_repeat_averaged(pred, truth, groups=self.split.subject,
                                  repeats=self.test_repeats)

    @functools.cached_property
    def thumbnails(self) -> np.ndarray:
        """Every stimulus' thumbnail (:func:`image_thumbnails`)."""
        return image_thumbnails(self.stim_images)

    @functools.cached_property
    def predicted(self) -> np.ndarray:
        """The low-level pathway's thumbnails of the validation trials."""
        from ..train.ridge import ridge_predictions

        return ridge_predictions(self.dm, targets=self.thumbnails, fit_splits=("train",),
                                 eval_split="val")


def choose_lowlevel_rerank(val: ValidationTrials, *, shortlist: int, size: int) -> dict:
    """The weight with which the low-level pathway re-ranks retrieved starts
    (``reconstruct.lowlevel_rerank=auto``), chosen on the validation trials ``val``.

    Each weight of :data:`RERANK_GRID` picks, among the start candidates (:func:`start_rows`)
    other than the trial's own stimulus, the start
    (:func:`~neurorecon.models.generators.base.start_scores`) for the encoder's embedding and
    the low-level pathway's thumbnail of each trial, both made as good as a test row's
    (:meth:`ValidationTrials.test_like`: a test row averages its repeats, a validation trial
    is one), as for the strength choice. Each pick is scored as the reconstructions
    are judged: AlexNet(2) and AlexNet(5) two-way identification of the picked image (at
    ``size`` px, the generator's resolution) against the trials' true stimuli (their mean per
    trial, as the strength is chosen). The weight is chosen by :func:`one_standard_error`, so
    a pathway whose picks do not identify the stimuli measurably better keeps the floor's
    retrieval (weight 0).
    """
    from neurorecon.models.retrieval import two_way_rows
    from neurorecon.models.vision.features import alexnet_features

    from ..train.ridge import flat_targets

    trials = val.split
    if len(trials) < 2:
        return {"value": 0.0, "validation": {}, "n_trials": len(trials),
                "reason": "fewer than 2 validation trials: cosine only"}
    embeddings, fit_rows, thumbs = flat_targets(val.dm), start_rows(val.dm), val.thumbnails
    own = np.searchsorted(fit_rows, trials.target)
    queries = val.test_like(val.embeddings(), embeddings[trials.target])
    predicted = val.test_like(val.predicted, thumbs[trials.target])
    picks = {weight: fit_rows[start_scores(queries, embeddings[fit_rows],
                                           layouts=thumbs[fit_rows], predicted=predicted,
                                           rerank=weight, shortlist=shortlist,
                                           exclude=own).argmax(1)]
             for weight in RERANK_GRID}
    shown = np.unique(np.concatenate([trials.target, *picks.values()]))  # each image once
    batch = np.stack([np.asarray(val.stim_images[i].convert("RGB").resize(
        (size, size), Image.BICUBIC)) for i in shown])
    features = alexnet_features(batch, layers=(2, 5), batch_size=32, device="cpu")[0]
    true = np.searchsorted(shown, trials.target)
    per_trial = {}
    for weight, pick in picks.items():
        made = np.searchsorted(shown, pick)
        per_trial[weight] = np.mean([two_way_rows(f[true], f[made])
                                     for f in features.values()], axis=0)
    return one_standard_error(per_trial, what="low-level re-ranking weight")


def lowlevel_rerank(cfg: DictConfig, net, dm, *, stim_images: list[Image.Image],
                    val: ValidationTrials | None = None) -> dict:
    """``reconstruct.lowlevel_rerank`` of a run: the configured number, or with ``auto`` the
    weight chosen on the validation trials (:func:`choose_lowlevel_rerank`; ``val``: those
    trials where the caller has them), or 0 where the start is not re-ranked (``start`` other
    than ``retrieved``, no low-level pathway).

    ``net`` must not have seen the validation trials: a run passes its validation-selected
    model before the refit on train + validation trials (a refitted encoder's validation
    embeddings are fitted ones, too good beside the held-out low-level pathway: the weight
    would lean to 0)."""
    rcfg = cfg.reconstruct
    if str(rcfg.start) != "retrieved" or not rcfg.lowlevel:
        return {"value": 0.0}
    if str(rcfg.lowlevel_rerank) != "auto":
        return {"value": float(rcfg.lowlevel_rerank)}
    return choose_lowlevel_rerank(val or ValidationTrials(cfg, net, dm, stim_images=stim_images),
                                  shortlist=int(rcfg.retrieval_shortlist),
                                  size=int(rcfg.generator.get("resolution") or ALEXNET_SIZE))


def generator_rows(dm) -> np.ndarray:
    """Stimulus indices the embedded generator trains on: the train images. The validation
    images stay new to it, as the test images are, so a choice made by generating for the
    validation trials (``reconstruct.strength=auto``) is not one made on images it learnt."""
    return np.unique(dm.splits["train"].target)


def start_rows(dm) -> np.ndarray:
    """Stimulus indices retrieved starts are picked from: the train and validation images
    (the bundle's gallery rows of those splits)."""
    return np.unique(np.concatenate([dm.splits[n].target for n in ("train", "val")]))


def stimulus_images(dm, stim_root: Path) -> list[Image.Image]:
    """The data module's stimulus images (RGB), in its embedding order."""
    return read_images(stim_root, dm.embedding_index["stim_file"])


def read_images(stim_root: Path, files) -> list[Image.Image]:
    """The stimulus images ``files`` (relative to ``stim_root``), RGB."""
    images = []
    for f in files:
        path = Path(stim_root) / f
        if not path.is_file():
            raise DataError("stimulus image missing (needed for the gallery, the generator "
                            "and the low-level pathway)", path=path)
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return images


def caption_pathway(dm, generator, *, stim_root: Path,
                    captions: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Caption pathway: ridge from brain data to the generator's caption ``prompt_embeds``.

    Captions come from ``<stim_root>/stimuli.tsv`` (or the ``captions`` TSV), are encoded by
    the generator's own text encoder, and a per-subject ridge predicts them for the test rows.
    Returns the predicted ``(n_test_rows, seq_len, hidden)`` and the true per-stimulus
    ``(n_stimuli, seq_len, hidden)`` text embeddings.
    """
    from ..embed.run import stimulus_table
    from ..train.ridge import ridge_predictions

    if not hasattr(generator, "encode_captions"):
        raise DataError(f"the caption pathway needs a generator with a text encoder; "
                        f"{type(generator).__name__} has none",
                        hint="use reconstruct/generator=stable_unclip or ip_adapter, or set "
                             "reconstruct.captions=false")
    index, _ = stimulus_table(Path(stim_root), dm.embedding_index["stim_file"].tolist(),
                              captions=captions, need_captions=True)
    true = generator.encode_captions(index["caption"].tolist())
    pred = ridge_predictions(dm, targets=true.reshape(len(true), -1))
    return pred.reshape(len(pred), *true.shape[1:]), true
