"""The `ray-N` bench systems: the same engine as `mixed`, N replicas of it on Ray Serve, driven through the same
remote engine the HTTP ingress uses (task@sha256 multiplexing, hot tasks spread). A private local Ray cluster is
started for the run and shut down after it.

HTTP is left out on purpose, as for the in-process systems: the difference to `mixed` is what Ray adds (the handle
hop, routing, one engine per replica) and what N replicas buy on this machine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from service.bench.run import RequestTiming, RunResult, closed_loop
from service.bench.workload import WorkItem
from service.engine import EngineLimits, FinalEvent, TokenEvent
from service.prefix import TaskPrefix
from service.requests import GenerationRequest, SamplingParams
from service.settings import Settings

logger = logging.getLogger(__name__)

RAY_SYSTEM = re.compile(r"^ray-(\d+)$")


def ray_replicas(system: str) -> int | None:
    """`ray-2` -> 2; None for other systems."""
    match = RAY_SYSTEM.fullmatch(system)
    return int(match.group(1)) if match else None


def run_ray_system(
    name: str,
    replicas: int,
    settings: Settings,
    prefixes: dict[str, TaskPrefix],
    workload: list[WorkItem],
    *,
    concurrency: int,
    warmup: list[WorkItem] | None = None,
) -> RunResult:
    """`settings` name the model, device, dtype and the prefix store holding `prefixes` (read by the replicas)."""
    import ray
    from ray import serve

    from service.scaleout.app import APP_NAME, build_application
    from service.scaleout.launch import absolute_paths

    per_replica_rows = max(1, -(-concurrency // replicas))
    settings = absolute_paths(settings).model_copy(update={
        "replicas": replicas, "max_running_rows": per_replica_rows, "max_prefill_rows": per_replica_rows,
        "max_kv_tokens": 1 << 30, "max_waiting": len(workload) + 64, "ray_stats_interval_s": 0.5,
    })
    temp_dir = Path(tempfile.mkdtemp(prefix="ps-bench-ray-", dir="/tmp"))  # short: Ray's socket paths are limited
    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, _temp_dir=str(temp_dir),
             logging_level=logging.WARNING)
    try:
        serve.start(logging_config={"log_level": "WARNING", "enable_access_log": False},
                    http_options={"host": "127.0.0.1", "port": 0})
        serve.run(build_application(settings), name=APP_NAME, route_prefix=None)
        logger.info("%s: %d replicas ready in %.1f s", name, replicas, time.perf_counter() - started)
        model = serve.get_deployment_handle("ModelReplica", app_name=APP_NAME)
        stats = serve.get_deployment_handle("StatsBoard", app_name=APP_NAME)
        return asyncio.run(_drive(name, model, stats, settings, prefixes, workload, concurrency, warmup))
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


async def _drive(
    name: str, model: Any, stats: Any, settings: Settings, prefixes: dict[str, TaskPrefix],
    workload: list[WorkItem], concurrency: int, warmup: list[WorkItem] | None,
) -> RunResult:
    from service.scaleout.app import handle_call
    from service.scaleout.remote_engine import RemoteEngine

    limits = EngineLimits(max_running_rows=concurrency, max_kv_tokens=1 << 30, max_waiting=len(workload) + 64)
    engine = RemoteEngine(
        handle_call(model), limits=limits, replicas=lambda: settings.replicas,
    )

    async def submit(item: WorkItem) -> RequestTiming:
        prefix = prefixes[item.task_id] if item.task_id is not None else None
        params = SamplingParams(max_new_tokens=item.max_new_tokens, ignore_eos=True)
        started = time.perf_counter()
        first: float | None = None
        tokens = 0
        async for event in engine.stream(GenerationRequest(item.prompt_ids, prefix, params), with_text=False):
            if isinstance(event, TokenEvent) and first is None:
                first = time.perf_counter()
            elif isinstance(event, FinalEvent):
                tokens = len(event.result.token_ids)
        end = time.perf_counter()
        return RequestTiming(end - started, (first or end) - started, tokens)

    async def passes() -> tuple[float, float]:
        await asyncio.sleep(settings.ray_stats_interval_s * 2)  # let every replica report
        reports = (await stats.snapshot.remote()).values()
        return (sum(r["steps"] + r["prefills"] for r in reports), sum(r["rows_stepped"] for r in reports))

    if warmup:
        await closed_loop(submit, warmup, concurrency)
    passes_before, rows_before = await passes()
    wall, timings = await closed_loop(submit, workload, concurrency)
    passes_after, rows_after = await passes()
    done = passes_after - passes_before
    return RunResult(name, concurrency, wall, timings, (rows_after - rows_before) / done if done else None)
