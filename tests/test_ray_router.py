"""TaskAffinityRouter's choices, without a cluster: affinity while the load is even, balance under a burst."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray.serve", reason="needs the ray extra: pip install -e '.[ray]'")

from service.scaleout.router import TaskAffinityRouter  # noqa: E402

MODEL = "task@" + "ab" * 32


@dataclass
class FakeReplica:
    replica_id: str
    multiplexed_model_ids: set[str] = field(default_factory=set)


def router(imbalance: int = 2) -> TaskAffinityRouter:
    instance = TaskAffinityRouter.__new__(TaskAffinityRouter)  # the Serve machinery is not needed for choices
    instance._use_replica_queue_len_cache = False
    instance.initialize_state(imbalance=imbalance)
    return instance


def pick(r: TaskAffinityRouter, replicas: list[FakeReplica], model_id: str = MODEL) -> FakeReplica:
    request: Any = SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=model_id))
    ranks = asyncio.run(r.choose_replicas(replicas, request))  # type: ignore[arg-type]
    return ranks[0][0]


def test_sequential_requests_stay_on_the_replica_holding_the_version() -> None:
    r = router()
    holder, other = FakeReplica("a", {MODEL}), FakeReplica("b")
    for _ in range(10):
        chosen = pick(r, [other, holder])
        assert chosen is holder
        r.on_send_request(chosen.replica_id)  # type: ignore[arg-type]
        r.on_request_completed(chosen.replica_id, "")  # type: ignore[arg-type]


def test_a_version_sent_before_any_replica_reports_it_keeps_its_replica() -> None:
    # Replicas report loaded ids late: the follow-up request must not be routed as if nobody held the version.
    r = router()
    first, second = FakeReplica("a"), FakeReplica("b")
    chosen = pick(r, [first, second])
    r.on_send_request(chosen.replica_id)  # type: ignore[arg-type]
    r.on_request_completed(chosen.replica_id, "")  # type: ignore[arg-type]
    for order in ([second, first], [first, second]) * 5:
        assert pick(r, order) is chosen
        r.on_send_request(chosen.replica_id)  # type: ignore[arg-type]
        r.on_request_completed(chosen.replica_id, "")  # type: ignore[arg-type]
    assert pick(r, [first, second], model_id="task@" + "cd" * 32) in (first, second)


def test_a_burst_spreads_beyond_the_imbalance() -> None:
    r = router(imbalance=2)
    holder, other = FakeReplica("a", {MODEL}), FakeReplica("b")
    # Serve picks several requests before sending any: the router's reservations must count those picks.
    picks = [pick(r, [holder, other]) for _ in range(16)]
    counts = Counter(p.replica_id for p in picks)
    # "a" takes 3 until the imbalance is passed; from then on "b" was sent the version too, so both hold it.
    assert counts == {"a": 8, "b": 8}
    for chosen in picks:
        r.on_send_request(chosen.replica_id)  # type: ignore[arg-type]
    assert r.in_flight == {"a": 8, "b": 8} and not any(r.reserved.values())


def test_without_a_holder_the_least_loaded_replica_is_picked() -> None:
    r = router()
    busy, idle = FakeReplica("a"), FakeReplica("b")
    for _ in range(3):
        r.on_send_request(busy.replica_id)  # type: ignore[arg-type]
    assert pick(r, [busy, idle]) is idle
    assert pick(r, [busy, idle], model_id="") is idle
