"""Prometheus metrics of the service, in a registry of its own (one per app)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .schemas import STATES
from .store import JobStore

JOB_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
WINDOW_S = 24 * 3600  # job durations and throughput over the last day


class _JobCollector:
    """Job gauges read from the job table at scrape time (the worker processes write it)."""

    def __init__(self, store: JobStore):
        self.store = store

    def collect(self):
        counts = self.store.counts()
        jobs = GaugeMetricFamily("neurorecon_jobs", "jobs by state", labels=["state"])
        for state in STATES:
            jobs.add_metric([state], counts[state])
        yield jobs
        yield GaugeMetricFamily("neurorecon_queue_depth", "jobs waiting for a worker",
                                value=counts["queued"])
        yield GaugeMetricFamily("neurorecon_workers_alive", "job workers seen in the last 5 s",
                                value=self.store.workers_alive(within_s=5.0))
        stats = self.store.finished_stats(since=time.time() - WINDOW_S)
        buckets = [(str(edge), sum(1 for s, _, _ in stats if s <= edge))
                   for edge in JOB_BUCKETS] + [("+Inf", len(stats))]
        total = sum(s for s, _, _ in stats)
        hist = HistogramMetricFamily("neurorecon_job_duration_seconds",
                                     "claim-to-result time of jobs succeeded in the last day")
        hist.add_metric([], buckets, total)
        yield hist
        images = sum(n for _, n, _ in stats)
        gen_s = sum(g for _, _, g in stats)
        yield CounterMetricFamily("neurorecon_images_generated", "reconstructions written by "
                                  "jobs succeeded in the last day", value=images)
        yield GaugeMetricFamily("neurorecon_images_per_second", "reconstruction throughput "
                                "of jobs succeeded in the last day (images / generation s)",
                                value=images / gen_s if gen_s > 0 else 0.0)


class _StreamCollector:
    """The streaming decoder's counters, read from its status at scrape time."""

    STATES = ("idle", "connecting", "connected", "stale", "reconnecting", "error")

    def __init__(self, streamer: Callable[[], Any]):
        self.streamer = streamer

    def collect(self):
        status = self.streamer().status()
        state = GaugeMetricFamily("neurorecon_stream_state", "streaming decoder state (1 for "
                                  "the current one)", labels=["state"])
        for name in self.STATES:
            state.add_metric([name], 1.0 if status["state"] == name else 0.0)
        yield state
        for key, help_ in (("samples", "input samples received"),
                           ("gaps", "gaps in the input timestamps (filter reset)"),
                           ("dropped", "input samples missing (from the timestamps)"),
                           ("messages", "decoded messages sent"),
                           ("reconnects", "reconnections to the source"),
                           ("client_drops", "messages slow WebSocket clients skipped"),
                           ("process_restarts", "decoder process restarts")):
            yield CounterMetricFamily(f"neurorecon_stream_{key}", help_,
                                      value=status.get(key) or 0)
        for q in ("p50", "p99"):
            value = status.get(f"latency_{q}_ms")
            yield GaugeMetricFamily(f"neurorecon_stream_latency_{q}_ms", f"decode latency "
                                    f"{q} (last sample in -> message out)",
                                    value=float("nan") if value is None else value)
        quality = status.get("quality") or {}
        yield GaugeMetricFamily("neurorecon_stream_masked_channels", "channels masked in the "
                                "last window (NaN, flat, saturated)",
                                value=sum(quality.get(k, 0) for k in (
                                    "nan_channels", "flat_channels", "saturated_channels")))


class Metrics:
    def __init__(self, store: JobStore, *, streamer: Callable[[], Any] | None = None):
        self.registry = CollectorRegistry()
        self.latency = Histogram("neurorecon_http_request_duration_seconds",
                                 "HTTP request latency", ["method", "route", "status"],
                                 registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                                          2.5, 5, 10, 30))
        self.registry.register(_JobCollector(store))
        if streamer is not None:
            self.registry.register(_StreamCollector(streamer))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.latency.labels(method, route, str(status)).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
