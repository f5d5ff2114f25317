"""The engine: one worker thread owns the model and runs batches; asyncio callers await their results.

`Engine` is the small interface the HTTP layer depends on. `PerTaskBatchingEngine` groups requests of the same task
that arrive within a short window (capped by a max batch size) into one batched generation.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

from service.batch import ModelRunner, generate
from service.requests import GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)


class Engine(ABC):
    """What the API needs from an engine."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    async def generate(self, request: GenerationRequest) -> GenerationResult: ...


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future[GenerationResult]
    loop: asyncio.AbstractEventLoop
    enqueued_at: float = field(default_factory=time.monotonic)

    def resolve(self, result: GenerationResult | None = None, error: BaseException | None = None) -> None:
        def _set() -> None:
            if self.future.done():  # the caller went away
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)  # type: ignore[arg-type]

        self.loop.call_soon_threadsafe(_set)


_STOP = object()


class PerTaskBatchingEngine(Engine):
    def __init__(self, runner: ModelRunner, *, window_s: float, max_batch_size: int) -> None:
        self.runner = runner
        self.window_s = window_s
        self.max_batch_size = max_batch_size
        self._inbox: queue.Queue[_Pending | object] = queue.Queue()
        self._waiting: deque[_Pending] = deque()
        self._thread: threading.Thread | None = None
        self.batches_run = 0  # observable by tests and metrics

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prefix-serve-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(_STOP)
            self._thread.join(timeout=30)
            self._thread = None

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        loop = asyncio.get_running_loop()
        pending = _Pending(request=request, future=loop.create_future(), loop=loop)
        self._inbox.put(pending)
        return await pending.future

    # -- worker thread --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if not self._waiting and not self._pull(timeout=None):
                return
            head = self._waiting[0]
            deadline = head.enqueued_at + self.window_s
            while self._count_task(head.request.task_id) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if not self._pull(timeout=remaining):
                    return
            self._run_batch(self._take_task(head.request.task_id))

    def _pull(self, timeout: float | None) -> bool:
        """Move one item (then everything already queued) from the inbox; False when asked to stop."""
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                for pending in self._waiting:
                    pending.resolve(error=RuntimeError("engine stopped"))
                return False
            self._waiting.append(item)  # type: ignore[arg-type]
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _count_task(self, task_id: str | None) -> int:
        return sum(1 for p in self._waiting if p.request.task_id == task_id)

    def _take_task(self, task_id: str | None) -> list[_Pending]:
        taken: list[_Pending] = []
        kept: deque[_Pending] = deque()
        for pending in self._waiting:
            if pending.request.task_id == task_id and len(taken) < self.max_batch_size:
                taken.append(pending)
            else:
                kept.append(pending)
        self._waiting = kept
        return taken

    def _run_batch(self, group: list[_Pending]) -> None:
        live = [p for p in group if not p.future.cancelled()]
        if not live:
            return
        started = time.monotonic()
        try:
            results = generate(self.runner, [p.request for p in live])
        except Exception as exc:  # a failed batch must not kill the worker; its callers get the error
            logger.exception("batch of %d failed", len(live))
            for pending in live:
                pending.resolve(error=exc)
            return
        self.batches_run += 1
        logger.debug(
            "task=%s batch=%d took %.3fs", live[0].request.task_id, len(live), time.monotonic() - started
        )
        for pending, result in zip(live, results):
            pending.resolve(result)
