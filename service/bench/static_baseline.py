"""The ceiling a user could script without a server: HF `generate` over static batches of C requests.

Each batch stacks its rows' task prefixes into one fresh `DynamicCache` (every task's prefix has the same V in the
bench), left-pads the prompts, and gives `generate` the full mask [prefix | prompt]; transformers derives positions
from the mask, so real tokens sit at V, V+1, ... as PEFT places them. The batch runs to the longest request's length.
No queueing, no admission, no streaming to anyone: the best case for a closed batch of the same work.

Encoder-decoder models: the prompts go to the encoder (right-padded), the stacked prefixes into the self-attention
half of an `EncoderDecoderCache` with an empty cross-attention half, as PEFT builds it.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache, EncoderDecoderCache

from service.bench.run import RequestTiming, RunResult, TokenClock
from service.bench.workload import WorkItem
from service.prefix import TaskPrefix
from service.runner import ModelRunner


@torch.inference_mode()
def _generate_batch(
    runner: ModelRunner, items: list[WorkItem], prefixes: dict[str, TaskPrefix] | None, clock: TokenClock
) -> int:
    """Run one static batch; returns the KV bytes its cache held at the end (its peak: the cache only grows)."""
    if runner.is_encoder_decoder:
        return _generate_seq2seq_batch(runner, items, prefixes, clock)
    device = runner.device
    lengths = [len(item.prompt_ids) for item in items]
    width = max(lengths)
    input_ids = torch.full((len(items), width), runner.pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, item in enumerate(items):
        input_ids[i, width - lengths[i] :] = torch.tensor(item.prompt_ids)
        prompt_mask[i, width - lengths[i] :] = 1
    cache = DynamicCache()
    mask = prompt_mask
    if prefixes is not None:
        kv = torch.stack([prefixes[item.task_id].kv for item in items])  # (B, L, 2, H, V, D); one V in the bench
        kv = kv.to(device=device, dtype=runner.dtype)
        cache = DynamicCache([(kv[:, layer, 0], kv[:, layer, 1]) for layer in range(kv.shape[1])])
        mask = torch.cat([torch.ones((len(items), kv.shape[4]), dtype=torch.long), prompt_mask], dim=1)
    new_tokens = max(item.max_new_tokens for item in items)
    runner.model.generate(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=runner.pad_token_id,
        streamer=clock,
        **{runner.cache_arg: cache},
    )
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _generate_seq2seq_batch(
    runner: ModelRunner, items: list[WorkItem], prefixes: dict[str, TaskPrefix] | None, clock: TokenClock
) -> int:
    lengths = [len(item.prompt_ids) for item in items]
    input_ids = torch.full((len(items), max(lengths)), runner.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, item in enumerate(items):
        input_ids[i, : lengths[i]] = torch.tensor(item.prompt_ids)
        mask[i, : lengths[i]] = 1
    self_cache = DynamicCache()
    if prefixes is not None:
        kv = torch.stack([prefixes[item.task_id].kv for item in items]).to(device=runner.device, dtype=runner.dtype)
        self_cache = DynamicCache([(kv[:, layer, 0], kv[:, layer, 1]) for layer in range(kv.shape[1])])
    cache = EncoderDecoderCache(self_cache, DynamicCache())
    new_tokens = max(item.max_new_tokens for item in items)
    runner.model.generate(
        input_ids=input_ids.to(runner.device),
        attention_mask=mask.to(runner.device),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=clock,
        cache=cache,
    )
    layers = [*cache.self_attention_cache.layers, *cache.cross_attention_cache.layers]
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))


def run_static_system(
    name: str,
    runner: ModelRunner,
    prefixes: dict[str, TaskPrefix] | None,
    workload: list[WorkItem],
    *,
    concurrency: int,
    warmup: list[WorkItem] | None = None,
) -> RunResult:
    """Batches of `concurrency` requests in workload order, one after another. A request's latency is its batch's
    time; it is credited only the tokens it asked for (rows generate to the batch's longest request)."""
    if warmup:
        _generate_batch(runner, warmup[:concurrency], prefixes, TokenClock())
    timings: list[RequestTiming] = []
    step_gaps: list[float] = []
    peak_kv = 0
    started = time.perf_counter()
    for first in range(0, len(workload), concurrency):
        items = workload[first : first + concurrency]
        clock = TokenClock()
        batch_start = time.perf_counter()
        peak_kv = max(peak_kv, _generate_batch(runner, items, prefixes, clock))
        end = time.perf_counter()
        token_times = clock.token_times
        gaps = [b - a for a, b in zip(token_times, token_times[1:])]
        step_gaps += gaps
        ttft = (token_times[0] if token_times else end) - batch_start
        for item in items:
            timings.append(RequestTiming(end - batch_start, ttft, item.max_new_tokens, gaps[: item.max_new_tokens - 1]))
    wall = time.perf_counter() - started
    return RunResult(
        name, concurrency, wall, timings, float(min(concurrency, len(workload))), step_gaps, peak_kv_bytes=peak_kv
    )
