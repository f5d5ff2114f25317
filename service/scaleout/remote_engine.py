"""The ingress's engine: the `Engine` interface of `service.engine`, served by model replicas behind a Ray handle.

The routers, schemas, auth, limits and error handlers are the single-process server's, unchanged; only this engine
differs. It is free of Ray: it calls an `OpenCall`, which the Ray application implements with the model
deployment's handle (and tests with a fake).

What it decides, per request:
  - before accepting (raising at once, like the local engine): the KV budget of one replica, and a bound on the
    requests in flight through this ingress (replicas x (max_waiting + max_running_rows)), so overload is a real 429;
  - routing: the request carries the multiplexed id `task@sha256`; the deployment's router (`router.py`) prefers a
    replica holding that version unless it is busier than the least loaded one by more than a threshold, so a hot
    task spreads over replicas instead of pinning one;
  - a replica's 429 (its own queue full) before any token is retried on another pick, up to `overload_retries`;
  - a replica that no longer finds the version in the store (replaced or deleted meanwhile) gets the request again
    with the prefix tensor attached: a request always runs with the version it was accepted with.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import AsyncGenerator, AsyncIterator, Callable, Protocol

from service.engine import Engine, EngineLimits, Event, FinalEvent, TokenEvent, check_kv_budget
from service.errors import OverloadedError
from service.requests import GenerationRequest, GenerationResult
from service.scaleout.protocol import RemoteRequest, RemoteServiceError, StreamError, StreamStart

logger = logging.getLogger(__name__)

_RESEND_WITH_PREFIX = {"prefix_version_changed", "task_not_found"}


class OpenCall(Protocol):
    def __call__(self, request: RemoteRequest, multiplexed_model_id: str | None, stream: bool) -> AsyncIterator[object]:
        """Send `request` to a replica and iterate what it answers: a StreamStart, then (when accepted) events.
        `stream=False` may deliver everything at the end. Closing the iterator cancels the replica's work."""
        ...


RoutedHook = Callable[[str, str | None], None]  # (replica that accepted, task or None)


class RemoteEngine(Engine):
    def __init__(
        self,
        call: OpenCall,
        *,
        limits: EngineLimits,
        replicas: Callable[[], int] = lambda: 1,
        overload_retries: int = 3,
        retry_delay_s: float = 0.05,
        on_routed: RoutedHook | None = None,
    ) -> None:
        self._call = call
        self.limits = limits
        self._replicas = replicas
        self.overload_retries = overload_retries
        self.retry_delay_s = retry_delay_s
        self.on_routed = on_routed
        self.inflight = 0  # accepted and not finished
        self.background: list[asyncio.Task[None]] = []  # e.g. the stats poller; cancelled by stop()

    def start(self) -> None:
        """Nothing runs locally; the replicas' engines are started by their deployment."""

    def stop(self) -> None:
        for task in self.background:
            task.cancel()
        self.background.clear()

    @property
    def max_inflight(self) -> int:
        per_replica = self.limits.max_waiting + self.limits.max_running_rows
        return max(1, self._replicas()) * per_replica

    def stream(self, request: GenerationRequest, *, with_text: bool = True) -> AsyncIterator[Event]:
        self._accept(request)
        return _Accepted(self, self._events(request, with_text, stream=True))

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self._accept(request)
        events = _Accepted(self, self._events(request, False, stream=False))
        try:
            async for event in events:
                if isinstance(event, FinalEvent):
                    return event.result
        finally:
            await events.aclose()
        raise RuntimeError("replica answered without a result")

    # ------------------------------------------------------------------------------------------------------------

    def _accept(self, request: GenerationRequest) -> None:
        """The checks the local engine makes before accepting, so their errors are real HTTP statuses."""
        check_kv_budget(request, self.limits)
        if self.inflight >= self.max_inflight:
            raise OverloadedError(
                f"the deployment is full ({self.inflight} requests in flight); retry shortly", retry_after_s=1
            )
        self.inflight += 1

    async def _events(self, request: GenerationRequest, with_text: bool, *, stream: bool) -> AsyncIterator[Event]:
        prefix = request.prefix
        remote = RemoteRequest(
            prompt_ids=list(request.prompt_ids),
            task_id=prefix.task_id if prefix is not None else None,
            sha256=prefix.sha256 if prefix is not None else None,
            params=request.params,
            request_id=request.request_id,
            with_text=with_text,
        )
        overloaded = 0
        task_id = remote.task_id
        while True:
            # The resent-with-tensor fallback carries no id: no replica should cache a version the store lacks.
            multiplexed = remote.model_id if remote.kv is None and task_id is not None else None
            items = self._call(remote, multiplexed, stream)
            try:
                start = await anext(items, None)
                if not isinstance(start, StreamStart):
                    raise RuntimeError(f"replica stream began with {type(start).__name__}, not its status")
                if start.status == 200:
                    if self.on_routed is not None:
                        self.on_routed(start.replica, remote.task_id)
                    async for item in items:
                        if isinstance(item, StreamError):
                            raise RemoteServiceError(item.status, item.body)
                        if not isinstance(item, (TokenEvent, FinalEvent)):
                            raise RuntimeError(f"unexpected item from a replica: {type(item).__name__}")
                        yield item
                        if isinstance(item, FinalEvent):
                            return
                    raise RuntimeError("replica stream ended without a result")
            finally:
                await items.aclose()  # on a client disconnect too: cancels the replica's row
            body = start.body or {}
            if prefix is not None and remote.kv is None and body.get("type") in _RESEND_WITH_PREFIX:
                logger.info(
                    "task %r changed in the store while request %s was on its way; resending its prefix",
                    remote.task_id, remote.request_id or "-",
                )
                on_host = prefix.to("cpu")
                remote = replace(remote, kv=on_host.kv, encoder_kv=on_host.encoder_kv)
                continue
            if start.status == 429 and overloaded < self.overload_retries:
                overloaded += 1
                await asyncio.sleep(self.retry_delay_s * overloaded)
                continue
            raise RemoteServiceError(start.status, body)


class _Accepted:
    """An accepted request's events. Gives its place in the in-flight bound back exactly once: at the end, on
    aclose(), or when dropped unstarted (a client that left before the response began never iterates it)."""

    def __init__(self, engine: RemoteEngine, events: AsyncGenerator[Event, None]) -> None:
        self._engine = engine
        self._events = events
        self._released = False

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._engine.inflight -= 1

    def __aiter__(self) -> _Accepted:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self._events.__anext__()
        except BaseException:
            self._release()
            raise

    async def aclose(self) -> None:
        try:
            await self._events.aclose()
        finally:
            self._release()

    def __del__(self) -> None:
        self._release()
