"""RemoteEngine (the Ray ingress's engine) against a fake replica: routing, statuses, retries, version fallback and
cancellation, without Ray."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import pytest
import torch

from service.engine import EngineLimits, FinalEvent, TokenEvent
from service.errors import OverloadedError, RequestTooLongError
from service.prefix import TaskPrefix
from service.requests import FinishReason, GenerationRequest, GenerationResult, SamplingParams
from service.scaleout.protocol import (
    RemoteRequest,
    RemoteServiceError,
    StreamError,
    StreamStart,
    multiplexed_id,
    parse_multiplexed_id,
)
from service.scaleout.remote_engine import RemoteEngine
from tests.helpers import collect_async

SHA = "ab" * 32


def prefix(task_id: str = "t", v: int = 3) -> TaskPrefix:
    return TaskPrefix(task_id=task_id, kv=torch.zeros(2, 2, 1, v, 4), sha256=SHA)


def request(task: TaskPrefix | None, max_new_tokens: int = 2) -> GenerationRequest:
    return GenerationRequest(prompt_ids=[5, 6], prefix=task, params=SamplingParams(max_new_tokens=max_new_tokens))


def result() -> GenerationResult:
    return GenerationResult(token_ids=[7, 8], text="ab", finish_reason=FinishReason.LENGTH, prompt_tokens=2)


@dataclass
class FakeReplicas:
    """Answers each call with the next script (a list of items); records calls and closes."""

    scripts: list[list[Any]] = field(default_factory=list)
    calls: list[tuple[RemoteRequest, str | None, bool]] = field(default_factory=list)
    closed: int = 0
    gate: asyncio.Event | None = None  # when set, streams wait on it after their status

    def ok(self) -> list[Any]:
        return [StreamStart(200, "r1"), TokenEvent(7, "a", 0), TokenEvent(8, "b", 1), FinalEvent(result())]

    def __call__(self, req: RemoteRequest, model_id: str | None, stream: bool) -> AsyncIterator[object]:
        self.calls.append((req, model_id, stream))
        script = self.scripts.pop(0) if self.scripts else self.ok()
        return self._items(script)

    async def _items(self, script: list[Any]) -> AsyncIterator[object]:
        try:
            for i, item in enumerate(script):
                yield item
                if i == 0 and self.gate is not None:
                    await self.gate.wait()
        finally:
            self.closed += 1


def engine(fake: FakeReplicas, **kwargs: Any) -> RemoteEngine:
    kwargs.setdefault("limits", EngineLimits(max_kv_tokens=64, max_waiting=2, max_running_rows=2))
    return RemoteEngine(fake, retry_delay_s=0.0, **kwargs)


def test_multiplexed_ids_carry_task_and_version() -> None:
    assert parse_multiplexed_id(multiplexed_id("my.task", SHA)) == ("my.task", SHA)
    with pytest.raises(ValueError):
        parse_multiplexed_id("no-version")


def test_stream_sends_task_version_not_tensor_and_yields_events() -> None:
    fake = FakeReplicas()
    events = asyncio.run(collect_async(engine(fake).stream(request(prefix()))))
    assert [type(e) for e in events] == [TokenEvent, TokenEvent, FinalEvent]
    sent, model_id, stream = fake.calls[0]
    assert (sent.task_id, sent.sha256, sent.kv, model_id, stream) == ("t", SHA, None, f"t@{SHA}", True)
    assert fake.closed == 1


def test_generate_uses_the_unary_call_and_base_model_is_not_multiplexed() -> None:
    fake = FakeReplicas(scripts=[[StreamStart(200, "r1"), FinalEvent(result())]])
    out = asyncio.run(engine(fake).generate(request(None)))
    assert out.text == "ab"
    sent, model_id, stream = fake.calls[0]
    assert sent.task_id is None and model_id is None and stream is False


def test_checks_made_before_accepting_raise_at_once() -> None:
    fake = FakeReplicas()
    with pytest.raises(RequestTooLongError):
        engine(fake).stream(request(prefix(), max_new_tokens=100))
    eng = engine(fake)  # room for (max_waiting + max_running_rows) x 1 replica = 4 in flight
    opened = [eng.stream(request(prefix())) for _ in range(4)]
    with pytest.raises(OverloadedError):
        eng.stream(request(prefix()))
    assert len(opened) == 4 and fake.calls == []  # nothing was sent for the refused one


def test_replica_overload_is_retried_then_reported() -> None:
    busy = [StreamStart(429, "r1", {"error": "the queue is full", "type": "overloaded", "retry_after_s": 1})]
    fake = FakeReplicas(scripts=[busy, busy])
    assert len(asyncio.run(collect_async(engine(fake).stream(request(prefix()))))) == 3
    assert len(fake.calls) == 3

    fake = FakeReplicas(scripts=[busy] * 5)
    with pytest.raises(RemoteServiceError) as raised:
        asyncio.run(collect_async(engine(fake, overload_retries=2).stream(request(prefix()))))
    assert raised.value.status_code == 429 and raised.value.to_json()["retry_after_s"] == 1
    assert len(fake.calls) == 3


def test_a_replaced_version_is_resent_with_the_prefix_tensor() -> None:
    changed = [StreamStart(409, "r1", {"error": "changed", "type": "prefix_version_changed"})]
    fake = FakeReplicas(scripts=[changed])
    task = prefix()
    asyncio.run(collect_async(engine(fake).stream(request(task))))
    (first, first_id, _), (second, second_id, _) = fake.calls
    assert first.kv is None and first_id is not None
    assert second_id is None and second.kv is not None and torch.equal(second.kv, task.kv)


def test_errors_keep_their_status_and_body() -> None:
    fake = FakeReplicas(scripts=[[StreamStart(200, "r1"), TokenEvent(7, "a", 0), StreamError(504, {
        "error": "the request ran past its deadline", "type": "deadline_exceeded"})]])
    with pytest.raises(RemoteServiceError) as raised:
        asyncio.run(collect_async(engine(fake).stream(request(prefix()))))
    assert raised.value.status_code == 504 and raised.value.code == "deadline_exceeded"


def test_closing_the_stream_closes_the_replica_call() -> None:
    fake = FakeReplicas()

    async def disconnect() -> RemoteEngine:
        fake.gate = asyncio.Event()
        eng = engine(fake)
        events = eng.stream(request(prefix()))
        task = asyncio.create_task(anext(events))
        await asyncio.sleep(0.01)
        task.cancel()  # the client went away while waiting for a token
        with pytest.raises(asyncio.CancelledError):
            await task
        await events.aclose()
        return eng

    eng = asyncio.run(disconnect())
    assert fake.closed == 1 and eng.inflight == 0


def test_a_stream_dropped_before_it_started_gives_its_place_back() -> None:
    eng = engine(FakeReplicas())
    for _ in range(10):  # more than the bound of 4: each dropped stream must have been released
        events = eng.stream(request(prefix()))
        del events
    assert eng.inflight == 0
