"""The job page people look at: reconstructions beside the retrieved gallery thumbnails and,
when known, the stimulus. Images are inlined (data URIs), so the page needs no second
authenticated request."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from PIL import Image

from neurorecon.pipelines.inference import Decoder

from .store import FINISHED, Job

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
table{border-collapse:collapse}td,th{padding:4px 8px;border-bottom:1px solid #ddd;
vertical-align:top;font-size:13px}img{image-rendering:pixelated;width:72px;height:72px}
.hit{display:inline-block;text-align:center;margin-right:4px}.ok{outline:3px solid #2a2}
.note{color:#666;font-size:12px;max-width:60rem}.metrics td{border:0;padding:2px 8px}
"""


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _img(data: bytes, title: str = "", cls: str = "") -> str:
    src = "data:image/png;base64," + base64.b64encode(data).decode()
    return (f'<img src="{src}" title="{html.escape(title)}" alt="{html.escape(title)}"'
            f'{f" class={cls}" if cls else ""}>')


def _metrics_table(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "<p>No ground truth (no <code>stim_file</code> column): no metrics.</p>"
    rows = []
    ret = metrics.get("retrieval")
    if ret:
        for name in ("encoder", "chance"):
            m = ret[name]
            rows.append(f"<tr><td>retrieval {name}</td><td>top-1 {m['top1']:.3f}</td>"
                        f"<td>top-5 {m['top5']:.3f}</td><td>median rank "
                        f"{m['median_rank']:.1f} / {m['n_candidates']}</td></tr>")
    rec = metrics.get("reconstruction")
    if rec:
        for name in ("brain", "floor_retrieved"):
            vals = " ".join(f"<td>{k} {v:.3f}</td>" for k, v in rec[name].items()
                            if isinstance(v, float))
            rows.append(f"<tr><td>reconstruction {name}</td>{vals}</tr>")
    return f'<table class="metrics">{"".join(rows)}</table>'


def job_page(job: Job, result: dict[str, Any] | None, decoder: Decoder | None,
             image_dir: Path) -> str:
    head = (f"<!doctype html><html><head><meta charset=utf-8><title>neurorecon job "
            f"{job.id[:8]}</title><style>{_STYLE}</style>"
            + ("" if job.status in FINISHED else '<meta http-equiv="refresh" content="2">')
            + "</head><body>")
    info = (f"<h1>fMRI job {job.id[:8]}</h1><p>status <b>{job.status}</b> · model "
            f"{html.escape(job.model)} · sub-{html.escape(job.subject)} · "
            f"{len(job.spec.rows)} trials · input {job.kind}</p>")
    if job.progress and job.status not in FINISHED:
        p = job.progress
        info += f"<p>{html.escape(p['stage'])}: {p['done']} / {p['total']}</p>"
    if job.error:
        info += f"<p><b>error</b>: {html.escape(job.error)}</p>"
    if result is None or decoder is None:
        return head + info + "</body></html>"
    gallery = decoder.gallery
    ids = {image_id: k for k, image_id in enumerate(gallery.index["image_id"])}
    rows = []
    for t in result["trials"]:
        stim = t.get("stim_file")
        truth = (_img(png_bytes(gallery.thumbnail(ids[stim])), stim)
                 if stim in ids else html.escape(stim or "—"))
        recon = ("—" if t["image_index"] is None else
                 _img((image_dir / f"{t['image_index']}.png").read_bytes(), "reconstruction"))
        hits = "".join(
            '<span class="hit">'
            + _img(png_bytes(gallery.thumbnail(h["gallery_row"])), h["id"],
                   "ok" if h["id"] == stim else "")
            + f"<br>{h['score']:.2f}</span>" for h in t["topk"])
        onset = "" if t.get("onset") is None else f"{t['onset']:.1f} s"
        rows.append(f"<tr><td>{t['row']}</td><td>{onset}<br>"
                    f"{html.escape(t.get('trial_type') or '')}</td><td>{truth}</td>"
                    f"<td>{recon}</td><td>{hits}</td></tr>")
    table = ("<table><tr><th>row</th><th>onset</th><th>stimulus</th><th>reconstruction</th>"
             "<th>retrieved (top-k, cosine)</th></tr>" + "".join(rows) + "</table>")
    timings = result.get("timings", {})
    foot = (f"<p class=note>{html.escape(result.get('note', ''))}</p><p class=note>"
            + html.escape(", ".join(f"{k} {v}" for k, v in timings.items())) + "</p>")
    return (head + info + _metrics_table(result.get("metrics")) + table + foot
            + "</body></html>")
