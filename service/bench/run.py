"""Closed-loop load: C clients, each sending its next request as soon as the previous one is answered."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable

from peft import PeftModel
from transformers.generation.streamers import BaseStreamer

from service.batch import ModelRunner
from service.bench.peft_baseline import peft_generate
from service.bench.workload import WorkItem
from service.engine import ContinuousBatchingEngine, EngineLimits, FinalEvent, TokenEvent
from service.prefix import TaskPrefix
from service.requests import GenerationRequest, SamplingParams


@dataclass
class RequestTiming:
    latency_s: float  # submit -> last token, queueing included
    ttft_s: float  # submit -> first token
    generated_tokens: int


@dataclass
class RunResult:
    system: str
    concurrency: int
    wall_s: float
    timings: list[RequestTiming] = field(repr=False)
    mean_batch_rows: float | None = None

    def summary(self) -> dict[str, Any]:
        tokens = sum(t.generated_tokens for t in self.timings)
        latencies = [t.latency_s for t in self.timings]
        ttfts = [t.ttft_s for t in self.timings]
        return {
            "system": self.system,
            "concurrency": self.concurrency,
            "requests": len(self.timings),
            "generated_tokens": tokens,
            "wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(tokens / self.wall_s, 2),
            "requests_per_s": round(len(self.timings) / self.wall_s, 3),
            "latency_p50_s": round(_percentile(latencies, 50), 3),
            "latency_p95_s": round(_percentile(latencies, 95), 3),
            "ttft_p50_s": round(_percentile(ttfts, 50), 3),
            "ttft_p95_s": round(_percentile(ttfts, 95), 3),
            "mean_batch_rows": None if self.mean_batch_rows is None else round(self.mean_batch_rows, 2),
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "timings": [asdict(t) for t in self.timings]}


def _percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def closed_loop(
    submit: Callable[[WorkItem], Awaitable[RequestTiming]], workload: list[WorkItem], concurrency: int
) -> tuple[float, list[RequestTiming]]:
    pending = list(reversed(workload))
    timings: list[RequestTiming] = []

    async def client() -> None:
        while pending:
            timings.append(await submit(pending.pop()))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, len(workload)))))
    return time.perf_counter() - started, timings


def run_engine_system(
    name: str,
    runner: ModelRunner,
    prefixes: dict[str, TaskPrefix],
    workload: list[WorkItem],
    *,
    concurrency: int,
    policy: str,
    use_prefix: bool = True,
    warmup: list[WorkItem] | None = None,
) -> RunResult:
    limits = EngineLimits(
        max_running_rows=max(concurrency, 1), max_kv_tokens=1 << 30, max_waiting=len(workload) + 64,
        max_prefill_rows=max(concurrency, 1),
    )
    engine = ContinuousBatchingEngine(runner, policy=policy, limits=limits)  # type: ignore[arg-type]

    async def submit(item: WorkItem) -> RequestTiming:
        prefix = prefixes[item.task_id] if use_prefix and item.task_id is not None else None
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

    async def main() -> RunResult:
        engine.start()
        try:
            if warmup:
                await closed_loop(submit, warmup, concurrency)
            stats = engine.stats
            passes_before, rows_before = stats.steps + stats.prefills, stats.rows_stepped
            wall, timings = await closed_loop(submit, workload, concurrency)
            passes = stats.steps + stats.prefills - passes_before
            mean_rows = (stats.rows_stepped - rows_before) / passes if passes else None
            return RunResult(name, concurrency, wall, timings, mean_rows)
        finally:
            engine.stop()

    return asyncio.run(main())


class _FirstTokenClock(BaseStreamer):
    """generate() calls put() once with the prompt, then once per new token."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_peft_system(
    name: str, peft_model: PeftModel, workload: list[WorkItem], *, concurrency: int, warmup: list[WorkItem] | None = None
) -> RunResult:
    """The seed's way: requests from C clients, served one at a time (set_adapter is global model state)."""
    model_lock = threading.Lock()

    def serve(item: WorkItem, clock: _FirstTokenClock) -> int:
        with model_lock:
            return len(peft_generate(peft_model, item.task_id, item.prompt_ids, item.max_new_tokens,
                                     ignore_eos=True, streamer=clock))

    async def submit(item: WorkItem) -> RequestTiming:
        clock = _FirstTokenClock()
        started = time.perf_counter()
        tokens = await asyncio.to_thread(serve, item, clock)
        end = time.perf_counter()
        return RequestTiming(end - started, (clock.first or end) - started, tokens)

    async def main() -> tuple[float, list[RequestTiming]]:
        if warmup:
            await closed_loop(submit, warmup, concurrency)
        return await closed_loop(submit, workload, concurrency)

    wall, timings = asyncio.run(main())
    return RunResult(name, concurrency, wall, timings, 1.0)
