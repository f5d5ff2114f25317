"""The Ray Serve application: an HTTP ingress, N model replicas and a stats board.

    Ingress (FastAPI, num_cpus=0)  --handle: task@sha256 multiplexed, streaming-->  ModelReplica x N (engine each)
        |                                                                               |
        +--------- polls ------------------>  StatsBoard (num_cpus=0)  <---- reports ---+

Run it with `prefix-serve serve --replicas N`, or yourself: `serve run service.scaleout.app:app` (settings from the
PREFIX_SERVE_* environment) or `serve deploy deploy/ray/serve-config.yaml` (builder `service.scaleout.app:build`,
settings as `args`).

No `from __future__ import annotations` here: Serve imports and pickles these classes, and FastAPI must see real
annotations (the routes themselves live in service.api and are unaffected).
"""

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Callable, Dict, Optional

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from service.api.app import create_app
from service.api.state import ServiceState
from service.engine import EngineLimits, TokenEvent
from service.metrics import Metrics
from service.scaleout.ingress import DeploymentView, build_ingress_state, health_router, install_deployment_metrics
from service.scaleout.protocol import RemoteRequest, StreamError, StreamStart, replica_unavailable
from service.scaleout.remote_engine import RemoteEngine
from service.scaleout.replica import ReplicaCore
from service.scaleout.router import TaskAffinityRouter
from service.settings import Settings

logger = logging.getLogger(__name__)

APP_NAME = "prefix-serve"
STALE_REPORTS = 3  # a replica that missed this many report intervals (plus 5 s) no longer counts as live


def _replica_id() -> str:
    context = serve.get_replica_context()
    return str(getattr(context.replica_id, "unique_id", context.replica_id))


def gpus_per_replica(settings: Settings) -> float:
    """The setting, else 1 when the Ray cluster (or, outside one, this machine) has GPUs, else 0."""
    if settings.ray_gpus_per_replica is not None:
        return settings.ray_gpus_per_replica
    import ray

    if ray.is_initialized():  # a CPU-only head node deploying onto GPU workers must still ask for GPUs
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
class StatsBoard:
    """The replicas' latest engine stats; replicas push, ingresses poll."""

    def __init__(self) -> None:
        self._reports: Dict[str, Dict[str, Any]] = {}

    def report(self, snapshot: Dict[str, Any]) -> None:
        # Stamped with the board's clock: replicas on other nodes may have skewed clocks.
        self._reports[str(snapshot["replica"])] = {**snapshot, "received_at": time.monotonic()}

    def snapshot(self) -> Dict[str, Dict[str, Any]]:
        """Each replica's latest report, with `age_s`: seconds since it arrived."""
        now = time.monotonic()
        self._reports = {k: v for k, v in self._reports.items() if now - v["received_at"] < 600}  # gone 10 min: forget
        return {k: {**v, "age_s": now - v["received_at"]} for k, v in self._reports.items()}


@serve.deployment
class ModelReplica:
    """Today's engine on this replica's device(s); prefixes by task version from the shared store, LRU per replica."""

    async def __init__(self, settings: Settings, stats: DeploymentHandle) -> None:
        self._settings = settings
        self._stats = stats
        self.core = await asyncio.to_thread(ReplicaCore, settings, _replica_id())
        core = self.core

        async def load_task_version(model_id: str) -> Any:
            return await asyncio.to_thread(core.load_prefix, model_id)

        # Serve's multiplexed LRU: loaded ids are reported to the routers, which prefer replicas holding an id.
        self._cached = serve.multiplexed(max_num_models_per_replica=settings.ray_prefixes_per_replica)(
            load_task_version
        )
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    async def _report_forever(self) -> None:
        while True:
            try:
                await self._stats.report.remote(self.core.snapshot())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the board restarting must not take the replica down
                logger.warning("replica %s: stats report failed: %s", self.core.replica_id, exc)
            await asyncio.sleep(self._settings.ray_stats_interval_s)

    async def stream(self, request: RemoteRequest) -> AsyncIterator[Any]:
        async for item in self.core.stream(request, self._cached):
            yield item

    async def generate(self, request: RemoteRequest) -> list:
        """The whole answer at once (non-streaming routes): [StreamStart, FinalEvent] or [StreamStart(error)]."""
        items: list = []
        stream = self.core.stream(request, self._cached)
        try:
            async for item in stream:
                if not isinstance(item, TokenEvent):  # tokens stay here; the result carries them all
                    items.append(item)
        finally:
            await stream.aclose()
        return items

    def check_health(self) -> None:
        if self.core.engine._thread is None or not self.core.engine._thread.is_alive():
            raise RuntimeError("the engine's worker thread is not running")

    def __del__(self) -> None:
        core = getattr(self, "core", None)
        if core is not None:
            core.stop()


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP API: the single-process server's app, with a remote engine and deployment-wide health/metrics."""

    def __init__(self, settings: Settings, model: DeploymentHandle, stats: DeploymentHandle) -> None:
        self._settings = settings
        self._model = model
        self._stats = stats
        self._view = DeploymentView(
            stale_after_s=STALE_REPORTS * settings.ray_stats_interval_s + 5.0,
            poll_interval_s=settings.ray_stats_interval_s,
        )

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self._settings, build=self._build_state, health_router=health_router(self._view))

    async def _build_state(self, settings: Settings, metrics: Metrics) -> ServiceState:
        routed = install_deployment_metrics(metrics, self._view)

        base_name: Dict[str, str] = {}  # the served model's name, once the state is built

        def on_routed(replica: str, task: Optional[str]) -> None:
            routed.inc(replica, task or base_name.get("name", ""))

        engine = RemoteEngine(  # every request carries its task version; TaskAffinityRouter balances
            handle_call(self._model),
            limits=EngineLimits.from_settings(settings),
            replicas=lambda: max(1, self._view.live_count(), settings.replicas),
            on_routed=on_routed,
        )
        state = await asyncio.to_thread(build_ingress_state, settings, metrics, engine, gpus_per_replica(settings))
        base_name["name"] = state.model.name
        await self._poll_once()
        engine.background.append(asyncio.get_running_loop().create_task(self._poll_forever()))
        return state

    async def _poll_once(self) -> None:
        try:
            self._view.update(await self._stats.snapshot.remote())
        except Exception as exc:  # noqa: BLE001 - health shows it as "no replica reported"
            logger.warning("ingress: polling replica stats failed: %s", exc)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.ray_stats_interval_s)
            await self._poll_once()


def handle_call(model: DeploymentHandle) -> Callable[..., AsyncIterator[Any]]:
    """The remote engine's `OpenCall` over the model deployment's handle."""

    async def call(request: RemoteRequest, multiplexed_model_id: Optional[str], stream: bool) -> AsyncIterator[Any]:
        options: Dict[str, Any] = {"stream": stream}
        if multiplexed_model_id:
            options["multiplexed_model_id"] = multiplexed_model_id
        handle = model.options(**options)
        if stream:
            responses = handle.stream.remote(request)
            started = False
            try:
                async for item in responses:
                    started = True
                    yield item
            except Exception as exc:  # noqa: BLE001 - e.g. the replica died: a status, not a pickled exception
                logger.exception("request %s to a replica failed", request.request_id or "-")
                status, body = replica_unavailable(exc)
                yield StreamError(status=status, body=body) if started else StreamStart(status, replica="", body=body)
            finally:
                responses.cancel()  # no-op once finished; on a disconnect it cancels the replica's generator
            return
        response = handle.generate.remote(request)
        try:
            items = await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. the replica died: a status, not a pickled exception
            logger.exception("request %s to a replica failed", request.request_id or "-")
            status, body = replica_unavailable(exc)
            yield StreamStart(status=status, replica="", body=body)
            return
        for item in items:
            yield item

    return call


def build(args: Optional[Dict[str, Any]] = None) -> Any:
    """Serve application builder: settings from the PREFIX_SERVE_* environment, overridden by `args` (the config
    file's `args:`)."""
    return build_application(Settings(**(args or {})))


def build_application(settings: Settings) -> Any:
    """The bound application for these settings; `replicas` 0 means 1 here."""
    replicas = max(1, settings.replicas)
    limits = EngineLimits.from_settings(settings)
    per_replica = limits.max_waiting + limits.max_running_rows
    stats = StatsBoard.bind()
    model = ModelReplica.options(
        num_replicas=replicas,
        # The engine's own queue bound decides 429s; Serve's default (5) would starve batching.
        max_ongoing_requests=per_replica,
        ray_actor_options={"num_cpus": settings.ray_cpus_per_replica, "num_gpus": gpus_per_replica(settings)},
        health_check_period_s=10,
        health_check_timeout_s=60,
        request_router_config=RequestRouterConfig(
            request_router_class=TaskAffinityRouter,
            request_router_kwargs={"imbalance": settings.ray_affinity_imbalance},
        ),
    ).bind(settings, stats)
    return Ingress.options(
        num_replicas=settings.ray_ingress_replicas,
        max_ongoing_requests=max(100, replicas * per_replica + 64),
        ray_actor_options={"num_cpus": 0},
    ).bind(settings, model, stats)


def __getattr__(name: str) -> Any:
    """`serve run service.scaleout.app:app` builds the application from the environment, on first access."""
    if name == "app":
        return build()
    raise AttributeError(name)
