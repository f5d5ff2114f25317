"""The ingress's side of the deployment, free of Ray: the `ServiceState` the unchanged routers run on, and the
deployment-wide /health and /metrics.

The ingress holds no weights: its `LoadedModel` has the real tokenizer and config (prompts are tokenised and limits
checked here, exactly as in the single-process server) and a model skeleton on the `meta` device. Its registry is the
shared store in shared mode: uploads are validated here against the model's geometry and committed under the store's
cross-process lock; every replica reads the same folder.

Health and metrics of the whole deployment: replicas report their engine stats (`ReplicaCore.snapshot`) every
`ray_stats_interval_s` to a small stats deployment; the ingress polls it into a `DeploymentView`. /health answers
200 with one line per live replica, or 503 when none has reported lately. /metrics is the ingress's own registry (the
HTTP, token, upload and routing series) plus per-replica engine series labelled `replica` and deployment totals.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Annotated, Any, Iterator

import torch
from fastapi import APIRouter, Depends
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from service.api.app import make_registry
from service.api.keys import ApiKeys
from service.api.state import ServiceState, get_state
from service.engine import Engine
from service.errors import ServiceError
from service.inputs import InputProcessor
from service.metrics import Metrics
from service.model_loader import LoadedModel, resolve_model_source, wrap_model
from service.registry import PrefixRegistry
from service.settings import Settings

logger = logging.getLogger(__name__)


class DeploymentUnavailableError(ServiceError):
    status_code = 503
    code = "unavailable"


def ingress_model(settings: Settings, replica_dtype: torch.dtype) -> LoadedModel:
    """Tokenizer and config of the served model, weights on the meta device (no memory). `replica_dtype` is what the
    replicas compute in; the ingress validates uploads against it."""
    model_dir, gguf_file, name = resolve_model_source(settings)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
    config = AutoConfig.from_pretrained(str(model_dir), **kwargs)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    loaded = wrap_model(skeleton, tokenizer, name)
    loaded.dtype = replica_dtype
    return loaded


def replica_dtype(settings: Settings, gpus_per_replica: float) -> torch.dtype:
    """The dtype replicas resolve for `settings.dtype` ("auto": float32 on CPU, bfloat16 on GPUs)."""
    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)
    return torch.bfloat16 if gpus_per_replica > 0 else torch.float32


def ingress_registry(settings: Settings, loaded: LoadedModel, metrics: Metrics) -> PrefixRegistry:
    registry = make_registry(settings, loaded, metrics, shared=True, device=torch.device("cpu"))
    registry.load_all()
    return registry


def ingress_state(
    settings: Settings, loaded: LoadedModel, registry: PrefixRegistry, engine: Engine, metrics: Metrics
) -> ServiceState:
    """The state the unchanged routers run on: the same `InputProcessor` as the single-process server (size checks,
    templates, tokenization and limits here), a remote engine."""
    metrics.bind_tasks(lambda name: name in registry or name == loaded.name)
    return ServiceState(
        settings=settings, model=loaded, registry=registry, engine=engine, metrics=metrics,
        api_keys=ApiKeys.from_settings(settings), inputs=InputProcessor(settings, loaded, registry),
    )


def build_ingress_state(
    settings: Settings, metrics: Metrics, engine: Engine, gpus_per_replica: float
) -> ServiceState:
    """Blocking: tokenizer, config and the store's records."""
    loaded = ingress_model(settings, replica_dtype(settings, gpus_per_replica))
    registry = ingress_registry(settings, loaded, metrics)
    return ingress_state(settings, loaded, registry, engine, metrics)


class DeploymentView:
    """The replicas' latest reports, as the ingress last polled them (every `poll_interval_s`)."""

    def __init__(self, stale_after_s: float, poll_interval_s: float = 1.0) -> None:
        self.stale_after_s = stale_after_s
        self.poll_interval_s = poll_interval_s
        self.reports: dict[str, dict[str, Any]] = {}
        self.polled_at: float | None = None

    def update(self, reports: dict[str, dict[str, Any]]) -> None:
        """Reports as polled; each has `age_s` (seconds since the board received it, on the board's clock)."""
        self.reports = dict(reports)
        self.polled_at = time.monotonic()

    def age(self, report: dict[str, Any]) -> float:
        since_poll = time.monotonic() - self.polled_at if self.polled_at is not None else 0.0
        return float(report.get("age_s", 0.0)) + since_poll

    def live(self) -> list[dict[str, Any]]:
        return sorted(
            (r for r in self.reports.values() if self.age(r) <= self.stale_after_s), key=lambda r: str(r["replica"])
        )

    def live_count(self) -> int:
        return len(self.live())

    def total(self, key: str) -> float:
        return float(sum(r.get(key, 0) for r in self.live()))


_REPLICA_GAUGES = {
    "running_rows": "Requests decoding now on the replica.",
    "waiting": "Requests waiting for admission on the replica.",
    "max_batch_rows_seen": "Largest batch the replica has run.",
}
_REPLICA_COUNTERS = {
    "steps": "Decode steps the replica ran.",
    "prefills": "Prefill passes the replica ran.",
    "rows_stepped": "Rows summed over the replica's forward passes (/ (steps + prefills) = mean batch size).",
    "finished": "Requests the replica retired (finished or cancelled).",
    "cancelled": "Requests the replica cancelled (client gone or deadline).",
    "accepted": "Requests the replica accepted.",
    "rejected": "Requests the replica refused before starting (full queue, unknown version...).",
    "prefix_loads": "Task versions the replica loaded from the shared store into its LRU.",
    "prefix_load_seconds": "Time the replica spent loading prefixes from the store.",
}


class ReplicaCollector:
    """Prometheus collector over a DeploymentView: per-replica engine series labelled `replica`."""

    def __init__(self, view: DeploymentView) -> None:
        self.view = view

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        live = self.view.live()
        replicas = GaugeMetricFamily("prefix_serve_replicas", "Model replicas that reported lately.")
        replicas.add_metric([], len(live))
        yield replicas
        for key, doc in _REPLICA_GAUGES.items():
            family = GaugeMetricFamily(f"prefix_serve_replica_{key}", doc, labels=["replica"])
            for report in live:
                family.add_metric([str(report["replica"])], float(report.get(key, 0)))
            yield family
        for key, doc in _REPLICA_COUNTERS.items():
            family = CounterMetricFamily(f"prefix_serve_replica_{key}", doc, labels=["replica"])
            for report in live:
                family.add_metric([str(report["replica"])], float(report.get(key, 0)))
            yield family
        prefix_bytes = GaugeMetricFamily(
            "prefix_serve_replica_prefix_bytes",
            "Bytes of prefixes the replica holds, by tier (slot layout: the bank is the one device copy, the loaded "
            "task versions are host copies).",
            labels=["replica", "tier"],
        )
        for report in live:
            for tier, nbytes in (report.get("prefix_bytes") or {}).items():
                prefix_bytes.add_metric([str(report["replica"]), str(tier)], float(nbytes))
        yield prefix_bytes


class RoutedRequests:
    """`prefix_serve_routed_requests_total{replica, task}`: requests each replica accepted, by task. The series of a
    replica go with it: once it is no longer live in the view (no report within `stale_after_s`, as for /health) and
    has accepted nothing for as long, they are dropped, so replicas that Ray replaced do not stay in /metrics forever.
    (Both conditions: a new replica can accept requests before the ingress has polled its first report.)"""

    def __init__(self, view: DeploymentView) -> None:
        self.view = view
        self._lock = threading.Lock()  # increments run on the event loop, scrapes on a worker thread
        self._counts: dict[str, dict[str, float]] = {}  # replica -> task -> requests accepted
        self._last_routed: dict[str, float] = {}  # replica -> monotonic time of its latest acceptance

    def inc(self, replica: str, task: str) -> None:
        with self._lock:
            tasks = self._counts.setdefault(replica, {})
            tasks[task] = tasks.get(task, 0.0) + 1.0
            self._last_routed[replica] = time.monotonic()

    def forget_gone(self) -> list[str]:
        """Drop the series of replicas that are gone; returns their ids."""
        live = {str(report["replica"]) for report in self.view.live()}
        now = time.monotonic()
        with self._lock:
            gone = [
                replica for replica in self._counts
                if replica not in live and now - self._last_routed.get(replica, now) > self.view.stale_after_s
            ]  # fmt: skip
            for replica in gone:
                del self._counts[replica]
                self._last_routed.pop(replica, None)
        if gone:
            logger.info("metrics: dropped the routed-request series of replicas no longer live: %s", gone)
        return gone

    def collect(self) -> Iterator[CounterMetricFamily]:
        self.forget_gone()
        family = CounterMetricFamily(
            "prefix_serve_routed_requests", "Requests accepted by a replica, by replica and task.",
            labels=["replica", "task"],
        )  # fmt: skip
        with self._lock:
            for replica, tasks in self._counts.items():
                for task, count in tasks.items():
                    family.add_metric([replica, task], count)
        yield family


def install_deployment_metrics(metrics: Metrics, view: DeploymentView) -> RoutedRequests:
    """Bind the deployment's gauges and register the replica series on the ingress's registry. Returns the routing
    counter (`prefix_serve_routed_requests{replica, task}`) the remote engine increments."""
    metrics.bind_gauges(lambda: view.total("waiting"), lambda: view.total("running_rows"))
    metrics.registry.register(ReplicaCollector(view))
    routed = RoutedRequests(view)
    metrics.registry.register(routed)
    return routed


# ---------------------------------------------------------------------------------------------------- /health


class ReplicaHealth(BaseModel):
    replica: str
    node: str
    device: str
    dtype: str
    running_rows: int
    waiting: int
    seconds_since_report: float
    start_seconds: float | None = Field(
        default=None, description="Seconds the replica took to load the model and pass its start-up checks."
    )


class DeploymentHealthResponse(BaseModel):
    status: str
    model: str
    device: str
    dtype: str
    prefixes: int
    replicas: int
    replica_details: list[ReplicaHealth]


def health_router(view: DeploymentView) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get(
        "/health",
        response_model=DeploymentHealthResponse,
        responses={503: {"description": "No model replica has reported lately"}},
    )
    def health(state: Annotated[ServiceState, Depends(get_state)]) -> DeploymentHealthResponse:
        live = view.live()
        if not live:
            # Replicas starting or replaced report within a poll interval: a retry can cure this.
            raise DeploymentUnavailableError(
                f"no model replica has reported in the last {view.stale_after_s:g} s", replicas=0,
                retry_after_s=max(1, math.ceil(view.poll_interval_s)),
            )
        return DeploymentHealthResponse(
            status="ok",
            model=state.model.name,
            device=str(live[0]["device"]),
            dtype=str(live[0]["dtype"]),
            prefixes=len(state.registry),
            replicas=len(live),
            replica_details=[
                ReplicaHealth(
                    replica=str(r["replica"]), node=str(r.get("node", "")), device=str(r["device"]),
                    dtype=str(r["dtype"]), running_rows=int(r.get("running_rows", 0)), waiting=int(r.get("waiting", 0)),
                    seconds_since_report=round(view.age(r), 3), start_seconds=r.get("start_seconds"),
                )
                for r in live
            ],
        )

    return router
