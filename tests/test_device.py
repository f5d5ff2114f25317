"""What the CUDA path needs that a CPU can check: the prefix tiers' host copies (pinned, asynchronous on a GPU) and
the step loop's host syncs (one per step, counted, whatever the rows ask for). Device and dtype selection are in
test_model_loader.py; the CUDA run itself is benchmarks/gpu/check.sh (docs/gpu.md)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from service import slots
from service.scheduling.slot_schedule import SlotLimits
from service.scheduling.slots import SlotScheduler
from service.batch import DecodeBatch
from service.prefix import TaskPrefix
from service.prefix_cache import TieredPrefixCache
from service.requests import GenerationRequest, SamplingParams
from service.runner import ModelRunner
from tests.helpers import HostSyncCounter, random_task_prefix, tiny_llama, tiny_tokenizer


def _prefix(task_id: str) -> TaskPrefix:
    return TaskPrefix(task_id, torch.zeros((2, 2, 1, 4, 8)), f"sha-{task_id}")


@pytest.mark.parametrize(("device", "pinned"), [("cuda", True), ("cpu", False)])
def test_host_tier_is_pinned_and_the_way_back_asynchronous_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch, device: str, pinned: bool
) -> None:
    moves: list[tuple[str, dict[str, Any]]] = []

    def to_host(self: TaskPrefix, **kwargs: Any) -> TaskPrefix:
        moves.append(("host", kwargs))
        return self

    def to(self: TaskPrefix, target: Any, dtype: Any = None, **kwargs: Any) -> TaskPrefix:
        moves.append((str(target), kwargs))
        return self

    monkeypatch.setattr(TaskPrefix, "to_host", to_host)
    monkeypatch.setattr(TaskPrefix, "to", to)
    one = _prefix("a").nbytes
    cache = TieredPrefixCache(torch.device(device), device_budget_bytes=one, host_budget_bytes=4 * one)
    cache.put(_prefix("a"))
    cache.put(_prefix("b"))  # evicts a to the host tier
    assert cache.tier("a") == "host"
    assert moves == [("host", {"pinned": pinned})]
    cache.get("a", load_from_disk=lambda: pytest.fail("a is in host memory"))  # back to the device
    assert moves[1] == (device, {"non_blocking": pinned})
    assert cache.tier("a") == "device" and cache.tier("b") == "host"


def test_unpinned_host_copy_is_a_real_cpu_copy() -> None:
    prefix = TaskPrefix("a", torch.arange(8.0).reshape(1, 2, 1, 4, 1), "sha")
    host = prefix.to_host(pinned=False)
    assert host.kv.device.type == "cpu" and torch.equal(host.kv, prefix.kv)


def test_the_counter_sees_a_host_sync() -> None:
    """The counter behind the step-loop tests can fail: an `.item()` or a tensor in an `if` is counted."""
    x = torch.ones(3)
    with HostSyncCounter() as counter:
        x.sum().item()
        if (x > 0).all():
            pass
        x.tolist()
    assert counter.count == 3, counter.calls


def _mixed_requests(model: torch.nn.Module) -> list[GenerationRequest]:
    """Rows that take every selection path: plain greedy with and without a prefix, a repetition penalty, seeded
    sampling with top-k/top-p, and a long prompt that prefills in chunks while others decode."""
    prefix = random_task_prefix(model, "task", 4, seed=0)
    other = random_task_prefix(model, "other", 7, seed=1)
    return [
        GenerationRequest([5, 6, 7, 8], prefix, SamplingParams(max_new_tokens=12)),
        GenerationRequest([9, 10], None, SamplingParams(max_new_tokens=12)),
        GenerationRequest([11, 12, 13], other, SamplingParams(max_new_tokens=12, repetition_penalty=1.3)),
        GenerationRequest(
            [14, 15, 16], prefix,
            SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=3),
        ),
        GenerationRequest(list(range(20, 60)), other, SamplingParams(max_new_tokens=12)),
    ]


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(tiny_llama(seed=0, initializer_range=0.5, max_position_embeddings=96), tiny_tokenizer(128))


def test_slot_layout_step_syncs_the_host_once(runner: ModelRunner) -> None:
    assert slots.slot_layout_supported(runner)
    scheduler = SlotScheduler(runner, SlotLimits(step_token_budget=16))
    batch = scheduler.batch
    requests = _mixed_requests(runner.model)
    for request in requests[:4]:
        batch.add(request)
    scheduler.step()  # prefill the first four
    batch.add(requests[4])  # its 40-token prompt prefills in chunks beside four decoding rows
    steps = 0
    with HostSyncCounter() as counter:
        for _ in range(6):
            scheduler.step()
            steps += 1
    assert any(r.prefilling for r in batch.rows) or all(r.cached > 4 for r in batch.rows)
    assert counter.count <= steps, counter.calls


def test_padded_layout_step_syncs_the_host_once_plus_transformers_mask_check(runner: ModelRunner) -> None:
    """The padded layout (the fallback) hands transformers a 2-D mask, and transformers' mask builder reads it back
    once per forward to see whether it may skip the mask (masking_utils); our own code syncs once per step."""
    batch = DecodeBatch.prefill(runner, _mixed_requests(runner.model))
    steps = 0
    with HostSyncCounter() as counter:
        for _ in range(6):
            batch.step()
            steps += 1
    ours = [call for call in counter.calls if "masking_utils.py" not in call]
    assert len(ours) <= steps, ours
    assert counter.count <= 2 * steps, counter.calls
