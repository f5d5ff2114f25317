"""Prometheus metrics (prometheus-client), one registry per app so several apps can live in one process (tests)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE  # noqa: F401 - re-exported

from service.requests import GenerationResult

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "prefix_serve_requests", "HTTP requests by route, task and status.", ["route", "task", "status"], registry=r
        )
        self.request_duration = Histogram(
            "prefix_serve_request_duration_seconds", "HTTP request duration (streams: until the last event).",
            ["route", "task", "status"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_duration = Histogram(
            "prefix_serve_queue_duration_seconds", "Time from acceptance to admission into a batch.", ["task"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.time_to_first_token = Histogram(
            "prefix_serve_time_to_first_token_seconds", "Time from acceptance to the first generated token.",
            ["task"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.generated_tokens = Counter(
            "prefix_serve_generated_tokens", "Generated tokens.", ["task", "finish_reason"], registry=r
        )
        self.batch_size = Histogram(
            "prefix_serve_batch_size", "Rows in each forward pass (prefill or decode step).",
            buckets=_BATCH_BUCKETS, registry=r,
        )
        self.step_duration = Histogram(
            "prefix_serve_step_duration_seconds", "Duration of each forward pass of the engine.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_size = Gauge("prefix_serve_queue_size", "Requests waiting for admission.", registry=r)
        self.running_rows = Gauge("prefix_serve_running_rows", "Requests decoding now.", registry=r)
        self.prefix_cache_hits = Counter(
            "prefix_serve_prefix_cache_hits", "Prefix lookups served from device memory.", registry=r
        )
        self.prefix_cache_misses = Counter(
            "prefix_serve_prefix_cache_misses", "Prefix lookups that had to load from host memory or disk.",
            ["source"], registry=r,
        )
        self.prefix_cache_evictions = Counter(
            "prefix_serve_prefix_cache_evictions", "Prefixes moved down a tier.", ["to"], registry=r
        )
        self.prefix_bytes = Gauge("prefix_serve_prefix_bytes", "Bytes of prefix KV held per tier.", ["tier"], registry=r)
        self.prefixes = Gauge("prefix_serve_prefixes", "Stored prefixes per tier.", ["tier"], registry=r)
        self.kv_bytes = Gauge(
            "prefix_serve_kv_bytes", "KV memory the engine holds now (slot store + prefix bank, padding included).",
            registry=r,
        )
        self.prefix_bank_bytes = Gauge(
            "prefix_serve_prefix_bank_bytes", "Of which the prefix bank: each running task's prefix, stored once.",
            registry=r,
        )
        self.uploads = Counter("prefix_serve_uploads", "Prefix uploads by result.", ["result"], registry=r)

    def bind_gauges(self, queue_size: Callable[[], float], running_rows: Callable[[], float]) -> None:
        """Gauges read live values at scrape time instead of being pushed."""
        self.queue_size.set_function(queue_size)
        self.running_rows.set_function(running_rows)

    def observe_pass(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.step_duration.observe(seconds)

    def bind_kv_gauges(self, kv_bytes: Callable[[], float], prefix_bank_bytes: Callable[[], float]) -> None:
        self.kv_bytes.set_function(kv_bytes)
        self.prefix_bank_bytes.set_function(prefix_bank_bytes)

    def observe_generation(self, task: str, result: GenerationResult) -> None:
        self.queue_duration.labels(task).observe(result.queue_s)
        self.time_to_first_token.labels(task).observe(result.ttft_s)
        self.generated_tokens.labels(task, result.finish_reason.value).inc(len(result.token_ids))

    def render(self) -> bytes:
        return generate_latest(self.registry)
