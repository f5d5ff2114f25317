"""Prometheus metrics (prometheus-client), one registry per app so several apps can live in one process (tests).

Per-task series are bounded: a task id gets its own label value only while it is stored (a deleted task's series are
removed with it) and only for the first `max_tasks` tasks seen; the rest are counted under `task="_other"` (task ids
cannot start with "_", so it never collides with one). Requests for unknown or deleted tasks count under `task=""`.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE  # noqa: F401 - re-exported

from service.requests import GenerationResult

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


OTHER_TASKS = "_other"
NO_TASK = ""


class Metrics:
    def __init__(self, max_tasks: int = 100) -> None:
        self.max_tasks = max_tasks
        self._lock = threading.Lock()  # label admission, recording and removal are one step each
        self._series: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}  # task -> its (metric, label values)
        self._is_task: Callable[[str], bool] = lambda task: True
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
        self.generation_errors = Counter(
            "prefix_serve_generation_errors",
            "Requests the engine answered with an error of their own (e.g. non_finite_logits), by kind.", ["kind"],
            registry=r,
        )

    def bind_gauges(self, queue_size: Callable[[], float], running_rows: Callable[[], float]) -> None:
        """Gauges read live values at scrape time instead of being pushed."""
        self.queue_size.set_function(queue_size)
        self.running_rows.set_function(running_rows)

    def observe_pass(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.step_duration.observe(seconds)

    def observe_generation_error(self, kind: str) -> None:
        self.generation_errors.labels(kind).inc()

    def bind_kv_gauges(self, kv_bytes: Callable[[], float], prefix_bank_bytes: Callable[[], float]) -> None:
        self.kv_bytes.set_function(kv_bytes)
        self.prefix_bank_bytes.set_function(prefix_bank_bytes)

    def bind_tasks(self, is_task: Callable[[str], bool]) -> None:
        """`is_task(name)`: whether `name` is served now (a stored task, or the base model on the OpenAI routes)."""
        self._is_task = is_task

    def observe_request(self, route: str, task: str, status: str, duration_s: float) -> None:
        with self._lock:
            label = self._task_label(task)
            self._track(label, self.requests, (route, label, status)).inc()
            self._track(label, self.request_duration, (route, label, status)).observe(duration_s)

    def observe_generation(self, task: str, result: GenerationResult) -> None:
        with self._lock:
            label = self._task_label(task)
            self._track(label, self.queue_duration, (label,)).observe(result.queue_s)
            self._track(label, self.time_to_first_token, (label,)).observe(result.ttft_s)
            finish = result.finish_reason.value
            self._track(label, self.generated_tokens, (label, finish)).inc(len(result.token_ids))

    def forget_task(self, task: str) -> None:
        """Remove every series labelled with `task` (called when the task is deleted)."""
        with self._lock:
            for metric, labels in self._series.pop(task, set()):
                try:
                    metric.remove(*labels)
                except KeyError:  # already gone
                    pass

    def _task_label(self, task: str) -> str:
        """Caller holds the lock."""
        if not task:
            return NO_TASK
        if task in self._series:
            return task
        if not self._is_task(task):  # deleted while its request ran: do not resurrect its series
            return NO_TASK
        if len(self._series) >= self.max_tasks:
            return OTHER_TASKS
        self._series[task] = set()
        return task

    def _track(self, label: str, metric: Any, labels: tuple[str, ...]) -> Any:
        if label in self._series:
            self._series[label].add((metric, labels))
        return metric.labels(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)
