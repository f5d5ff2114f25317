"""The padded layout's scheduler: mixed and per-task admission (FIFO under the row and KV limits, the per-task window),
prefill as its own step, and retirement freeing rows."""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

import pytest

from service.engine import EngineLimits
from service.prefix import TaskPrefix
from service.requests import FinishReason, GenerationRequest, SamplingParams
from service.runner import ModelRunner
from service.scheduling.base import Arrival
from service.scheduling.padded import PaddedLimits, PaddedScheduler
from tests.helpers import WaitingRequest, random_task_prefix, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(tiny_llama(seed=0, max_position_embeddings=256), tiny_tokenizer(128))


@pytest.fixture(scope="module")
def prefixes(runner: ModelRunner) -> dict[str, TaskPrefix]:
    return {t: random_task_prefix(runner.model, t, v, seed) for seed, (t, v) in enumerate({"a": 4, "b": 2}.items())}


def item(prefix: TaskPrefix | None, prompt: list[int], new: int = 4, arrived: float = 0.0) -> WaitingRequest:
    return WaitingRequest(GenerationRequest(prompt, prefix, SamplingParams(max_new_tokens=new)), enqueued_at=arrived)


def limits(**changes: float) -> PaddedLimits:
    return EngineLimits(**changes).padded_limits()  # type: ignore[arg-type]


def never_arrives(timeout_s: float) -> Arrival:
    raise AssertionError("no wait expected")


def test_mixed_admission_takes_any_task_in_arrival_order_up_to_the_prefill_rows(runner, prefixes) -> None:
    items = [item(prefixes["a"], [5]), item(prefixes["b"], [6]), item(None, [7]), item(prefixes["a"], [8])]
    waiting = deque(items)
    scheduler: PaddedScheduler[WaitingRequest] = PaddedScheduler(runner, "mixed", limits(max_prefill_rows=3))
    assert scheduler.admit(waiting, never_arrives) == items[:3] and list(waiting) == items[3:]
    outcome = scheduler.step()
    assert outcome.prefilling and outcome.rows == 3 and outcome.started == items[:3]
    assert [scheduler.owners[r] for r in scheduler.rows] == items[:3]
    assert all(len(r.generated) == 1 for r in outcome.stepped), "the prefill picks each row's first token"
    assert scheduler.admit(waiting, never_arrives) == items[3:]
    assert scheduler.step().rows == 1 and len(scheduler) == 4, "the new rows join the running batch"
    decode = scheduler.step()
    assert not decode.prefilling and decode.rows == 4 and all(len(r.generated) == 2 for r in scheduler.rows[3:])


def test_admission_is_bounded_by_rows_and_kv_tokens_and_nothing_overtakes(runner, prefixes) -> None:
    # reserved KV tokens: prefix a (4) + prompt + new tokens
    big, small = item(prefixes["a"], [5, 6, 7], new=10), item(prefixes["a"], [8], new=1)  # 17, 6
    waiting = deque([item(prefixes["a"], [5], new=10), big, small])  # 15, 17, 6
    scheduler: PaddedScheduler[WaitingRequest] = PaddedScheduler(runner, "mixed", limits(max_kv_tokens=31))
    assert len(scheduler.admit(waiting, never_arrives)) == 1 and list(waiting) == [big, small]
    scheduler.step()
    assert scheduler.admit(waiting, never_arrives) == [], "the running row's 15 + 17 > 31, and the small one waits"
    row_limited: PaddedScheduler[WaitingRequest] = PaddedScheduler(runner, "mixed", limits(max_running_rows=2))
    assert len(row_limited.admit(deque([item(None, [5]) for _ in range(3)]), never_arrives)) == 2


def test_per_task_admission_waits_out_the_window_then_takes_only_the_oldest_task(runner, prefixes) -> None:
    now = time.monotonic()
    waiting = deque([item(prefixes["a"], [5], arrived=now), item(prefixes["b"], [6], arrived=now)])
    late = [item(prefixes["a"], [7]), item(prefixes["b"], [8])]
    waits: list[float] = []

    def arrivals(timeout_s: float) -> Arrival:
        waits.append(timeout_s)
        if late:
            waiting.append(late.pop(0))
            return Arrival.ARRIVED
        return Arrival.TIMED_OUT

    scheduler: PaddedScheduler[WaitingRequest] = PaddedScheduler(
        runner, "per-task", limits(max_running_rows=4, per_task_window_s=10.0)
    )
    first = list(waiting)[0]
    taken = scheduler.admit(waiting, arrivals)
    assert len(waits) == 3 and all(0 < w <= 10.0 for w in waits), "it waited for more arrivals within the window"
    assert [t.request.task_id for t in taken] == ["a", "a"] and taken[0] is first
    assert [w.request.task_id for w in waiting] == ["b", "b"]
    assert scheduler.step().batches_started == 1
    assert scheduler.admit(waiting, never_arrives) == [], "a per-task batch runs to completion before the next"


def test_per_task_admission_ends_when_the_batch_is_full_or_the_engine_stops(runner, prefixes) -> None:
    scheduler: PaddedScheduler[WaitingRequest] = PaddedScheduler(
        runner, "per-task", limits(max_running_rows=2, per_task_window_s=10.0)
    )
    full = deque([item(prefixes["a"], [5], arrived=time.monotonic()) for _ in range(2)])
    assert len(scheduler.admit(full, never_arrives)) == 2, "enough of the task to fill a batch: no wait"
    stopping = PaddedScheduler(runner, "per-task", limits(per_task_window_s=10.0))
    one = deque([item(prefixes["a"], [5], arrived=time.monotonic())])
    stop: Callable[[float], Arrival] = lambda timeout_s: Arrival.STOPPING
    assert stopping.admit(one, stop) == [] and len(one) == 1


def test_retire_frees_finished_rows_and_returns_their_owners(runner, prefixes) -> None:
    items = [item(prefixes["a"], [5, 6]), item(prefixes["b"], [7]), item(None, [8, 9, 10])]
    scheduler: PaddedScheduler[WaitingRequest] = PaddedScheduler(runner, "mixed", limits())
    scheduler.admit(deque(items), never_arrives)
    scheduler.step()
    full = scheduler.memory_in_use()
    first, second, third = scheduler.rows
    for row in (third, first):
        row.finish_reason = FinishReason.LENGTH
    assert scheduler.retire([first, third]) == [items[0], items[2]]
    assert scheduler.rows == [second] and 0 < scheduler.memory_in_use() < full
    scheduler.step()
    assert len(second.generated) == 2, "the remaining row decodes on"
    second.finish_reason = FinishReason.CANCELLED
    assert scheduler.retire([second]) == [items[1]]
    assert len(scheduler) == 0 and scheduler.memory_in_use() == 0 and scheduler.step().rows == 0


def test_a_failed_prefill_loses_only_the_rows_being_admitted(runner, prefixes) -> None:
    scheduler: PaddedScheduler[WaitingRequest] = PaddedScheduler(runner, "mixed", limits())
    running = item(prefixes["a"], [5], new=20)
    scheduler.admit(deque([running]), never_arrives)
    scheduler.step()
    broken = item(prefixes["b"], [6])
    scheduler.admit(deque([broken]), never_arrives)

    def fail(*_: object) -> None:
        raise RuntimeError("boom")

    hook = runner.model.register_forward_pre_hook(fail)
    try:
        outcome = scheduler.step()
    finally:
        hook.remove()
    assert outcome.failed == [broken] and isinstance(outcome.error, RuntimeError) and outcome.rows == 0
    assert list(scheduler.owners.values()) == [running]
    assert scheduler.step().rows == 1
