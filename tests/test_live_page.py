"""The /live page in a real browser (Debian's chromium driven by playwright): a replayed
recording streams into `neurorecon serve`, the page shows decoded frames and thumbnails; a
screenshot is saved (tmp dir, and $NEURORECON_SCREENSHOT_DIR when set)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from neurorecon.serve.client import LocalService

from .test_serve import make_service

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run "
                    "installs it)")
def test_live_page_shows_decoded_frames(meg_run, sample_root, tmp_path):
    from playwright.sync_api import sync_playwright

    from neurorecon.pipelines.data.studies import find_recordings
    from neurorecon.serve.replay import replay

    rec = find_recordings(sample_root / "meg", modality="meg")[0]
    name = f"nr-live-{time.time_ns() % 10**8}"
    settings, alice, _ = make_service(meg_run[0] / "bundle", tmp_path,
                                      rate_limit_per_minute=10**6)
    player = replay(rec.fpath, name=name, markers=True, repeat=3, wait_s=60)
    try:
        with LocalService({**settings.model_dump(include={"bundles", "data_dir",
                                                          "api_keys_file"}),
                           "stream.source": name, "stream.subject": rec.subject,
                           "stream.markers": f"{name}-markers", "stream.hop": 0.1,
                           "stream.outlet": f"{name}-decoded"},
                          cwd=tmp_path, log=tmp_path / "serve.log") as service, \
                sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1300, "height": 720})
            page.goto(f"{service.url}/live?key={alice}")
            page.wait_for_function(
                "Number(document.getElementById('frames').textContent) >= 20", timeout=60_000)
            page.wait_for_function(
                "(() => { const im = [...document.querySelectorAll('#topk img')];"
                " return im.length === 5 && im.every(i => i.complete && i.naturalWidth > 0);"
                "})()", timeout=20_000)
            page.wait_for_function("document.getElementById('eventMarker').textContent"
                                   ".includes('.')", timeout=30_000)  # an event: an image id
            assert page.inner_text("#state") == "connected"
            shot = tmp_path / "live.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 10_000
        if os.environ.get("NEURORECON_SCREENSHOT_DIR"):
            shutil.copy(shot, Path(os.environ["NEURORECON_SCREENSHOT_DIR"]) / "live.png")
    finally:
        if not player.finished:
            player.stop()
