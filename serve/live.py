"""``GET /live``: the page a lab watches while it streams. It opens the WebSocket
``/v1/meg/stream`` (the key from the page's ``?key=``) and shows the current top-k gallery
thumbnails with their scores, the marker (for a replayed file: the shown image), a
confidence trace, the decode latency and the signal quality; ``/v1/meg/status`` (polled each
second) gives the connection state."""

from __future__ import annotations

_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>neurorecon live MEG decoding</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.2rem;background:#fafafa;color:#222}
h1{font-size:1.3rem;margin:0 0 .4rem}
.row{display:flex;gap:1.2rem;flex-wrap:wrap;align-items:flex-start}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.7rem}
#topk{display:flex;gap:.6rem}
.hit{text-align:center;font-size:12px;width:104px}
.hit img{width:96px;height:96px;image-rendering:pixelated;border:3px solid transparent}
.hit.truth img{border-color:#2a2}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;margin:2px;font-size:12px;
background:#e6efe6}
.badge.bad{background:#f6d5d5}.state-connected{color:#2a2}.state-stale,.state-reconnecting,
.state-connecting{color:#c80}.state-error{color:#c22}
canvas{background:#fff;border:1px solid #eee}
small{color:#666}
</style></head><body>
<h1>neurorecon — live MEG decoding</h1>
<div>stream <b id="source">?</b> · state <b id="state">?</b> · <span id="sfreq"></span>
 · frames <b id="frames">0</b> · seq <span id="seq">–</span> · mode <span id="mode">–</span>
 · marker <b id="marker">–</b></div>
<div id="error" style="color:#c22"></div>
<div class="row" style="margin-top:.6rem">
 <div class="card"><div>now: top-k gallery images (cosine) of the latest window</div>
  <div id="topk"></div></div>
 <div class="card"><div>last event: marker <b id="eventMarker">–</b> <span id="eventHit"></span>
  </div><div id="eventTopk"></div></div>
 <div class="card" style="max-width:230px"><div>preview reconstruction</div><img id="preview"
   alt="no preview" style="width:96px;height:96px;image-rendering:pixelated"><br>
   <small id="note"></small></div>
</div>
<div class="row" style="margin-top:.6rem">
 <div class="card"><div>confidence (top-1 − top-2 score) <b id="conf">–</b></div>
  <canvas id="confTrace" width="420" height="110"></canvas></div>
 <div class="card"><div>latency <b id="latency">–</b> ms · p50 <span id="p50">–</span>
  · p99 <span id="p99">–</span></div><canvas id="latTrace" width="420" height="110"></canvas></div>
 <div class="card"><div>signal quality</div><div id="quality"></div>
  <div><small>samples <span id="samples">0</span> · gaps <span id="gaps">0</span> · dropped
  <span id="dropped">0</span> · reconnects <span id="reconnects">0</span></small></div></div>
</div>
<script>
const key = new URLSearchParams(location.search).get("key") || "";
const $ = id => document.getElementById(id);
const conf = [], lat = [];
let frames = 0, model = null, socket = null, backoff = 500;
function trace(canvas, values, color, fixedMax) {
  const c = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
  c.clearRect(0, 0, w, h);
  if (!values.length) return;
  const max = fixedMax || Math.max(...values, 1e-9), min = Math.min(0, ...values);
  c.strokeStyle = color; c.lineWidth = 1.5; c.beginPath();
  values.forEach((v, i) => {
    const x = i * w / 150, y = h - 4 - (v - min) / (max - min || 1) * (h - 8);
    i ? c.lineTo(x, y) : c.moveTo(x, y);
  });
  c.stroke(); c.fillStyle = "#666"; c.fillText(max.toFixed(3), 2, 10);
}
function thumb(row) {
  return `/v1/models/${encodeURIComponent(model)}/gallery/${row}.png?key=${encodeURIComponent(key)}`;
}
function show(m) {
  if (m.type === "preview") { $("preview").src = m.image; $("note").textContent = m.note; return; }
  frames += 1; $("frames").textContent = frames;
  $("seq").textContent = m.seq; $("mode").textContent = m.mode;
  if (m.marker !== undefined) $("marker").textContent = m.marker;
  if (m.model) model = m.model;
  $("latency").textContent = m.latency_ms.toFixed(1);
  lat.push(m.latency_ms); if (lat.length > 150) lat.shift();
  if (m.confidence !== null && m.confidence !== undefined) {
    conf.push(m.confidence); if (conf.length > 150) conf.shift();
    $("conf").textContent = m.confidence.toFixed(3);
  }
  trace($("confTrace"), conf, "#1f6fb2"); trace($("latTrace"), lat, "#b2591f");
  const q = m.quality || {};
  $("quality").innerHTML = ["gap", "warmup"].map(k =>
      `<span class="badge ${q[k] ? "bad" : ""}">${k} ${q[k] ? "yes" : "no"}</span>`).join("")
    + ["nan_channels", "flat_channels", "saturated_channels", "missing_channels"].map(k =>
      `<span class="badge ${q[k] ? "bad" : ""}">${k.replace("_channels", "")} ${q[k] || 0}</span>`).join("");
  if (m.topk && m.topk.length && model) {
    const html = m.topk.map(h =>
      `<div class="hit ${h.id === m.marker ? "truth" : ""}"><img src="${thumb(h.row)}" alt="${h.id}"
        title="${h.id}"><br>${h.score.toFixed(3)}<br><small>${h.concept}</small></div>`).join("");
    if (m.mode === "event") {
      $("eventTopk").innerHTML = html; $("eventMarker").textContent = m.marker;
      const rank = m.topk.findIndex(h => h.id === m.marker);
      $("eventHit").textContent = rank >= 0 ? `(shown image at rank ${rank + 1})` : "";
    } else { $("topk").innerHTML = html; }
  }
  $("error").textContent = m.error || "";
}
function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${proto}://${location.host}/v1/meg/stream`, ["neurorecon", key]);
  socket.onopen = () => { backoff = 500; };
  socket.onmessage = e => show(JSON.parse(e.data));
  socket.onclose = () => { setTimeout(connect, backoff); backoff = Math.min(8000, backoff * 2); };
}
async function poll() {
  try {
    const r = await fetch("/v1/meg/status", {headers: {"X-API-Key": key}});
    if (r.ok) {
      const s = await r.json();
      $("state").textContent = s.state; $("state").className = "state-" + s.state;
      $("source").textContent = s.source || "none";
      $("sfreq").textContent = s.sfreq ? `${s.sfreq} Hz` : "";
      for (const k of ["samples", "gaps", "dropped", "reconnects"]) $(k).textContent = s[k];
      $("p50").textContent = s.latency_p50_ms ?? "–"; $("p99").textContent = s.latency_p99_ms ?? "–";
      if (s.error && s.state !== "connected") $("error").textContent = s.error;
    } else { $("state").textContent = `HTTP ${r.status}`; }
  } catch (e) { $("state").textContent = "service unreachable"; }
}
connect(); poll(); setInterval(poll, 1000);
</script></body></html>
"""


def live_page() -> str:
    return _PAGE
