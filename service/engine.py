"""The engine: one worker thread owns the model and schedules at every step; asyncio callers await events.

Each iteration of the worker:
  1. takes new requests from the inbox into a bounded waiting queue (full queue -> the caller gets 429), and drops
     waiting requests that were cancelled or ran past their deadline;
  2. has the scheduler admit waiting requests, oldest first, while rows and the KV memory budget allow;
  3. has the scheduler run one step: its schedule (rows, prompt chunks, token budget), then one forward pass;
  4. hands each new token id to its caller and retires finished rows at once (EOS, max_new_tokens, a stop
     sequence the caller matched, the deadline, or the client went away), which frees their KV.

The layout's decisions (admission, what each forward carries, retirement, memory) are its scheduler's
(`service.scheduling`): the slot layout's `SlotScheduler` (the default wherever the model's attention runs through
transformers' attention registry: one flat forward per step for decode and chunked prefill, prefixes once per task)
or the padded layout's `PaddedScheduler` (the fallback, also for encoder-decoder models and the `per-task` policy).
This module knows no layout beyond choosing the scheduler for the one it is given.

Text is not made here: callers turn token ids into text and match stop sequences on their own event loop
(`service.detokenizer`), so the model thread never decodes.

Two admission policies (`service.scheduling.padded`): `mixed` (any waiting request joins the running batch at the
next step, whatever its task) and `per-task` (a batch holds one task and runs to completion).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from service.detokenizer import OutputProcessor
from service.errors import DeadlineExceededError, OverloadedError, RequestTooLongError, ServiceError
from service.kv_store import PrefixBank
from service.requests import FinishReason, GenerationRequest, GenerationResult
from service.rows import Row
from service.runner import ModelRunner
from service.scheduling.base import Arrival, BatchingPolicy, Layout, Scheduler
from service.scheduling.padded import PaddedLimits, PaddedScheduler
from service.scheduling.slot_schedule import SlotLimits
from service.scheduling.slots import SlotScheduler
from service.settings import Settings, setting_default

logger = logging.getLogger(__name__)

__all__ = ["BatchingPolicy", "Layout"]  # re-exported: where the engine's callers name them


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; `text` is the new text it completes (may be empty while a character is incomplete)."""

    token_id: int
    text: str
    index: int


@dataclass(frozen=True)
class FinalEvent:
    result: GenerationResult


Event = TokenEvent | FinalEvent


@dataclass(frozen=True)
class EngineLimits:
    """The engine's budgets. Built from the settings with `from_settings`; the field defaults are Settings' own, so
    `EngineLimits()` runs the server's budgets."""

    max_running_rows: int = setting_default("max_running_rows")
    # KV memory budget in tokens (slots: store rows x width + bank)
    max_kv_tokens: int = setting_default("max_kv_tokens")
    max_waiting: int = setting_default("max_waiting")
    max_prefill_rows: int = setting_default("max_prefill_rows")  # padded layout: most rows in one prefill
    # slots layout: most tokens (decode + prompt chunks) per forward; when no row decodes, the idle budget
    # (None: 8 x step_token_budget, see SlotLimits)
    step_token_budget: int = setting_default("step_token_budget")
    idle_token_budget: int | None = setting_default("idle_token_budget")
    per_task_window_s: float = setting_default("batch_window_ms") / 1000.0
    request_timeout_s: float = setting_default("request_timeout_s")

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineLimits:
        return cls(
            max_running_rows=settings.max_running_rows,
            max_kv_tokens=settings.max_kv_tokens,
            max_waiting=settings.max_waiting,
            max_prefill_rows=settings.max_prefill_rows,
            step_token_budget=settings.step_token_budget,
            idle_token_budget=settings.idle_token_budget,
            per_task_window_s=settings.batch_window_ms / 1000.0,
            request_timeout_s=settings.request_timeout_s,
        )

    def slot_limits(self) -> SlotLimits:
        """The slot layout's budgets, derived from these (never set apart)."""
        return SlotLimits(
            num_slots=self.max_running_rows,
            max_kv_tokens=self.max_kv_tokens,
            step_token_budget=self.step_token_budget,
            idle_token_budget=self.idle_token_budget,
        )

    def padded_limits(self) -> PaddedLimits:
        """The padded layout's budgets, derived from these (never set apart)."""
        return PaddedLimits(
            max_running_rows=self.max_running_rows,
            max_kv_tokens=self.max_kv_tokens,
            max_prefill_rows=self.max_prefill_rows,
            per_task_window_s=self.per_task_window_s,
        )


@dataclass
class EngineStats:
    """Counters the metrics and tests read. Written by the worker thread only."""

    steps: int = 0  # forward passes
    prefills: int = 0  # forward passes that carried prompt tokens
    batches_started: int = 0  # per-task policy: static batches formed
    running_rows: int = 0
    waiting: int = 0
    finished: int = 0
    cancelled: int = 0
    max_batch_rows_seen: int = 0
    rows_stepped: int = 0  # sum of rows over forward passes: / steps = mean batch size
    kv_bytes: int = 0  # KV memory held now (slots layout: store + prefix bank)
    peak_kv_bytes: int = 0
    prefix_bank_bytes: int = 0  # of which the per-task prefix bank (each task's prefix once)
    failed_rows: int = 0  # rows answered with an error of their own (non-finite logits), the batch unharmed


def check_kv_budget(request: GenerationRequest, limits: EngineLimits) -> None:
    """Refuse (422) a request that could never run: its prefix + prompt + max_new_tokens exceed the KV budget."""
    if request.reserved_kv_tokens > limits.max_kv_tokens:
        raise RequestTooLongError(
            f"prefix + prompt + max_new_tokens = {request.reserved_kv_tokens} tokens exceeds the engine's KV budget "
            f"of {limits.max_kv_tokens} tokens",
            max_kv_tokens=limits.max_kv_tokens,
        )


class Engine(ABC):
    """What the API needs from an engine."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def stream(self, request: GenerationRequest, *, with_text: bool = True) -> AsyncIterator[Event]:
        """Submit a request and return its events: TokenEvents, then one FinalEvent. Raises at once (before any
        event) when the request cannot be accepted."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        async for event in self.stream(request, with_text=False):
            if isinstance(event, FinalEvent):
                return event.result
        raise RuntimeError("engine stream ended without a result")


@dataclass
class _Finished:
    """The worker's last word on a row: the caller builds the text and the FinalEvent."""

    result: GenerationResult


class _Handle:
    """A request in the engine, with the way back to its caller's event loop."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, timeout_s: float):
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue[TokenEvent | _Finished | BaseException] = asyncio.Queue()
        self.enqueued_at = time.monotonic()
        self.deadline = self.enqueued_at + timeout_s
        self.cancelled = False  # set from the caller's side when it goes away
        self.stopped = False  # set from the caller's side when it matched a stop sequence
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.sampler_seed: int | None = None  # the seed the row samples with (drawn when the request gave none)

    def stamp(self, result: GenerationResult) -> GenerationResult:
        """Fill in the result's queueing time and time to first token (now, for a step that never happened)."""
        now = time.monotonic()
        result.queue_s = (self.admitted_at or now) - self.enqueued_at
        result.ttft_s = (self.first_token_at or now) - self.enqueued_at
        return result

    def put(self, item: TokenEvent | _Finished | BaseException) -> None:
        """Event-loop side of delivery."""
        self.events.put_nowait(item)


_STOP = object()
_WAKE = object()  # a caller gave up on a queued request: let the worker drop it now (and the queue gauge follow)


class ContinuousBatchingEngine(Engine):
    def __init__(
        self,
        runner: ModelRunner,
        *,
        policy: BatchingPolicy = "mixed",
        limits: EngineLimits | None = None,
        layout: Layout,
    ) -> None:
        """`layout` is the one `service.startup.check_model` chose; the constructor runs no forward and checks only
        what costs nothing (the slot check having passed on this model is a flag it left)."""
        self.runner = runner
        self.policy = policy
        self.limits = limits or EngineLimits()
        if layout not in ("slots", "padded"):
            raise ValueError(f"layout must be 'slots' or 'padded' (service.startup.check_model chooses), not {layout!r}")
        if layout == "slots":
            SlotScheduler.check_servable(runner, policy)
        self.layout: Layout = layout
        self.stats = EngineStats()
        self._inbox: queue.Queue[_Handle | object] = queue.Queue()
        self._waiting: deque[_Handle] = deque()
        self._accepted = 0  # inbox + waiting, counted at submission so the bound holds across threads
        self._accepted_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Handle, object]]] = {}
        # Called after every forward pass with its row count and duration (metrics, benchmarks).
        self.on_pass: Callable[[int, float], None] | None = None
        # Called with the error of each row that fails on its own (metrics: counted by the error's code).
        self.on_row_error: Callable[[ServiceError], None] | None = None
        # Slots layout: called on the engine thread with the prefix bank it builds (the registry's device tier).
        self.on_prefix_bank: Callable[[PrefixBank], None] | None = None
        logger.info("engine: %s policy, %s layout", policy, layout)

    # -- caller side (event loop) -----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prefix-serve-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(_STOP)
            self._thread.join(timeout=60)
            self._thread = None

    @property
    def queue_size(self) -> int:
        """Requests accepted and not yet admitted (live: also correct while the worker is idle)."""
        with self._accepted_lock:
            return self._accepted

    def stream(self, request: GenerationRequest, *, with_text: bool = True) -> AsyncIterator[Event]:
        handle = self._submit(request)  # raises here, before any response starts, when full
        return self._events(handle, with_text)

    async def _events(self, handle: _Handle, with_text: bool) -> AsyncIterator[Event]:
        """Turn the worker's token ids into TokenEvents with text and one FinalEvent (output processing runs here,
        on the caller's loop). A step's items arrive together, so the row's last token is seen with its result and
        its event carries all the text still owed (the final decode can complete a held-back character)."""
        output = OutputProcessor(self.runner.decode, handle.request.params.stop, with_text)
        tokens: list[int] = []
        item: TokenEvent | _Finished | BaseException | None = None
        try:
            while True:
                item = item if item is not None else await handle.events.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _Finished):  # no token in this delivery (e.g. the deadline passed)
                    yield FinalEvent(self._finish_text(item.result, output))
                    return
                tokens.append(item.token_id)
                text = output.push(item.token_id)
                if output.stopped_text is not None:  # a stop sequence ends the request here
                    handle.stopped = True
                    yield TokenEvent(item.token_id, text, item.index)
                    yield FinalEvent(self._stopped_result(handle, tokens, output.stopped_text))
                    return
                following = handle.events.get_nowait() if not handle.events.empty() else None
                if isinstance(following, _Finished):
                    result = self._finish_text(following.result, output)
                    yield TokenEvent(item.token_id, text + output.final_delta(result.text), item.index)
                    yield FinalEvent(result)
                    return
                yield TokenEvent(item.token_id, text, item.index) if text else item
                item = following
        finally:
            # Normal end, client disconnect (generator closed) or task cancellation: the worker retires the row.
            if not handle.stopped:
                handle.cancelled = True
            if handle.admitted_at is None:
                self._inbox.put(_WAKE)

    @staticmethod
    def _finish_text(result: GenerationResult, output: OutputProcessor) -> GenerationResult:
        result.text = output.final_text(result.token_ids)
        return result

    @staticmethod
    def _stopped_result(handle: _Handle, tokens: list[int], text: str) -> GenerationResult:
        result = GenerationResult(
            token_ids=list(tokens),
            text=text,
            finish_reason=FinishReason.STOP_SEQUENCE,
            prompt_tokens=len(handle.request.prompt_ids),
            seed=handle.sampler_seed,
        )
        return handle.stamp(result)

    def _submit(self, request: GenerationRequest) -> _Handle:
        handle = _Handle(request, asyncio.get_running_loop(), self.limits.request_timeout_s)
        check_kv_budget(request, self.limits)
        with self._accepted_lock:
            if self._accepted >= self.limits.max_waiting:
                raise OverloadedError(
                    f"the queue is full ({self.limits.max_waiting} waiting requests); retry shortly",
                    retry_after_s=1,
                )
            self._accepted += 1
        self._inbox.put(handle)
        return handle

    # -- worker thread --------------------------------------------------------------------------------------------

    def _new_scheduler(self) -> Scheduler[_Handle]:
        if self.layout == "slots":
            return SlotScheduler(self.runner, self.limits.slot_limits())
        return PaddedScheduler(self.runner, self.policy, self.limits.padded_limits())

    def _run(self) -> None:
        scheduler = self._new_scheduler()  # one per run: a restarted engine starts with empty KV
        if isinstance(scheduler, SlotScheduler) and self.on_prefix_bank is not None:
            self.on_prefix_bank(scheduler.batch.bank)
        while self._pull(block=not len(scheduler) and not self._waiting):
            self._expire_waiting()
            try:
                self._iteration(scheduler)
            except Exception as exc:  # a failed forward fails the rows in it; the engine goes on
                logger.exception("engine step failed; failing %d running rows", len(scheduler))
                self._fail(scheduler.clear(), exc)
            self._flush()
        self._fail(scheduler.clear() + list(self._waiting), RuntimeError("engine stopped"))
        self._flush()
        self._waiting.clear()

    def _pull(self, block: bool) -> bool:
        """Move inbox items into the waiting queue; False when asked to stop."""
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
            if item is not _WAKE:
                self._waiting.append(item)  # type: ignore[arg-type]
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        self.stats.waiting = len(self._waiting)
        return True

    def _release(self, count: int) -> None:
        with self._accepted_lock:
            self._accepted -= count

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        kept: deque[_Handle] = deque()
        for handle in self._waiting:
            if handle.cancelled:
                self._release(1)
                self.stats.cancelled += 1
            elif now > handle.deadline:
                self._release(1)
                self._send(handle, DeadlineExceededError("the request waited past its deadline without being scheduled"))
            else:
                kept.append(handle)
        self._waiting = kept
        self.stats.waiting = len(self._waiting)

    def _wait_for_arrival(self, timeout_s: float) -> Arrival:
        """Block up to `timeout_s` on the inbox (the per-task window); a request that comes joins the waiting queue."""
        try:
            item = self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            return Arrival.TIMED_OUT
        if item is _STOP:
            self._inbox.put(_STOP)  # let the main loop see it
            return Arrival.STOPPING
        if item is not _WAKE:
            self._waiting.append(item)  # type: ignore[arg-type]
        return Arrival.ARRIVED

    # -- one iteration: retire what must stop, admit, step, deliver, retire what finished ---------------------------

    def _iteration(self, scheduler: Scheduler[_Handle]) -> None:
        owners = scheduler.owners
        self._retire(scheduler, [row for row in scheduler.rows if self._should_drop(row, owners[row])])
        admitted = scheduler.admit(self._waiting, self._wait_for_arrival)
        if admitted:
            self._release(len(admitted))
            now = time.monotonic()
            for handle in admitted:
                handle.admitted_at = now
        self.stats.waiting = len(self._waiting)
        outcome = scheduler.step()
        if outcome.failed:
            self._fail(outcome.failed, outcome.error or RuntimeError("admission failed"))
        if outcome.rows:
            if outcome.started:  # rows that begin with their own prefill were admitted by it
                now = time.monotonic()
                for handle in outcome.started:
                    handle.admitted_at = now
            self.stats.batches_started += outcome.batches_started
            self._count_pass(outcome.rows, outcome.prefilling, outcome.seconds)
            self.stats.max_batch_rows_seen = max(self.stats.max_batch_rows_seen, len(scheduler))
            for row in outcome.stepped:
                self._emit_tokens(row, owners[row])
        self._retire(scheduler, [row for row in scheduler.rows if row.finished])
        self.stats.kv_bytes = scheduler.memory_in_use()
        self.stats.prefix_bank_bytes = scheduler.prefix_bank_bytes()
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, self.stats.kv_bytes)

    def _should_drop(self, row: Row, handle: _Handle) -> bool:
        """Mark rows whose caller went away, matched a stop sequence or ran out of time; True = retire now."""
        if row.finished:
            return True
        if handle.stopped:
            row.finish_reason = FinishReason.STOP_SEQUENCE
        elif handle.cancelled:
            row.finish_reason = FinishReason.CANCELLED
        elif time.monotonic() > handle.deadline:
            row.finish_reason = FinishReason.CANCELLED
            self._send(handle, DeadlineExceededError("the request ran past its deadline"))
        return row.finished

    def _retire(self, scheduler: Scheduler[_Handle], rows: list[Row]) -> None:
        if rows:
            for row, handle in zip(rows, scheduler.retire(rows)):
                self._finish(row, handle)
        self.stats.running_rows = len(scheduler)

    # -- shared ---------------------------------------------------------------------------------------------------

    def _count_pass(self, rows: int, prefilling: bool, seconds: float) -> None:
        self.stats.steps += 1
        self.stats.prefills += int(prefilling)
        self.stats.rows_stepped += rows
        if self.on_pass is not None:
            self.on_pass(rows, seconds)

    def _finish(self, row: Row, handle: _Handle) -> None:
        if row.error is not None:  # its logits were not finite: an error for this request, never its tokens
            self.stats.failed_rows += 1
            self._send(handle, row.error)
            if self.on_row_error is not None:
                self.on_row_error(row.error)
        elif row.finish_reason is FinishReason.CANCELLED:
            self.stats.cancelled += 1
        elif row.finish_reason is not FinishReason.STOP_SEQUENCE:  # the caller already answered a stop
            self._send(handle, _Finished(handle.stamp(row.result())))
        self.stats.finished += 1

    def _emit_tokens(self, row: Row, handle: _Handle) -> None:
        """Hand the caller the token ids this row gained since the last emission."""
        if handle.first_token_at is None and row.generated:
            handle.first_token_at = time.monotonic()
            handle.sampler_seed = row.sampler.seed
        if handle.cancelled or handle.stopped:
            row.emitted = len(row.generated)
            return
        for index in range(row.emitted, len(row.generated)):
            self._send(handle, TokenEvent(token_id=row.generated[index], text="", index=index))
        row.emitted = len(row.generated)

    def _send(self, handle: _Handle, item: TokenEvent | _Finished | BaseException) -> None:
        """Queue an item for the caller; `_flush` delivers a step's items with one wake-up per event loop."""
        self._outbox.setdefault(handle.loop, []).append((handle, item))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                for handle, _ in items:
                    handle.cancelled = True

    def _fail(self, handles: list[_Handle], error: BaseException) -> None:
        for handle in handles:
            self._send(handle, error)


def _deliver(items: list[tuple[_Handle, object]]) -> None:
    for handle, item in items:
        handle.put(item)  # type: ignore[arg-type]
