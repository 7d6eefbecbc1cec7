"""The real-time MEG decoder: online == offline, faults flagged and survived, LSL in and out,
reconnects, the WebSocket, status and metrics routes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import mne
import numpy as np
import pytest
from fastapi.testclient import TestClient

from neurorecon.models.common.checks import DataError


@pytest.fixture(scope="module")
def meg(meg_run, sample_root):
    """(decoder, raw, events table, offline embeddings of every event) of the tiny sample."""
    from neurorecon.pipelines.data.events import EventSpec, read_events
    from neurorecon.pipelines.data.studies import find_recordings
    from neurorecon.pipelines.inference import Decoder
    from neurorecon.pipelines.preprocess.meg import read_raw

    decoder = Decoder.from_pretrained(meg_run[0] / "bundle")
    rec = find_recordings(sample_root / "meg", modality="meg")[0]
    events = read_events(rec.events_path, bids_root=sample_root / "meg", spec=EventSpec())
    raw = read_raw(rec).load_data(verbose=False)
    offline = decoder.encode(decoder.prepare_meg(raw, subject=rec.subject, events=events),
                             subject=rec.subject)
    return decoder, raw, events, offline, rec.subject


def _online(meg, **params):
    from neurorecon.serve.streaming import OnlineDecoder, StreamParams

    decoder, raw, _, _, subject = meg
    messages = []
    online = OnlineDecoder(decoder, subject=subject, ch_names=raw.ch_names,
                           sfreq=raw.info["sfreq"], params=StreamParams(**params),
                           publish=messages.append)
    return online, messages


def _feed(online, data, ts, sizes=(7, 13, 10, 1, 29)):
    """Push ``data`` (n_samples, n_channels) in chunks of varying sizes."""
    start, k = 0, 0
    while start < len(data):
        n = sizes[k % len(sizes)]
        online.push(data[start:start + n], ts[start:start + n])
        start, k = start + n, k + 1


def test_online_event_mode_equals_offline_at_another_rate(meg):
    """A 1000 Hz stream into a bundle trained on 1200 Hz recordings at 120 Hz (a non-integer
    ratio: causal interpolation): each marked trial's embedding equals the offline decoding of
    the same 1000 Hz recording."""
    decoder, raw, events, _, subject = meg
    raw = raw.copy().resample(1000.0, verbose=False)
    # a 1000 Hz recording's events lie on its samples
    events = events.assign(onset=np.round(events["onset"] * 1000.0) / 1000.0)
    offline = decoder.encode(decoder.prepare_meg(raw.copy(), subject=subject, events=events),
                             subject=subject)
    online, messages = _online((decoder, raw, events, offline, subject), hop=0, embeddings=True)
    t0 = 20.0
    for onset, stim in zip(events["onset"], events["stim_file"], strict=True):
        online.add_marker(t0 + onset, stim)
    data = raw.get_data().T
    _feed(online, data, t0 + np.arange(len(data)) / 1000.0, sizes=(17, 3, 40, 1, 9))
    decoded = [m for m in messages if m["mode"] == "event"]
    assert [m["marker"] for m in decoded] == list(events["stim_file"])
    np.testing.assert_allclose([m["embedding"] for m in decoded], offline, atol=1e-4, rtol=0)


def test_online_event_mode_equals_offline(meg):
    """Chunks of any size through the causal filter, ring buffer and the bundle: each marked
    trial's embedding equals the offline decoding of the same trial (phase=causal bundle)."""
    _, raw, events, offline, _ = meg
    online, messages = _online(meg, hop=0.25, embeddings=True)
    t0 = 1000.0
    for onset, stim in zip(events["onset"], events["stim_file"], strict=True):
        online.add_marker(t0 + onset, stim)
    data = raw.get_data().T
    _feed(online, data, t0 + np.arange(len(data)) / raw.info["sfreq"])
    decoded = [m for m in messages if m["mode"] == "event"]
    assert [m["marker"] for m in decoded] == list(events["stim_file"])
    emb = np.array([m["embedding"] for m in decoded])
    np.testing.assert_allclose(emb, offline, atol=1e-4, rtol=0)
    for m in decoded:
        assert set(m) >= {"seq", "mode", "t_lsl", "latency_ms", "marker", "topk", "quality"}
        assert len(m["topk"]) == 5 and m["quality"]["warmup"] is False
    sliding = [m for m in messages if m["mode"] == "sliding"]
    assert len(sliding) == pytest.approx(raw.times[-1] / 0.25, abs=3)
    assert sliding[0]["quality"]["warmup"] and not sliding[-1]["quality"]["warmup"]
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))


def test_faults_are_flagged_and_survived(meg):
    _, raw, _, _, _ = meg
    sfreq = raw.info["sfreq"]
    data = raw.get_data().T.copy()
    ts = 50.0 + np.arange(len(data)) / sfreq
    online, messages = _online(meg, hop=0.1, warmup_s=0.5)
    n = len(data)
    a, b = n // 4, n // 4 + 120  # a dropped stretch of 120 samples: a gap
    meg_idx = [raw.ch_names.index(c) for c in online.decoder.config.subjects[
        online.subject].ch_names]
    c = n // 2
    data[c:c + 60, meg_idx[:5]] = np.nan  # a NaN burst in 5 channels
    data[c:, meg_idx[10:12]] = 1e-12  # 2 channels go flat
    data[c:, meg_idx[20]] = 1e-6  # 1 saturated channel
    rings = (online.ring.shape, online.slot_min.shape)
    _feed(online, np.concatenate([data[:a], data[b:]]), np.concatenate([ts[:a], ts[b:]]))
    stats = online.stats()
    assert stats["gaps"] == 1 and stats["dropped"] == b - a
    gap = next(i for i, m in enumerate(messages) if m["quality"]["gap"])
    assert messages[gap + 1]["quality"]["warmup"]  # the filter restarted
    late = [m for m in messages[gap:] if not m["quality"]["warmup"]]
    assert late and all(m["topk"] for m in late)  # decoding goes on after the gap
    bad = [m for m in messages if m["quality"]["nan_channels"]]
    assert bad and max(m["quality"]["nan_channels"] for m in bad) == 5
    assert all(m["topk"] for m in bad)  # masked, not stopped
    last = messages[-1]["quality"]
    assert last["nan_channels"] == 0  # the burst has left the window
    assert last["flat_channels"] == 2 and last["saturated_channels"] == 1
    assert np.isfinite(online.ring).all()  # NaNs never reach the filter state
    # a clock jump back: reset and go on
    before = len(messages)
    more = raw.get_data().T[: int(3 * sfreq)]
    _feed(online, more, 10.0 + np.arange(len(more)) / sfreq)
    assert online.stats()["clock_jumps"] == 1 and online.stats()["gaps"] == 2
    after = messages[before:]
    assert after[0]["quality"]["gap"] and after[-1]["topk"]  # flagged, then decoding again
    assert (online.ring.shape, online.slot_min.shape) == rings  # fixed memory


def test_streams_the_bundle_cannot_decode_are_clear_errors(meg):
    from neurorecon.serve.streaming import OnlineDecoder

    decoder, raw, _, _, subject = meg
    with pytest.raises(DataError, match="100 Hz"):  # below the recipe's rate
        OnlineDecoder(decoder, subject=subject, ch_names=raw.ch_names, sfreq=100.0)
    with pytest.raises(DataError, match="lacks"):
        OnlineDecoder(decoder, subject=subject, ch_names=[f"EEG{i:03d}" for i in range(64)],
                      sfreq=raw.info["sfreq"])
    with pytest.raises(DataError, match="unknown subject"):
        OnlineDecoder(decoder, subject="99", ch_names=raw.ch_names, sfreq=raw.info["sfreq"])
    # a few missing channels are masked, not refused
    names = decoder.config.subjects[subject].ch_names
    online = OnlineDecoder(decoder, subject=subject, ch_names=[c for c in raw.ch_names
                                                               if c not in names[:7]],
                           sfreq=raw.info["sfreq"])
    assert online.stats()["missing_channels"] == names[:7]


def test_hub_is_bounded_and_newest_wins():
    import asyncio

    from neurorecon.serve.lsl import Hub

    async def main():
        hub = Hub(queue_size=4)
        hub.loop = asyncio.get_running_loop()
        slow = hub.subscribe()
        for i in range(50):
            hub.publish({"type": "decoded", "seq": i})
        await asyncio.sleep(0.05)
        return hub, [slow.get_nowait()["seq"] for _ in range(slow.qsize())]

    hub, got = asyncio.run(main())
    assert got == [46, 47, 48, 49] and hub.latest["seq"] == 49 and hub.dropped == 46


# --------------------------------------------------------------------------------------------
# through LSL
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_recording(meg, tmp_path_factory) -> Path:
    """The first 12 s of the sample recording with its BIDS events sidecar."""
    _, raw, events, _, _ = meg
    folder = tmp_path_factory.mktemp("replay")
    path = folder / "sub-01_task-images_run-01_meg.fif"
    raw.copy().crop(0, 12).set_annotations(None).save(path, verbose=False)  # markers: sidecar
    keep = events[events["onset"] + 1.2 < 12]
    keep.to_csv(folder / "sub-01_task-images_run-01_events.tsv", sep="\t", index=False)
    return path


def _wait(pred, timeout=30.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_replay_over_lsl_equals_offline_and_reconnects(meg, short_recording):
    """`replay` (markers from the events sidecar) -> StreamLSL -> the decoder: the marked
    trials decode as offline; the LSL outlet carries the top-k; the source stopping and
    coming back is a reconnect."""
    from mne_lsl.lsl import StreamInlet, resolve_streams

    from neurorecon.serve.lsl import Hub, StreamService
    from neurorecon.serve.replay import CHUNK_S, replay
    from neurorecon.serve.settings import StreamSettings

    decoder, raw, events, offline, subject = meg
    name = f"nr-test-{time.time_ns() % 10**8}"
    settings = StreamSettings(source=name, subject=subject, markers=f"{name}-markers",
                              embeddings=True, hop=0.2, stale_s=0.5, reconnect_s=1.5,
                              outlet=f"{name}-decoded")
    messages = []
    player = replay(short_recording, name=name, markers=True, wait_s=20)
    service = StreamService({"meg": decoder}, settings, Hub(), on_message=messages.append)
    service.start()
    try:
        assert _wait(lambda: service.state == "connected"), service.status()
        found = resolve_streams(timeout=5, name=f"{name}-decoded")
        assert found, "decoded outlet not found"
        inlet = StreamInlet(found[0])
        inlet.open_stream(timeout=5)
        assert _wait(lambda: player.finished, timeout=40)
        n_events = len(events[events["onset"] + 1.2 < 12])
        assert _wait(lambda: sum(m["mode"] == "event" for m in messages) == n_events)
        decoded = [m for m in messages if m["mode"] == "event"]
        assert [m["marker"] for m in decoded] == list(events["stim_file"][:n_events])
        np.testing.assert_allclose([m["embedding"] for m in decoded], offline[:n_events],
                                   atol=1e-4, rtol=0)
        values, stamps = inlet.pull_chunk(timeout=1.0)
        assert len(values) > 5 and values.shape[1] == 3 + 2 * 5
        assert set(values[:, 3].astype(int)) <= set(range(len(decoder.gallery)))
        status = service.status()
        n = len(raw.copy().crop(0, 12).times)
        chunk = round(CHUNK_S * raw.info["sfreq"])  # replay.chunk_size=auto: 10 ms of samples
        assert chunk == 12  # at the sample's 1200 Hz
        assert status["samples"] == n - n % chunk  # every replayed sample (whole chunks)
        assert status["dropped"] == 0 and status["gaps"] == 0
        assert status["latency_p50_ms"] is not None

        assert _wait(lambda: service.state in ("stale", "reconnecting"), timeout=10)
        player = replay(short_recording, name=name, markers=True, wait_s=20)  # back again
        assert _wait(lambda: service.state == "connected" and service.reconnects >= 1,
                     timeout=30), service.status()
    finally:
        service.stop()
        if not player.finished:
            player.stop()


def test_wrong_rate_stream_is_a_status_error(meg, short_recording, tmp_path):
    from neurorecon.serve.lsl import Hub, StreamService
    from neurorecon.serve.replay import replay
    from neurorecon.serve.settings import StreamSettings

    decoder, _, _, _, subject = meg
    raw = mne.io.read_raw_fif(short_recording, preload=True, verbose=False)
    path = tmp_path / "resampled_meg.fif"
    raw.crop(0, 4).resample(100.0, verbose=False).save(path, verbose=False)
    name = f"nr-rate-{time.time_ns() % 10**8}"
    player = replay(path, name=name, wait_s=10)
    service = StreamService({"meg": decoder}, StreamSettings(source=name, subject=subject),
                            Hub())
    service.start()
    try:
        assert _wait(lambda: service.state == "error", timeout=20), service.status()
        assert "100 Hz" in service.status()["error"]
    finally:
        service.stop()
        if not player.finished:
            player.stop()


def test_websocket_status_and_metrics(meg_run, meg, short_recording, tmp_path):
    """The app: WebSocket messages (key as query or subprotocol; a wrong key is refused),
    /v1/meg/status, /metrics, the decoder process killed and restarted (decoding resumes),
    a session switched and stopped over HTTP."""
    from neurorecon.serve.app import create_app
    from neurorecon.serve.replay import replay

    from .test_serve import make_service

    _, _, events, _, subject = meg
    name = f"nr-ws-{time.time_ns() % 10**8}"
    settings, alice, _ = make_service(meg_run[0] / "bundle", tmp_path, rate_limit_per_minute=10**6)
    settings = settings.model_copy(update={"stream": settings.stream.model_copy(update={
        "source": name, "subject": subject, "markers": f"{name}-markers", "hop": 0.2,
        "outlet": f"{name}-decoded"})})
    app = create_app(settings, start_workers=False)
    player = replay(short_recording, name=name, markers=True, wait_s=20, repeat=3)
    try:
        with TestClient(app) as client:
            h = {"X-API-Key": alice}
            with client.websocket_connect(f"/v1/meg/stream?key={alice}") as ws:
                first = ws.receive_json()
                got = [first] + [ws.receive_json() for _ in range(8)]
            for m in got:
                assert {"seq", "mode", "t_lsl", "latency_ms", "topk", "quality"} <= set(m)
                assert set(m["quality"]) >= {"gap", "nan_channels", "flat_channels",
                                             "saturated_channels", "warmup"}
            with client.websocket_connect("/v1/meg/stream",
                                          subprotocols=["neurorecon", alice]) as ws:
                assert ws.receive_json()["seq"] >= 1  # resumes from the latest message
            from starlette.websockets import WebSocketDisconnect

            with pytest.raises(WebSocketDisconnect), client.websocket_connect(
                    "/v1/meg/stream?key=nr_wrong") as ws:
                ws.receive_json()
            status = client.get("/v1/meg/status", headers=h).json()
            assert status["state"] == "connected" and status["samples"] > 0
            assert status["events_from"] == "markers"
            assert client.get("/v1/meg/status").status_code == 401
            text = client.get("/metrics").text
            assert 'neurorecon_stream_state{state="connected"} 1.0' in text
            assert "neurorecon_stream_samples_total" in text
            # the decoder is a process of the service's: killed, it is restarted and decodes
            streamer = app.state.service.streamer
            os.kill(streamer._proc.pid, signal.SIGKILL)
            assert _wait(lambda: client.get("/v1/meg/status", headers=h).json()[
                "process_restarts"] == 1)
            assert _wait(lambda: (lambda st: st["state"] == "connected" and st["messages"] > 0)(
                client.get("/v1/meg/status", headers=h).json()), timeout=40)
            with client.websocket_connect(f"/v1/meg/stream?key={alice}") as ws:
                seqs = [ws.receive_json()["seq"] for _ in range(3)]
            assert seqs == sorted(seqs) and seqs[-1] > seqs[0]
            assert "neurorecon_stream_process_restarts_total 1.0" in client.get("/metrics").text
            page = client.get(f"/live?key={alice}")
            assert page.status_code == 200 and "/v1/meg/stream" in page.text
            r = client.put("/v1/meg/session", headers=h,
                           json={"source": "nr-nowhere", "subject": subject})
            assert r.status_code == 200 and r.json()["source"] == "nr-nowhere"
            assert client.put("/v1/meg/session", headers=h, json={"source": "x"}
                              ).status_code == 422  # no subject
            r = client.delete("/v1/meg/session", headers=h)
            assert r.json()["state"] == "idle"
    finally:
        if not player.finished:
            player.stop()
