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

from service.bench.peft_baseline import peft_generate
from service.bench.workload import WorkItem
from service.compute_thread import run_in_fresh_thread
from service.engine import ContinuousBatchingEngine, EngineLimits, FinalEvent, Layout, TokenEvent
from service.prefix import TaskPrefix
from service.requests import GenerationRequest, SamplingParams
from service.runner import ModelRunner
from service.startup import choose_layout


@dataclass
class RequestTiming:
    latency_s: float  # submit -> last token, queueing included
    ttft_s: float  # submit -> first token
    generated_tokens: int
    token_gaps_s: list[float] = field(default_factory=list)  # between consecutive tokens (inter-token latency)


@dataclass
class RunResult:
    system: str
    concurrency: int
    wall_s: float
    timings: list[RequestTiming] = field(repr=False)
    mean_batch_rows: float | None = None
    step_times: list[float] = field(default_factory=list, repr=False)  # forward-pass durations while busy
    peak_kv_bytes: int | None = None
    prefix_bank_bytes: int | None = None

    def summary(self) -> dict[str, Any]:
        tokens = sum(t.generated_tokens for t in self.timings)
        latencies = [t.latency_s for t in self.timings]
        ttfts = [t.ttft_s for t in self.timings]
        gaps = [g for t in self.timings for g in t.token_gaps_s]
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
            "itl_p50_s": round(_percentile(gaps, 50), 4) if gaps else None,
            "itl_p95_s": round(_percentile(gaps, 95), 4) if gaps else None,
            "step_p50_s": round(_percentile(self.step_times, 50), 4) if self.step_times else None,
            "mean_batch_rows": None if self.mean_batch_rows is None else round(self.mean_batch_rows, 2),
            "peak_kv_bytes": self.peak_kv_bytes,
            "prefix_bank_bytes": self.prefix_bank_bytes,
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
    step_token_budget: int = EngineLimits.step_token_budget,
    layout: Layout | None = None,
    fetch: Callable[[str], TaskPrefix] | None = None,
) -> RunResult:
    """`layout` None: the one the start-up check chooses for `policy` (run once per model; callers run
    `service.startup.check_model` first). `fetch`: look each request's prefix up there (e.g. `registry.get`, which
    may bring it back from host memory or disk), in a thread as the server's input stage does, instead of in
    `prefixes`; its time counts in the request's latency."""
    limits = EngineLimits(
        max_running_rows=max(concurrency, 1), max_kv_tokens=1 << 30, max_waiting=len(workload) + 64,
        max_prefill_rows=max(concurrency, 1), step_token_budget=step_token_budget,
    )
    layout = layout or choose_layout(runner, policy)  # type: ignore[arg-type]
    engine = ContinuousBatchingEngine(runner, policy=policy, limits=limits, layout=layout)  # type: ignore[arg-type]
    step_times: list[float] = []
    engine.on_pass = lambda rows, seconds: step_times.append(seconds)

    async def submit(item: WorkItem) -> RequestTiming:
        started = time.perf_counter()
        prefix = None
        if use_prefix and item.task_id is not None:
            prefix = await asyncio.to_thread(fetch, item.task_id) if fetch is not None else prefixes[item.task_id]
        params = SamplingParams(max_new_tokens=item.max_new_tokens, ignore_eos=True)
        token_times: list[float] = []
        tokens = 0
        async for event in engine.stream(GenerationRequest(item.prompt_ids, prefix, params), with_text=False):
            if isinstance(event, TokenEvent):
                token_times.append(time.perf_counter())
            elif isinstance(event, FinalEvent):
                tokens = len(event.result.token_ids)
        end = time.perf_counter()
        gaps = [b - a for a, b in zip(token_times, token_times[1:])]
        return RequestTiming(end - started, (token_times[0] if token_times else end) - started, tokens, gaps)

    async def main() -> RunResult:
        engine.start()
        try:
            if warmup:
                await closed_loop(submit, warmup, concurrency)
            stats = engine.stats
            passes_before, rows_before = stats.steps, stats.rows_stepped
            step_times.clear()
            stats.peak_kv_bytes = 0
            wall, timings = await closed_loop(submit, workload, concurrency)
            passes = stats.steps - passes_before
            mean_rows = (stats.rows_stepped - rows_before) / passes if passes else None
            return RunResult(
                name, concurrency, wall, timings, mean_rows, list(step_times), stats.peak_kv_bytes,
                stats.prefix_bank_bytes or None,
            )
        finally:
            engine.stop()

    return asyncio.run(main())


class TokenClock(BaseStreamer):
    """Times of a `generate` call's tokens: put() comes once with the prompt, then once per generated token (for the
    whole batch)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def token_times(self) -> list[float]:
        return self.times[1:]


def run_peft_system(
    name: str, peft_model: PeftModel, workload: list[WorkItem], *, concurrency: int, warmup: list[WorkItem] | None = None
) -> RunResult:
    """The seed's way: requests from C clients, served one at a time (set_adapter is global model state)."""
    model_lock = threading.Lock()

    def serve(item: WorkItem, clock: TokenClock) -> int:
        with model_lock:
            return len(peft_generate(peft_model, item.task_id, item.prompt_ids, item.max_new_tokens,
                                     ignore_eos=True, streamer=clock))

    async def submit(item: WorkItem) -> RequestTiming:
        clock = TokenClock()
        started = time.perf_counter()
        tokens = await asyncio.to_thread(run_in_fresh_thread, serve, item, clock)  # see service.compute_thread
        end = time.perf_counter()
        first = clock.token_times[0] if clock.token_times else end
        return RequestTiming(end - started, first - started, tokens)

    async def main() -> tuple[float, list[RequestTiming]]:
        if warmup:
            await closed_loop(submit, warmup, concurrency)
        return await closed_loop(submit, workload, concurrency)

    wall, timings = asyncio.run(main())
    return RunResult(name, concurrency, wall, timings, 1.0)
