"""The slot layout's scheduler: admission by real memory, one `schedule_step` per forward, rows retired at once.

Admission asks what the store and the bank would hold after the request took a slot (slots x width + the bank's
prefix columns) against the KV budget; the step's schedule is `schedule_step` (decode first, then prompt chunks under
the token budget), executed by `service.slots.SlotBatch`.
"""

from __future__ import annotations

import time
from typing import Sequence

from service.requests import GenerationRequest, GenerationResult
from service.rows import Row
from service.runner import ModelRunner
from service.scheduling.base import BatchingPolicy, Scheduler, StepOutcome, W, WaitForArrival, Waiting
from service.scheduling.slot_schedule import SlotLimits, schedule_step
from service.slots import SlotBatch, slot_attention_installed, slot_layout_supported


class SlotScheduler(Scheduler[W]):
    def __init__(self, runner: ModelRunner, limits: SlotLimits) -> None:
        self.limits = limits
        self.batch = SlotBatch(runner, limits.num_slots)
        self.owners = {}

    @staticmethod
    def check_servable(runner: ModelRunner, policy: BatchingPolicy) -> None:
        """Refuse (ValueError) a runner the start-up checks did not give this layout; runs no forward (the slot check
        having passed on this model is a flag it left)."""
        if policy != "mixed" or not slot_attention_installed(runner):
            raise ValueError(
                "the slots layout needs the mixed policy and a model that passed the slot layout's start-up check "
                "(service.startup.check_model)"
            )

    @property
    def rows(self) -> list[Row]:
        return self.batch.rows

    def __len__(self) -> int:
        return len(self.batch.rows)

    def fits(self, request: GenerationRequest) -> bool:
        """Would admitting `request` now keep the store and the bank within the KV budget (and a slot free)?"""
        store, bank = self.batch.store, self.batch.bank
        if not store.free_slots:
            return False
        rows_after, width_after = store.shape_after(request.reserved_kv_tokens)
        bank_after = bank.referenced_tokens + (bank.columns_needed(request.prefix) if request.prefix is not None else 0)
        return rows_after * width_after + bank_after <= self.limits.max_kv_tokens

    def admit(self, waiting: Waiting[W], wait_for_arrival: WaitForArrival) -> list[W]:
        admitted: list[W] = []
        while waiting and self.fits(waiting[0].request):
            item = waiting.popleft()
            self.owners[self.batch.add(item.request)] = item
            admitted.append(item)
        return admitted

    def step(self) -> StepOutcome[W]:
        started = time.perf_counter()
        schedule = schedule_step(self.batch.rows, self.limits)
        if schedule.empty:
            return StepOutcome()
        stepped = self.batch.execute(schedule)
        return StepOutcome(
            stepped=stepped,
            rows=len(self.batch.rows),
            prefilling=bool(schedule.chunks),
            seconds=time.perf_counter() - started,
        )

    def retire(self, rows: list[Row]) -> list[W]:
        self.batch.remove(rows)
        return [self.owners.pop(row) for row in rows]

    def memory_in_use(self) -> int:
        return self.batch.kv_bytes_held

    def prefix_bank_bytes(self) -> int:
        return self.batch.bank.nbytes

    def clear(self) -> list[W]:
        self.batch.remove(list(self.batch.rows))
        owners = list(self.owners.values())
        self.owners.clear()
        return owners


def generate(
    runner: ModelRunner, requests: Sequence[GenerationRequest], *, step_token_budget: int = 128
) -> list[GenerationResult]:
    """Run requests to completion in the slot layout, all admitted at once (rows leave as they finish): the slot
    counterpart of `service.batch.generate`, for tests and offline use."""
    if not slot_layout_supported(runner):
        raise ValueError(f"{runner.model.config.model_type}: the slot layout cannot serve this model")
    budget = sum(r.reserved_kv_tokens for r in requests) * 2 + 1024
    limits = SlotLimits(num_slots=len(requests), max_kv_tokens=budget, step_token_budget=step_token_budget)
    batch = SlotBatch(runner, limits.num_slots)
    rows = [batch.add(r) for r in requests]
    while batch.rows:
        batch.execute(schedule_step(batch.rows, limits))
        batch.remove([r for r in batch.rows if r.finished])
    return [row.result(runner.decode(row.generated)) for row in rows]
