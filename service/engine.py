"""The engine: one worker thread owns the model and schedules at every decode step; asyncio callers await events.

Each iteration of the worker:
  1. takes new requests from the inbox into a bounded waiting queue (full queue -> the caller gets 429);
  2. admits waiting requests that fit the limits (running rows, KV tokens), prefills them as one batch and
     concatenates that batch onto the running one;
  3. decodes one token for every running row;
  4. retires finished rows at once (EOS, stop sequence, max_new_tokens, deadline, or the client went away),
     which frees their KV cache.

Two admission policies share this loop:
  - `mixed`: any waiting request joins the running batch at the next step, whatever its task;
  - `per-task`: a batch holds one task and runs to completion; the next batch is formed from the oldest waiting
    request's task, after a short window in which more requests of that task may arrive (the core behaviour).
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
from typing import AsyncIterator, Callable, Literal

from service.batch import DecodeBatch, ModelRunner, Row
from service.errors import DeadlineExceededError, OverloadedError, RequestTooLongError
from service.requests import FinishReason, GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)

BatchingPolicy = Literal["mixed", "per-task"]


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
    max_running_rows: int = 32
    max_kv_tokens: int = 65536  # worst-case KV slots (prefix + prompt + max_new_tokens) of all running rows
    max_waiting: int = 256
    max_prefill_rows: int = 16
    per_task_window_s: float = 0.005
    request_timeout_s: float = 300.0


@dataclass
class EngineStats:
    """Counters the metrics and tests read. Written by the worker thread only."""

    steps: int = 0
    prefills: int = 0
    batches_started: int = 0  # per-task policy: static batches formed
    running_rows: int = 0
    waiting: int = 0
    finished: int = 0
    cancelled: int = 0
    max_batch_rows_seen: int = 0
    rows_stepped: int = 0  # sum of batch sizes over prefills and steps: / (steps + prefills) = mean batch size


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


class _Handle:
    """A request in the engine, with the way back to its caller's event loop."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, with_text: bool, timeout_s: float):
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self.with_text = with_text
        self.enqueued_at = time.monotonic()
        self.deadline = self.enqueued_at + timeout_s
        self.cancelled = False  # set from the caller's side when it goes away
        self.emitted_text = ""
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None

    @property
    def reserved_kv_tokens(self) -> int:
        prefix = self.request.prefix.num_virtual_tokens if self.request.prefix is not None else 0
        return prefix + len(self.request.prompt_ids) + self.request.params.max_new_tokens

    def send(self, event: Event | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            self.cancelled = True


_STOP = object()


class ContinuousBatchingEngine(Engine):
    def __init__(
        self, runner: ModelRunner, *, policy: BatchingPolicy = "mixed", limits: EngineLimits | None = None
    ) -> None:
        self.runner = runner
        self.policy = policy
        self.limits = limits or EngineLimits()
        self.stats = EngineStats()
        self._inbox: queue.Queue[_Handle | object] = queue.Queue()
        self._waiting: deque[_Handle] = deque()
        self._handles: dict[int, _Handle] = {}  # id(row.request) -> handle, for running rows
        self._batch: DecodeBatch | None = None
        self._accepted = 0  # inbox + waiting, counted at submission so the bound holds across threads
        self._accepted_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.on_pass: Callable[[int], None] | None = None  # called with the row count of every forward pass

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

    def stream(self, request: GenerationRequest, *, with_text: bool = True) -> AsyncIterator[Event]:
        handle = self._submit(request, with_text)  # raises here, before any response starts, when full
        return self._events(handle)

    @staticmethod
    async def _events(handle: _Handle) -> AsyncIterator[Event]:
        try:
            while True:
                event = await handle.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, FinalEvent):
                    return
        finally:
            # Normal end, client disconnect (generator closed) or task cancellation: the worker retires the row.
            handle.cancelled = True

    def _submit(self, request: GenerationRequest, with_text: bool) -> _Handle:
        handle = _Handle(request, asyncio.get_running_loop(), with_text, self.limits.request_timeout_s)
        if handle.reserved_kv_tokens > self.limits.max_kv_tokens:
            raise RequestTooLongError(
                f"prefix + prompt + max_new_tokens = {handle.reserved_kv_tokens} tokens exceeds the engine's KV budget "
                f"of {self.limits.max_kv_tokens} tokens",
                max_kv_tokens=self.limits.max_kv_tokens,
            )
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

    def _run(self) -> None:
        while self._pull(block=self._batch is None and not self._waiting):
            self._expire_waiting()
            admitted = self._admit()
            if admitted:
                try:
                    self._prefill(admitted)
                except Exception as exc:  # only the rows being admitted are lost; the running batch goes on
                    logger.exception("prefill of %d rows failed", len(admitted))
                    self._fail(admitted, exc)
            elif self._batch is not None:
                try:
                    self._batch.step()
                except Exception as exc:
                    logger.exception("decode step failed; failing %d running rows", len(self._batch))
                    self._fail(list(self._handles.values()), exc)
                    self._handles.clear()
                    self._batch = None
                self.stats.steps += 1
            self._emit_and_retire()
        self._fail(list(self._handles.values()) + list(self._waiting), RuntimeError("engine stopped"))
        self._handles.clear()
        self._waiting.clear()
        self._batch = None

    def _pull(self, block: bool) -> bool:
        """Move inbox items into the waiting queue; False when asked to stop."""
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
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
                handle.send(DeadlineExceededError("the request waited past its deadline without being scheduled"))
            else:
                kept.append(handle)
        self._waiting = kept

    def _admit(self) -> list[_Handle]:
        if not self._waiting:
            return []
        running = len(self._batch) if self._batch is not None else 0
        if self.policy == "per-task":
            if running:
                return []  # a per-task batch runs to completion
            task_id = self._waiting[0].request.task_id
            if not self._per_task_window_closed(task_id):
                return []
            return self._take(lambda h: h.request.task_id == task_id, running, self.limits.max_running_rows)
        return self._take(lambda h: True, running, self.limits.max_prefill_rows)

    def _per_task_window_closed(self, task_id: str | None) -> bool:
        """Wait (briefly, blocking on the inbox) for more requests of this task, as the core batcher did."""
        deadline = self._waiting[0].enqueued_at + self.limits.per_task_window_s
        while sum(1 for h in self._waiting if h.request.task_id == task_id) < self.limits.max_running_rows:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._inbox.get(timeout=remaining)
            except queue.Empty:
                break
            if item is _STOP:
                self._inbox.put(_STOP)  # let the main loop see it
                return False
            self._waiting.append(item)  # type: ignore[arg-type]
        return True

    def _take(self, wanted: Callable[[_Handle], bool], running: int, max_new_rows: int) -> list[_Handle]:
        """Admit wanted requests in arrival order while the row and KV-token limits allow."""
        kv_in_use = sum(h.reserved_kv_tokens for h in self._handles.values())
        taken: list[_Handle] = []
        kept: deque[_Handle] = deque()
        blocked = False
        for handle in self._waiting:
            if not blocked and wanted(handle):
                if (
                    len(taken) < max_new_rows
                    and running + len(taken) < self.limits.max_running_rows
                    and kv_in_use + handle.reserved_kv_tokens <= self.limits.max_kv_tokens
                ):
                    taken.append(handle)
                    kv_in_use += handle.reserved_kv_tokens
                    continue
                blocked = True  # FIFO: nothing behind the oldest request that does not fit may overtake it
            kept.append(handle)
        self._waiting = kept
        self._release(len(taken))
        self.stats.waiting = len(self._waiting)
        return taken

    def _prefill(self, admitted: list[_Handle]) -> None:
        new_batch = DecodeBatch.prefill(self.runner, [h.request for h in admitted])
        self.stats.prefills += 1
        if self.policy == "per-task":
            self.stats.batches_started += 1
        now = time.monotonic()
        for handle in admitted:
            handle.admitted_at = now
            self._handles[id(handle.request)] = handle
        self._batch = new_batch if self._batch is None else DecodeBatch.concatenate([self._batch, new_batch])
        self.stats.max_batch_rows_seen = max(self.stats.max_batch_rows_seen, len(self._batch))

    def _emit_and_retire(self) -> None:
        batch = self._batch
        if batch is None:
            return
        now = time.monotonic()
        self.stats.rows_stepped += len(batch)
        if self.on_pass is not None:
            self.on_pass(len(batch))
        for row in batch.rows:
            handle = self._handles[id(row.request)]
            if not row.finished:
                if handle.cancelled:
                    row.finish_reason = FinishReason.CANCELLED
                elif now > handle.deadline:
                    row.finish_reason = FinishReason.CANCELLED
                    handle.send(DeadlineExceededError("the request ran past its deadline"))
            self._emit_tokens(row, handle)
        for row in batch.pop_finished():
            handle = self._handles.pop(id(row.request))
            if row.finish_reason is FinishReason.CANCELLED:
                self.stats.cancelled += 1
            else:
                result = row.result(self.runner)
                result.queue_s = (handle.admitted_at or now) - handle.enqueued_at
                result.ttft_s = (handle.first_token_at or now) - handle.enqueued_at
                handle.send(FinalEvent(result))
            self.stats.finished += 1
        if not len(batch):
            self._batch = None
        self.stats.running_rows = len(self._batch) if self._batch is not None else 0

    def _emit_tokens(self, row: Row, handle: _Handle) -> None:
        """Send the tokens this row gained since the last emission (one per step, except at its end)."""
        sent = row.emitted
        if handle.first_token_at is None and row.generated:
            handle.first_token_at = time.monotonic()
        if handle.cancelled or sent >= len(row.generated):
            return
        for index in range(sent, len(row.generated)):
            text = ""
            if handle.with_text:
                text = self._text_delta(row, handle, index + 1)
            handle.send(TokenEvent(token_id=row.generated[index], text=text, index=index))
        row.emitted = len(row.generated)

    def _text_delta(self, row: Row, handle: _Handle, upto: int) -> str:
        """Incremental detokenisation: decode the whole text so far and send what is new. Holds back a trailing
        replacement character, which means a multi-byte character is still incomplete."""
        if row.finished and upto == len(row.generated):
            full = row.text(self.runner)  # the final text (cut at a stop sequence if one matched)
        else:
            full = self.runner.decode(row.generated[:upto])
            if full.endswith("\ufffd"):
                return ""
        if not full.startswith(handle.emitted_text):
            return ""  # a later token changed how earlier bytes decode; the final event carries the full text
        delta = full[len(handle.emitted_text) :]
        handle.emitted_text = full
        return delta

    @staticmethod
    def _fail(handles: list[_Handle], error: BaseException) -> None:
        for handle in handles:
            handle.send(error)
