"""The slot layout: rows reuse freed slots exactly, a task's prefix is held once in the bank and copied into each of
its running rows' slots, prefill is chunked and bounded."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from service import slots
from service.scheduling.slot_schedule import SlotLimits
from service.scheduling.slots import SlotScheduler, generate as slots_generate
from service.batch import DecodeBatch, generate as padded_generate
from service.engine import EngineLimits
from service.errors import DeadlineExceededError
from service.prefix import TaskPrefix
from service.requests import GenerationRequest, GenerationResult, SamplingParams
from service.runner import ModelRunner
from tests.helpers import make_engine, random_task_prefix, run_engine, slowed_forward, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    runner = ModelRunner(tiny_llama(seed=0, initializer_range=0.5, max_position_embeddings=512), tiny_tokenizer(128))
    assert slots.slot_layout_supported(runner)
    return runner


@pytest.fixture(scope="module")
def prefixes(runner: ModelRunner) -> dict[str, TaskPrefix]:
    return {t: random_task_prefix(runner.model, t, v, seed) for seed, (t, v) in enumerate({"a": 4, "b": 9, "c": 2}.items())}


def req(prefix: TaskPrefix | None, prompt: list[int], new: int) -> GenerationRequest:
    return GenerationRequest(prompt, prefix, SamplingParams(max_new_tokens=new))


def solo(runner: ModelRunner, request: GenerationRequest) -> list[int]:
    return padded_generate(runner, [GenerationRequest(request.prompt_ids, request.prefix, request.params)])[0].token_ids


def test_a_row_admitted_into_a_freed_slot_produces_its_solo_tokens(runner, prefixes) -> None:
    scheduler = SlotScheduler(runner, SlotLimits(num_slots=2, max_kv_tokens=4096, step_token_budget=16))
    batch = scheduler.batch
    short, long = req(prefixes["a"], [5, 6, 7], 2), req(prefixes["b"], [9, 10, 11, 12, 13, 14], 12)
    first, second = batch.add(short), batch.add(long)
    while not first.finished:
        scheduler.step()
    freed = first.slot
    batch.remove([first])
    late = req(prefixes["c"], [20, 21, 22, 23, 24], 7)
    third = batch.add(late)
    assert third.slot == freed, "the new row took the freed slot"
    while batch.rows:
        scheduler.step()
        batch.remove([r for r in batch.rows if r.finished])
    for row, request in ((first, short), (second, long), (third, late)):
        assert row.generated == solo(runner, request)


def test_two_hundred_requests_through_a_small_slot_pool_match_their_solo_results(runner, prefixes) -> None:
    rng = random.Random(3)
    tasks = [prefixes["a"], prefixes["b"], prefixes["c"], None]
    requests = [
        req(rng.choice(tasks), [rng.randrange(3, 128) for _ in range(rng.randint(1, 12))], rng.randint(1, 9))
        for _ in range(200)
    ]
    engine = make_engine(
        runner, limits=EngineLimits(max_running_rows=4, max_waiting=256, step_token_budget=8)
    )
    assert engine.layout == "slots"

    async def scenario() -> list[GenerationResult]:
        return await asyncio.gather(*(engine.generate(r) for r in requests))

    results = run_engine(engine, scenario)
    assert engine.stats.max_batch_rows_seen == 4, "the pool was full, so slots were reused"
    assert engine.stats.finished == 200 and engine.stats.running_rows == 0
    assert [r.token_ids for r in results] == [solo(runner, r) for r in requests]


def test_a_tasks_prefix_is_held_once_in_the_bank_and_copied_into_each_running_rows_slot(runner, prefixes) -> None:
    """Measured on the tensors the engine allocates: more rows of one task add no bank columns; each row's slot
    starts with the prefix's columns, then its own tokens (prompt + new)."""
    prefix = prefixes["b"]
    v = prefix.num_virtual_tokens
    scheduler = SlotScheduler(runner, SlotLimits(num_slots=8, max_kv_tokens=1 << 16, step_token_budget=64))
    batch = scheduler.batch
    rows = [batch.add(req(prefix, [5, 6, 7], 4))]
    scheduler.step()
    bank_bytes = batch.bank.keys.untyped_storage().nbytes() + batch.bank.values.untyped_storage().nbytes()
    rows += [batch.add(req(prefix, [8 + i, 9, 10], 4)) for i in range(7)]
    scheduler.step()
    assert len(batch.bank.entries) == 1 and batch.bank.referenced_tokens == v
    assert batch.bank.keys.untyped_storage().nbytes() + batch.bank.values.untyped_storage().nbytes() == bank_bytes
    assert batch.store.reserved[:8] == [v + 3 + 4] * 8, "a slot reserves its prefix's columns and its own tokens"
    entry = rows[0].bank_entry
    for row in rows:
        torch.testing.assert_close(batch.store.keys[:, row.slot, :, :v], batch.bank.keys[:, :, entry.offset : entry.offset + v])
        torch.testing.assert_close(
            batch.store.values[:, row.slot, :, :v], batch.bank.values[:, :, entry.offset : entry.offset + v]
        )


def test_a_freed_slot_is_zeroed_so_no_later_row_sees_a_stale_value_under_its_mask(runner, prefixes) -> None:
    """A huge key left by one request would score inf for the next row of that slot even where its mask hides the
    column, and sdpa turns inf under the mask into NaN: freeing a slot zeroes the columns its request wrote."""
    scheduler = SlotScheduler(runner, SlotLimits(num_slots=2, max_kv_tokens=1 << 16, step_token_budget=64))
    batch = scheduler.batch
    long = batch.add(req(prefixes["b"], [5, 6, 7, 8, 9], 6))
    while not long.finished:
        scheduler.step()
    written = long.request.num_virtual_tokens + long.cached
    assert batch.store.keys[:, long.slot, :, :written].abs().sum() > 0
    batch.store.keys[:, long.slot, :, written - 1] = 3e38  # as if that request's last key had been huge
    batch.remove([long])
    assert batch.store.keys[:, 0].abs().sum() == 0 and batch.store.values[:, 0].abs().sum() == 0
    short_request = req(prefixes["c"], [3], 4)
    short = batch.add(short_request)
    assert short.slot == 0, "the freed slot is reused"
    while not short.finished:
        scheduler.step()
    assert short.error is None and short.generated == solo(runner, short_request)


def test_released_prefixes_are_reused_and_evicted_only_when_idle(runner, prefixes) -> None:
    scheduler = SlotScheduler(runner, SlotLimits(num_slots=4, max_kv_tokens=1 << 16))
    batch = scheduler.batch
    row = batch.add(req(prefixes["a"], [5], 1))
    entry = row.bank_entry
    scheduler.step()
    batch.remove([row])
    assert entry.refs == 0 and ("a", prefixes["a"].sha256) in batch.bank.entries, "kept cached while idle"
    again = batch.add(req(prefixes["a"], [6], 1))
    assert again.bank_entry is entry, "an idle cached prefix is not written again"


def test_deadline_is_enforced_between_prefill_chunks(runner, prefixes) -> None:
    """A long prompt prefills in chunks; the deadline ends it between chunks, not after the whole prompt."""
    engine = make_engine(
        runner, limits=EngineLimits(request_timeout_s=0.3, step_token_budget=8, idle_token_budget=8)
    )
    started = time.monotonic()
    with slowed_forward(runner.model, 0.05), pytest.raises(DeadlineExceededError):  # 300 tokens / 8 = 38 steps ~ 1.9 s
        run_engine(engine, lambda: engine.generate(req(prefixes["a"], [5 + i % 100 for i in range(300)], 4)))
    assert time.monotonic() - started < 1.0, "the request was ended within a few chunks of its deadline"
    assert engine.stats.steps < 20


def test_queue_gauge_follows_cancelled_queued_requests(runner, prefixes) -> None:
    engine = make_engine(runner, limits=EngineLimits(max_running_rows=1))

    async def scenario() -> tuple[int, int]:
        running = asyncio.create_task(engine.generate(req(prefixes["a"], [5, 6], 300)))
        while engine.stats.running_rows < 1:
            await asyncio.sleep(0.001)
        queued = [asyncio.create_task(engine.generate(req(prefixes["b"], [7], 3))) for _ in range(3)]
        await asyncio.sleep(0.05)
        before = engine.queue_size
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        for _ in range(200):
            if engine.queue_size == 0:
                break
            await asyncio.sleep(0.005)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        return before, engine.queue_size

    with slowed_forward(runner.model, 0.005):  # the long request outlives the test
        before, after = run_engine(engine, scenario)
    assert before == 3 and after == 0


def test_a_bfloat16_model_takes_the_slot_layout() -> None:
    """The start-up check compares the layouts with a tolerance fit for the dtype (and prefixes of a realistic
    scale), so half-precision models are not pushed to the padded fallback by rounding alone."""
    model = tiny_llama(seed=1, max_position_embeddings=128).to(torch.bfloat16)
    runner = ModelRunner(model, tiny_tokenizer(128))
    assert slots.slot_layout_supported(runner)
    prefix = random_task_prefix(model, "t", 4, seed=0)
    requests = [req(prefix, [5, 6, 7, 8], 6), req(None, [9, 10], 6)]
    assert [r.token_ids for r in slots_generate(runner, requests)] == [solo(runner, r) for r in requests]


def test_each_decoding_row_reads_just_its_own_slot_whatever_the_bank_holds(runner, prefixes) -> None:
    """With many tasks the bank holds idle prefixes, and a step's rows use many different ones: a decode step reads
    each row's slot up to the longest row's prefix + tokens (a row's cost does not grow with the bank nor with the
    step's other tasks), and every row still gets its solo tokens."""
    scheduler = SlotScheduler(runner, SlotLimits(num_slots=4, max_kv_tokens=4096, step_token_budget=64))
    batch = scheduler.batch
    first = req(prefixes["a"], [5, 6, 7], 6)
    rows = [batch.add(first)]
    idle_row = batch.add(req(prefixes["b"], [3], 1))  # bank: a, b, c; b's only row ends at once, b idles there
    scheduler.step()
    batch.remove([idle_row])
    rows.append(batch.add(req(prefixes["c"], [9, 10], 6)))
    scheduler.step()
    scheduler.step()  # a decode step over a and c
    plan = batch.last_plan
    assert plan.num_decode == 2 and batch.bank.holds("b", prefixes["b"].sha256)
    ends = [r.request.num_virtual_tokens + r.cached for r in rows]  # cached already counts this step's token
    assert plan.decode_width == max(ends)
    assert plan.decode_visible[:, 0, 0].sum(dim=1).tolist() == ends, "each row sees its prefix and tokens so far"
    while batch.rows:
        scheduler.step()
        batch.remove([r for r in batch.rows if r.finished])
    assert rows[0].generated == solo(runner, first)
    assert rows[1].generated == solo(runner, req(prefixes["c"], [9, 10], 6))
