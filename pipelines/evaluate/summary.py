"""One-page Markdown report of a run: the tables of ``metrics.json`` and its figures.

``report.md`` sits next to ``metrics.json`` in the run directory and links the PNG figures by
relative path, so the directory can be moved, zipped or rendered by any Markdown viewer
(GitHub, VS Code, ``pandoc report.md -o report.html``). It is rebuilt from ``metrics.json``
alone: :func:`write_report` works on a finished run directory too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .recon_metrics import HIGHER_IS_BETTER, METRICS

FIGURES = (
    ("retrieval_examples.png", "Test images and the encoder's top-5 retrieved images"),
    ("time_resolved.png", "Time-resolved decoding: ridge on sliding windows vs the deep "
                          "encoder on the whole window"),
    ("reconstructions.png", "Reconstructions: stimulus | start | brain | "
                            "retrieved (floor) | ceiling (true embedding)"),
    ("adaptation.png", "New-subject adaptation"),
)
_RECON_ROWS = (("brain", "brain-decoded"), ("floor_retrieved", "floor: nearest training image"),
               ("ceiling", "ceiling: generator fed the true embedding"),
               ("lowlevel_only", "low-level pathway alone (ridge thumbnail)"),
               ("start_only", "the retrieved start alone (what the generator starts from)"))


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _retrieval(title: str, block: dict[str, Any]) -> list[str]:
    keys = ["top1", "top5", "median_rank", "rel_median_rank"]
    return [f"### {title}", ""] + _table(
        ["decoder", *keys], [[name, *(m.get(k) for k in keys)] for name, m in block.items()])


def _start(rec: dict[str, Any]) -> str:
    """How the sampler started, in words."""
    start = rec.get("start", "lowlevel" if rec.get("lowlevel_pathway") else "noise")
    if start == "noise":
        return ", sampled from noise"
    if start == "lowlevel":
        return f", low-level img2img start (strength {rec['strength']})"
    found = rec.get("retrieval") or {}
    rerank = (f", chosen among the {found.get('shortlist')} nearest with the low-level "
              f"pathway's thumbnail (weight {found.get('lowlevel_rerank')})"
              if found.get("lowlevel_rerank") else "")
    where = (f"the {found.get('k', 1)} training image(s) nearest to the decoded "
             f"embedding{rerank}")
    if not rec["strength"]:
        why = (", chosen on the validation trials: generating from the start did not score "
               "higher there" if "validation" in (rec.get("strength_choice") or {}) else "")
        return f"; no sampler step (strength 0{why}): the images are their start, {where}"
    return f", img2img start (strength {rec['strength']}) from {where}"


def _reconstruction(rec: dict[str, Any]) -> list[str]:
    names = [m for m in METRICS if any(rec["metrics"].get(r, {}).get(m) is not None
                                       for r, _ in _RECON_ROWS)]
    header = ["images", *(f"{m} {'↑' if HIGHER_IS_BETTER[m] else '↓'}" for m in names)]
    rows = [[label, *(rec["metrics"][key].get(m) for m in names)]
            for key, label in _RECON_ROWS if key in rec["metrics"]]
    out = ["## Reconstruction", "", f"Generator: {rec['generator']}.", "",
           f"{rec['n_images']} test rows at {rec['resolution']} px, conditioned on the "
           f"encoder's {rec.get('head', 'clip')} head"
           + (f"; {rec['steps']} sampler steps, guidance {rec['guidance_scale']}"
              if rec["strength"] else "")
           + _start(rec)
           + (", caption pathway (ridge brain → caption prompt_embeds)"
              if rec.get("caption_pathway") else "") + ".", ""]
    out += _table(header, rows)
    per_subject = rec.get("per_subject_brain") or {}
    if per_subject:
        out += ["Brain-decoded, per subject:", ""]
        out += _table(["subject", *names], [[f"sub-{s}", *(m.get(k) for k in names)]
                                             for s, m in per_subject.items()])
    notes = rec["metrics"].get("brain", {}).get("_notes", {})
    unavailable = [m for m in METRICS if m not in names]
    out += ["Metric notes:", ""]
    out += [f"- **{m}**: {notes[m]}" for m in (*names, *unavailable) if m in notes]
    train = rec.get("generator_training") or {}
    if train:
        out += ["", f"Generator training: {train.get('steps')} steps on {train.get('n_images')} "
                f"train-split images in {train.get('seconds')} s (final loss "
                f"{_fmt(train.get('final_loss'))})."]
    if "seconds_per_image" in rec:
        out += [f"Sampling: {rec['seconds_per_image']} s per image."]
    return out + [""]


def _region_prior_line(priors: dict[str, list[str] | None]) -> str:
    """The region prior of new fMRI subjects (``{new subject: the trained subjects}``)."""
    return ("Region prior (`region_prior.fmri`): the voxels of " + "; ".join(
        f"sub-{new} weighted by where those of sub-{', sub-'.join(old)} carried the stimulus"
        for new, old in priors.items() if old) + " (their encoding R² maps in MNI space, mixed "
        "with its own), in the adapted ways; from scratch weighs by its own map only.")


def write_report(out_dir: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``report.md`` for the run in ``out_dir`` (``metrics`` default: its metrics.json)."""
    out_dir = Path(out_dir)
    if metrics is None:
        metrics = json.loads((out_dir / "metrics.json").read_text())
    lines = [f"# neurorecon run: {metrics['modality'].upper()}", "",
             f"Run directory `{out_dir.name}`; {metrics['n_test']} test rows "
             f"({metrics.get('n_test_images', '?')} test images), subjects "
             f"{', '.join('sub-' + s for s in metrics.get('subjects', []))}.", "",
             f"Embedder: `{metrics.get('embedder')}`."]
    if metrics.get("checkpoint"):
        lines += ["", f"Checkpoint: `{metrics['checkpoint']}`."]
    if metrics.get("embedder_note"):
        lines += ["", f"> {metrics['embedder_note']}"]
    skipped = (metrics.get("data") or {}).get("skipped_runs")
    if skipped:
        lines += ["", f"> **{len(skipped)} run(s) left out** (events file without recording, "
                  f"`data.missing_runs=warn`): {', '.join(f'`{s}`' for s in skipped)}"]
    artifacts = (metrics.get("data") or {}).get("artifacts")
    if artifacts:
        lines += ["", "Artifact projectors (SSP, from the EOG/ECG channels): " + "; ".join(
            f"sub-{label} {found['projectors']} from "
            + ", ".join(f"{found[kind]} {name}" for kind, name in
                        (("eog", "blinks"), ("ecg", "heartbeats")) if kind in found)
            for label, found in artifacts.items()) + "."]
    delays = (metrics.get("data") or {}).get("hrf_delay")
    if delays:
        lines += ["", "HRF delay of the single-trial GLM (`preprocess.fmri.hrf_onset`"
                  + (", chosen per subject by the variance the mean evoked response explains"
                     if any("explained" in d for d in delays.values()) else "") + "): "
                  + ", ".join(f"sub-{label} {d['hrf_onset']:+g} s"
                              for label, d in delays.items()) + "."]
    if "retrieval" in metrics:
        lines += ["", "## Retrieval", ""]
        lines += _retrieval("Among the test images (metrics.json `retrieval`)",
                            metrics["retrieval"])
    if "retrieval_all_images" in metrics:
        lines += _retrieval("Among all stimulus images (harder)",
                            metrics["retrieval_all_images"])
    spread = metrics.get("over_seeds")
    if spread:
        lines += [f"### Mean ± sd over seeds {metrics.get('seeds')}", ""]
        rows = []
        for block, label in (("retrieval", "test images"), ("retrieval_all_images", "all images")):
            for dec, m in spread.get(block, {}).items():
                rows.append([dec, label, *(f"{m[k]['mean']:.3f} ± {m[k]['sd']:.3f}"
                                           for k in ("top1", "top5"))])
        lines += _table(["decoder", "candidates", "top1", "top5"], rows)
        if "time_resolved_peak_top5" in spread:
            p = spread["time_resolved_peak_top5"]
            lines += [f"Best 250 ms-window ridge top-5: {p['mean']:.3f} ± {p['sd']:.3f}.", ""]
    if metrics.get("retrieval_per_subject"):
        lines += ["### Per subject (top-5)", ""]
        decoders = list(next(iter(metrics["retrieval_per_subject"].values())))
        lines += _table(["subject", *decoders],
                        [[f"sub-{s}", *(m[d]["top5"] for d in decoders)]
                         for s, m in metrics["retrieval_per_subject"].items()])
    train = metrics.get("training") or {}
    if train:
        lines += [f"Training: {train.get('epochs')} epochs in {train.get('train_seconds')} s; "
                  f"checkpoint `{train.get('best_checkpoint')}`.", ""]
        focus = train.get("focus")
        if focus:
            lines += [f"Temporal focus of the encoder: {focus['tmin']:.3f}–{focus['tmax']:.3f} "
                      f"s ({focus['reason']}).", ""]
    tr = metrics.get("time_resolved") or {}
    if tr.get("peak"):
        who = ", ".join(f"sub-{s}" for s in tr.get("subjects", []))
        lines += [f"Sliding 250 ms-window ridge ({who}, pooled): peak top-5 "
                  f"{tr['peak']['top5']:.3f} at {tr['peak']['time']:.3f} s; deep encoder: "
                  f"{tr['encoder_top5']:.3f} (chance {tr['chance_top5']:.3f}).",
                  ""]
        if tr.get("deep"):
            d = tr["deep"]
            best = int(max(range(len(d["top5"])), key=d["top5"].__getitem__))
            lines += [f"Deep encoder trained on each 250 ms window (every {d['step']:g} s): "
                      f"peak top-5 {d['top5'][best]:.3f} at {d['times'][best]:.3f} s.", ""]
    if metrics.get("reconstruction"):
        lines += _reconstruction(metrics["reconstruction"])
    adapted = metrics.get("adapt")
    if adapted:
        ridge = adapted["ridge_same_trials"]
        lines += ["## Adapted decoder", "",
                  f"sub-{', sub-'.join(adapted['subjects'])} added to the decoder of "
                  f"sub-{', sub-'.join(adapted['bundle_subjects'])} ({adapted['from_bundle']}): "
                  f"{adapted['trainable']} trained in {adapted['train_seconds']:.1f} s "
                  f"(best epoch {adapted['best_epoch']} of {adapted['epochs']}). A ridge "
                  f"fitted on the same trials: top-1 {_fmt(ridge['top1'])}, top-5 "
                  f"{_fmt(ridge['top5'])}.", ""]
        if adapted.get("region_prior"):
            lines += [_region_prior_line(dict.fromkeys(adapted["subjects"],
                                                       adapted["region_prior"])), ""]
        if adapted.get("chosen") == "auto":
            se = (adapted.get("way_choice") or {}).get("standard_error") or {}
            lines += ["adapt.way=auto: validation rank score " + ", ".join(
                f"{w} {_fmt(v)}" + (f" (± {se[w]:.3f} from the best)" if w in se else "")
                for w, v in adapted["val_rank_score"].items())
                + f"; {adapted['way']} kept, the first of "
                f"{', '.join(adapted['val_rank_score'])} within one standard error of the best.",
                ""]
    adapt = metrics.get("adaptation")
    if adapt:
        news = adapt.get("new_subjects") or [adapt["new_subject"]]
        lines += ["## New-subject adaptation", "",
                  (f"New subject sub-{news[0]}, shared model trained on "
                   f"{', '.join('sub-' + s for s in adapt['shared_subjects'])}. " if len(news) == 1
                   else f"Each of sub-{', sub-'.join(news)} in turn new to a model trained on "
                   "the others (leave-one-subject-out). ") + "Top-5 by "
                  f"fraction of the new subject's training trials (chance "
                  f"{_fmt(adapt['chance']['top5'])}), mean ± sd over seeds "
                  f"{adapt.get('seeds')}" + (" and new subjects" if len(news) > 1 else "")
                  + ":", ""]
        sd = adapt.get("top5_sd") or {}
        lines += _table(["model", *(f"{f:g} ({n} trials)" for f, n in zip(
                            adapt["fractions"], adapt.get("n_train_trials") or
                            [""] * len(adapt["fractions"]), strict=True))],
                        [[name, *(f"{_fmt(v)} ± {_fmt(e)}" if name in sd else v
                                  for v, e in zip(vals, sd.get(name, vals), strict=True))]
                         for name, vals in adapt["top5"].items()])
        if adapt.get("shared_top5"):
            lines += ["", "The shared model's top-5 on its own subjects' test trials (what the "
                      "adapted ways start from): " + "; ".join(
                          f"without sub-{new} {_fmt(v)}"
                          for new, v in adapt["shared_top5"].items()) + "."]
        if any((adapt.get("region_prior") or {}).values()):
            lines += ["", _region_prior_line(adapt["region_prior"])]
        if adapt.get("best_on_validation"):
            lines += ["", "Best on validation kept (runs per way): " + "; ".join(
                f"{frac}: " + ", ".join(f"{w} {n}" for w, n in counts.items() if n)
                for frac, counts in adapt["best_on_validation"].items()) + "."]
    figures = [(f, caption) for f, caption in FIGURES if (out_dir / f).is_file()]
    if figures:
        lines += ["## Figures", ""]
        for f, caption in figures:
            lines += [f"### {caption}", "", f"![{caption}]({f})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
