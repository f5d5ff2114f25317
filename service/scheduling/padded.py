"""The padded layout's scheduler (decoder-only `DecodeBatch` and encoder-decoder `Seq2SeqBatch`).

Admission is a prefill: the admitted requests are prefilled as a batch of their own in the next step (a forward that
carries no decode token) and concatenated to the running batch; steps without admissions decode every running row.
Two admission policies:
  - `mixed`: any waiting request joins the running batch at the next step, whatever its task (at most
    `max_prefill_rows` per prefill);
  - `per-task`: a batch holds one task and runs to completion; the next batch is formed from the oldest waiting
    request's task, after a short window in which more requests of that task may arrive.
Both admit in arrival order while the row limit and the KV-token budget (each request's prefix + prompt +
max_new_tokens) allow.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from service.batch import DecodeBatch
from service.requests import GenerationRequest
from service.rows import Row
from service.runner import ModelRunner
from service.scheduling.base import Arrival, BatchingPolicy, Scheduler, StepOutcome, W, WaitForArrival, Waiting
from service.seq2seq import Seq2SeqBatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PaddedLimits:
    """The padded layout's budgets, derived from the engine's (`EngineLimits.padded_limits()`)."""

    max_running_rows: int
    max_kv_tokens: int  # sum of the running requests' reserved KV tokens
    max_prefill_rows: int  # mixed policy: most rows admitted by one prefill
    per_task_window_s: float  # per-task policy: how long the oldest request waits for more of its task


class PaddedScheduler(Scheduler[W]):
    def __init__(self, runner: ModelRunner, policy: BatchingPolicy, limits: PaddedLimits) -> None:
        self.runner = runner
        self.policy = policy
        self.limits = limits
        self.batch: DecodeBatch | Seq2SeqBatch | None = None
        self._batch_type = Seq2SeqBatch if runner.is_encoder_decoder else DecodeBatch
        self._admitted: list[W] = []  # taken from the queue, prefilled by the next step
        self.owners = {}

    @property
    def rows(self) -> list[Row]:
        return self.batch.rows if self.batch is not None else []

    def __len__(self) -> int:
        return len(self.batch) if self.batch is not None else 0

    # -- admission --------------------------------------------------------------------------------------------------

    def admit(self, waiting: Waiting[W], wait_for_arrival: WaitForArrival) -> list[W]:
        if not waiting:
            return []
        running = len(self)
        if self.policy == "per-task":
            if running:
                return []  # a per-task batch runs to completion
            task_id = waiting[0].request.task_id
            if not self._window_closed(waiting, task_id, wait_for_arrival):
                return []
            taken = self._take(waiting, lambda r: r.task_id == task_id, running, self.limits.max_running_rows)
        else:
            taken = self._take(waiting, lambda r: True, running, self.limits.max_prefill_rows)
        self._admitted = taken
        return taken

    def _window_closed(self, waiting: Waiting[W], task_id: str | None, wait_for_arrival: WaitForArrival) -> bool:
        """Wait (briefly, blocking on the engine's inbox) for more requests of this task, as the core batcher did."""
        deadline = waiting[0].enqueued_at + self.limits.per_task_window_s
        while sum(1 for item in waiting if item.request.task_id == task_id) < self.limits.max_running_rows:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            arrival = wait_for_arrival(remaining)
            if arrival is Arrival.STOPPING:
                return False
            if arrival is Arrival.TIMED_OUT:
                break
        return True

    def _take(
        self, waiting: Waiting[W], wanted: Callable[[GenerationRequest], bool], running: int, max_new_rows: int
    ) -> list[W]:
        """Take wanted requests in arrival order while the row and KV-token limits allow."""
        kv_in_use = sum(item.request.reserved_kv_tokens for item in self.owners.values())
        taken: list[W] = []
        kept: deque[W] = deque()
        blocked = False
        for item in waiting:
            if not blocked and wanted(item.request):
                if (
                    len(taken) < max_new_rows
                    and running + len(taken) < self.limits.max_running_rows
                    and kv_in_use + item.request.reserved_kv_tokens <= self.limits.max_kv_tokens
                ):
                    taken.append(item)
                    kv_in_use += item.request.reserved_kv_tokens
                    continue
                blocked = True  # FIFO: nothing behind the oldest request that does not fit may overtake it
            kept.append(item)
        if taken:
            waiting.clear()
            waiting.extend(kept)
        return taken

    # -- one step ---------------------------------------------------------------------------------------------------

    def step(self) -> StepOutcome[W]:
        if self._admitted:
            return self._prefill()
        if self.batch is None:
            return StepOutcome()
        started = time.perf_counter()
        self.batch.step()
        return StepOutcome(stepped=self.batch.rows, rows=len(self.batch), seconds=time.perf_counter() - started)

    def _prefill(self) -> StepOutcome[W]:
        """The admitted requests' prefill, a forward of their own, merged into the running batch. If it fails only
        they are lost; the running batch goes on."""
        admitted, self._admitted = self._admitted, []
        started = time.perf_counter()
        try:
            new_batch = self._batch_type.prefill(self.runner, [item.request for item in admitted])
        except Exception as exc:
            logger.exception("prefill of %d rows failed", len(admitted))
            return StepOutcome(failed=admitted, error=exc)
        seconds = time.perf_counter() - started
        for item, row in zip(admitted, new_batch.rows):
            self.owners[row] = item
        self.batch = new_batch if self.batch is None else self._batch_type.concatenate([self.batch, new_batch])  # type: ignore[list-item]
        return StepOutcome(
            stepped=new_batch.rows,
            rows=len(new_batch),
            prefilling=True,
            seconds=seconds,
            started=admitted,
            batches_started=int(self.policy == "per-task"),
        )

    # -- retirement and memory --------------------------------------------------------------------------------------

    def retire(self, rows: list[Row]) -> list[W]:
        assert self.batch is not None
        gone = set(rows)
        self.batch.filter([i for i, row in enumerate(self.batch.rows) if row not in gone])
        if not len(self.batch):
            self.batch = None
        return [self.owners.pop(row) for row in rows]

    def memory_in_use(self) -> int:
        return self.batch.kv_bytes if self.batch is not None else 0

    def clear(self) -> list[W]:
        self.batch = None
        owners = list(self.owners.values()) + self._admitted
        self.owners.clear()
        self._admitted = []
        return owners
