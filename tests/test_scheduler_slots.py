"""The slot layout's scheduler: the step schedule as a pure function of the rows (decode first, prompt chunks under
the token budget, long prompts split across steps), and admission by the KV memory the store and bank would hold."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from service.requests import FinishReason, GenerationRequest, SamplingParams
from service.rows import Row
from service.runner import ModelRunner
from service.sampler import RowSampler
from service.scheduling.base import Arrival
from service.scheduling.slot_schedule import SlotLimits, schedule_step
from service.scheduling.slots import SlotScheduler
from tests.helpers import WaitingRequest, random_task_prefix, tiny_llama, tiny_tokenizer

CPU = torch.device("cpu")


def row(prompt_tokens: int, *, slot: int, cached: int = 0, new: int = 8) -> Row:
    """A row as the scheduler sees it: `cached` of its own tokens in the store (prompt, then generated); it decodes
    once its whole prompt is cached."""
    request = GenerationRequest(list(range(3, 3 + prompt_tokens)), None, SamplingParams(max_new_tokens=new))
    return Row(request=request, sampler=RowSampler(request.params, CPU), slot=slot, cached=cached)


def never_arrives(timeout_s: float) -> Arrival:
    raise AssertionError("the slot scheduler never waits for arrivals")


def test_decoding_rows_go_first_one_token_each_and_prompt_chunks_take_the_rest_of_the_budget() -> None:
    decoding = [row(4, slot=2, cached=6), row(3, slot=0, cached=3)]
    prefilling = [row(10, slot=1), row(10, slot=3)]
    schedule = schedule_step(prefilling[:1] + decoding + prefilling[1:], SlotLimits(step_token_budget=8))
    assert [r.slot for r in schedule.decoding] == [0, 2], "decode tokens in slot order"
    assert [(r.slot, n) for r, n in schedule.chunks] == [(1, 6)], "8 - 2 decode tokens of the first prompt"
    assert schedule.num_tokens == 8 == schedule.token_budget


def test_chunks_follow_admission_order_until_the_budget_is_spent() -> None:
    rows = [row(1, slot=0, cached=1), row(3, slot=1), row(4, slot=2), row(9, slot=3)]
    schedule = schedule_step(rows, SlotLimits(step_token_budget=9))
    assert [(r.slot, n) for r, n in schedule.chunks] == [(1, 3), (2, 4), (3, 1)]
    assert schedule.num_tokens == 9


def test_a_long_prompt_is_split_across_steps_and_resumes_where_it_stopped() -> None:
    long = row(20, slot=0)
    decoding = row(2, slot=1, cached=2)
    limits = SlotLimits(step_token_budget=7)
    chunks = []
    while long.prefilling:
        schedule = schedule_step([decoding, long], limits)
        ((chunk_row, n),) = schedule.chunks
        chunks.append(n)
        long.cached += n  # what executing the step does
    assert chunks == [6, 6, 6, 2]


def test_with_no_row_decoding_the_idle_budget_applies() -> None:
    rows = [row(100, slot=0), row(100, slot=1)]
    assert schedule_step(rows, SlotLimits(step_token_budget=8)).num_tokens == 64, "None: 8 x the step budget"
    schedule = schedule_step(rows, SlotLimits(step_token_budget=8, idle_token_budget=150))
    assert [n for _, n in schedule.chunks] == [100, 50] and schedule.token_budget == 150


def test_prefill_advances_even_when_decoding_rows_fill_the_budget() -> None:
    rows = [row(2, slot=s, cached=2) for s in range(5)] + [row(6, slot=5)]
    schedule = schedule_step(rows, SlotLimits(step_token_budget=4))
    assert len(schedule.decoding) == 5, "no decoding row is left out"
    assert [n for _, n in schedule.chunks] == [1]


def test_finished_rows_are_not_scheduled_and_no_rows_is_an_empty_step() -> None:
    done = row(2, slot=0, cached=2)
    done.error = RuntimeError("non-finite")  # type: ignore[assignment]
    assert schedule_step([done], SlotLimits()).empty
    assert schedule_step([], SlotLimits()).empty


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(tiny_llama(seed=0, max_position_embeddings=256), tiny_tokenizer(128))


def test_admission_stops_at_the_kv_budget_in_arrival_order(runner: ModelRunner) -> None:
    """Each request reserves 4 + 3 + 5 = 12 columns of its slot (prefix, prompt, new tokens; the width rounds up to
    16): the store holds rows x width, slots grow by doubling (1, 2, 4)."""
    prefix = random_task_prefix(runner.model, "t", 4, seed=0)
    make = lambda prompt, new: WaitingRequest(GenerationRequest(prompt, prefix, SamplingParams(max_new_tokens=new)))
    items = [make([5, 6, 7], 5), make([8, 9, 10], 5), make([11, 12, 13], 5), make([14], 1)]
    waiting = deque(items)
    # 2 rows x 16 columns + the prefix's 4 bank columns = 36; a third row makes 4 x 16 + 4 = 68.
    scheduler: SlotScheduler[WaitingRequest] = SlotScheduler(runner, SlotLimits(num_slots=8, max_kv_tokens=50))
    assert scheduler.admit(waiting, never_arrives) == items[:2]
    assert [scheduler.owners[r] for r in scheduler.rows] == items[:2]
    assert list(waiting) == items[2:], "the third does not fit and the small fourth does not overtake it"
    first = scheduler.rows[0]
    first.finish_reason = FinishReason.LENGTH
    assert scheduler.retire([first]) == [items[0]]
    assert scheduler.admit(waiting, never_arrives) == [items[2]], "the freed slot takes the oldest request"


def test_admission_needs_a_free_slot(runner: ModelRunner) -> None:
    waiting = deque(WaitingRequest(GenerationRequest([5], None, SamplingParams(max_new_tokens=1))) for _ in range(3))
    scheduler: SlotScheduler[WaitingRequest] = SlotScheduler(runner, SlotLimits(num_slots=2, max_kv_tokens=1 << 16))
    assert len(scheduler.admit(waiting, never_arrives)) == 2 and len(waiting) == 1
    assert len(scheduler) == 2 and scheduler.memory_in_use() > 0
    assert len(scheduler.clear()) == 2 and len(scheduler) == 0
