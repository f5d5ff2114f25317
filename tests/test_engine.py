"""The continuous mixed-task engine: exactness under any batching, limits, cancellation, streaming, seeds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from service.batch import generate
from service.engine import ContinuousBatchingEngine, EngineLimits, FinalEvent, TokenEvent
from service.errors import DeadlineExceededError, OverloadedError, RequestTooLongError, ServiceError
from service.geometry import geometry_from_config
from service.prefix import TaskPrefix
from service.registry import PrefixRegistry
from service.requests import FinishReason, GenerationRequest, GenerationResult, SamplingParams
from service.runner import ModelRunner
from service.startup import check_model
from tests.helpers import (
    make_engine, make_peft_prefix_model, read_adapter, run_engine, save_adapter, slowed_forward, tiny_llama,
    tiny_tokenizer,
)

TASKS = {"alpha": 4, "beta": 9, "gamma": 2, "delta": 6}  # task -> num_virtual_tokens


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelRunner, dict[str, TaskPrefix]]:
    tmp = tmp_path_factory.mktemp("engine")
    model = tiny_llama(seed=0, initializer_range=0.5, max_position_embeddings=512)
    registry = PrefixRegistry(
        tmp / "store", geometry_from_config(model.config), device=torch.device("cpu"), dtype=torch.float32,
        served_model_name="tiny", max_virtual_tokens=64, max_prefix_bytes=1 << 24, max_config_bytes=1 << 16,
    )
    for seed, (task, v) in enumerate(TASKS.items()):
        save_adapter(make_peft_prefix_model(model, num_virtual_tokens=v, seed=seed), tmp / task)
        registry.put(task, *read_adapter(tmp / task))
    return ModelRunner(model, tiny_tokenizer(128)), {t: registry.get(t) for t in TASKS}


def request(prefixes: dict[str, TaskPrefix], task: str | None, prompt: list[int], **params: Any) -> GenerationRequest:
    params.setdefault("max_new_tokens", 8)
    return GenerationRequest(prompt, prefixes[task] if task else None, SamplingParams(**params))


def alone(runner: ModelRunner, req: GenerationRequest) -> GenerationResult:
    return generate(runner, [GenerationRequest(req.prompt_ids, req.prefix, req.params)])[0]


def test_join_mid_flight_of_other_tasks_long_generations_is_exact(setup) -> None:
    runner, prefixes = setup
    engine = make_engine(runner, policy="mixed")
    long_ones = [request(prefixes, t, [10 + i, 11, 12, 13], max_new_tokens=60) for i, t in enumerate(["beta", "gamma", "delta"])]
    probe = request(prefixes, "alpha", [40, 41, 42], max_new_tokens=10)

    async def scenario() -> tuple[list[GenerationResult], GenerationResult]:
        running = [asyncio.create_task(engine.generate(r)) for r in long_ones]
        while engine.stats.steps < 5:  # the long generations are decoding
            await asyncio.sleep(0.001)
        probe_result = await engine.generate(probe)
        return await asyncio.gather(*running), probe_result

    long_results, probe_result = run_engine(engine, scenario)
    assert probe_result.token_ids == alone(runner, probe).token_ids
    assert engine.stats.max_batch_rows_seen == 4, "the probe joined the running batch"
    for req, result in zip(long_ones, long_results):
        assert result.token_ids == alone(runner, req).token_ids


def test_per_task_policy_batches_one_task_and_is_exact(setup) -> None:
    runner, prefixes = setup
    engine = make_engine(runner, policy="per-task", limits=EngineLimits(per_task_window_s=0.05))
    reqs = [request(prefixes, t, [5 + i, 6, 7 + i]) for i, t in enumerate(["alpha", "beta", "alpha", "beta", "alpha"])]

    async def scenario() -> list[GenerationResult]:
        return await asyncio.gather(*(engine.generate(r) for r in reqs))

    results = run_engine(engine, scenario)
    assert [r.token_ids for r in results] == [alone(runner, r).token_ids for r in reqs]
    assert engine.stats.batches_started == 2, "one static batch per task"
    assert engine.stats.max_batch_rows_seen == 3


def test_fifty_concurrent_mixed_requests_none_lost_or_duplicated(setup) -> None:
    runner, prefixes = setup
    engine = make_engine(runner, policy="mixed", limits=EngineLimits(max_running_rows=12, max_prefill_rows=5))
    tasks = list(TASKS) + [None]
    reqs = [
        request(prefixes, tasks[i % len(tasks)], [3 + (i * 7) % 120, 3 + (i * 11) % 120, 3 + i], max_new_tokens=2 + i % 9)
        for i in range(50)
    ]

    async def scenario() -> list[GenerationResult]:
        async def staggered(i: int, r: GenerationRequest) -> GenerationResult:
            await asyncio.sleep(0.002 * (i % 7))
            return await engine.generate(r)

        return await asyncio.gather(*(staggered(i, r) for i, r in enumerate(reqs)))

    results = run_engine(engine, scenario)
    assert len(results) == 50
    expected = [r.token_ids for r in generate(runner, [GenerationRequest(q.prompt_ids, q.prefix, q.params) for q in reqs])]
    assert [r.token_ids for r in results] == expected
    assert engine.stats.finished == 50
    assert engine.stats.running_rows == 0, "finished rows leave the batch"


def test_full_queue_is_refused_with_retry_after(setup) -> None:
    runner, prefixes = setup
    engine = make_engine(runner, limits=EngineLimits(max_waiting=2))  # not started: nothing drains

    async def scenario() -> None:
        engine.stream(request(prefixes, "alpha", [5]))
        engine.stream(request(prefixes, "alpha", [6]))
        with pytest.raises(OverloadedError) as info:
            engine.stream(request(prefixes, "alpha", [7]))
        assert info.value.status_code == 429 and info.value.details["retry_after_s"] >= 1

    asyncio.run(scenario())


def test_request_over_the_kv_budget_is_refused(setup) -> None:
    runner, prefixes = setup
    engine = make_engine(runner, limits=EngineLimits(max_kv_tokens=20))

    async def scenario() -> None:
        with pytest.raises(RequestTooLongError, match="KV budget"):
            engine.stream(request(prefixes, "beta", [5, 6, 7], max_new_tokens=10))  # 9 + 3 + 10 > 20

    asyncio.run(scenario())


def test_kv_budget_bounds_running_rows(setup) -> None:
    runner, prefixes = setup
    # Each request reserves 2 + 3 + 10 = 15 KV tokens: a budget of 40 runs at most two at once.
    engine = make_engine(runner, limits=EngineLimits(max_kv_tokens=40))
    reqs = [request(prefixes, "gamma", [5, 6, 7 + i], max_new_tokens=10) for i in range(5)]

    async def scenario() -> list[GenerationResult]:
        return await asyncio.gather(*(engine.generate(r) for r in reqs))

    results = run_engine(engine, scenario)
    assert engine.stats.max_batch_rows_seen == 2
    assert [r.token_ids for r in results] == [alone(runner, r).token_ids for r in reqs]


def test_disconnected_stream_cancels_its_row(setup) -> None:
    runner, prefixes = setup
    engine = make_engine(runner)

    async def scenario() -> None:
        events = engine.stream(request(prefixes, "alpha", [5, 6], max_new_tokens=400))
        seen = 0
        async for event in events:
            seen += 1
            if seen == 3:
                break
        await events.aclose()  # what the server does when the client goes away
        for _ in range(500):
            if engine.stats.cancelled == 1 and engine.stats.running_rows == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the row was not retired")

    run_engine(engine, scenario)
    assert engine.stats.steps < 300, "decoding stopped long before max_new_tokens"


def test_deadline_fails_the_request(setup) -> None:
    runner, prefixes = setup
    engine = make_engine(runner, limits=EngineLimits(request_timeout_s=0.05))

    async def scenario() -> None:
        with pytest.raises(DeadlineExceededError):
            await engine.generate(request(prefixes, "alpha", [5, 6], max_new_tokens=400))

    # Make 400 tokens take far longer than the deadline, whichever layout runs the model.
    with slowed_forward(runner.model, 0.01):
        run_engine(engine, scenario)


def test_stream_events_add_up_to_the_final_text(setup) -> None:
    runner, prefixes = setup
    engine = make_engine(runner)
    req = request(prefixes, "delta", [8, 9, 10], max_new_tokens=12)

    async def scenario() -> list:
        return [event async for event in engine.stream(req)]

    events = run_engine(engine, scenario)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    final = events[-1]
    assert isinstance(final, FinalEvent)
    assert [t.token_id for t in tokens] == final.result.token_ids
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert "".join(t.text for t in tokens).strip() == final.result.text
    assert final.result.token_ids == alone(runner, req).token_ids


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(setup) -> None:
    runner, prefixes = setup
    sampled = request(prefixes, "alpha", [5, 6, 7], max_new_tokens=16, do_sample=True, temperature=1.3, top_k=40,
                      top_p=0.9, repetition_penalty=1.2, seed=77)
    busy = [request(prefixes, t, [20 + i, 21], max_new_tokens=30, do_sample=i % 2 == 0, seed=i)
            for i, t in enumerate(["beta", "gamma", "delta", "beta"])]

    engine_alone = make_engine(runner)
    lone = run_engine(engine_alone, lambda: engine_alone.generate(sampled))

    engine = make_engine(runner)

    async def crowded() -> GenerationResult:
        others = [asyncio.create_task(engine.generate(r)) for r in busy]
        while engine.stats.steps < 3:
            await asyncio.sleep(0.001)
        rows_when_joined = 0
        async for event in engine.stream(sampled):
            rows_when_joined = rows_when_joined or engine.stats.running_rows
            if isinstance(event, FinalEvent):
                result = event.result
        await asyncio.gather(*others)
        assert rows_when_joined >= 2, "the sampled request shared its batch with others"
        return result

    in_batch = run_engine(engine, crowded)
    assert in_batch.token_ids == lone.token_ids
    assert in_batch.seed == 77


def test_unseeded_sampling_reports_the_seed_it_used(setup) -> None:
    runner, prefixes = setup
    engine = make_engine(runner)
    req = request(prefixes, "alpha", [5, 6], max_new_tokens=10, do_sample=True)
    first = run_engine(engine, lambda: engine.generate(req))
    assert first.seed is not None
    replay = request(prefixes, "alpha", [5, 6], max_new_tokens=10, do_sample=True, seed=first.seed)
    engine2 = make_engine(runner)
    assert run_engine(engine2, lambda: engine2.generate(replay)).token_ids == first.token_ids
    assert first.finish_reason in (FinishReason.LENGTH, FinishReason.EOS_TOKEN)


@pytest.mark.parametrize("layout", ["slots", "padded"])
@pytest.mark.parametrize("value", [1e30, 1e38])
def test_non_finite_logits_fail_only_their_own_request(setup, layout: str, value: float) -> None:
    """A prefix whose finite values overflow the model's computation (stored before uploads were probed) makes its
    rows' logits NaN: those requests fail with an error naming the problem instead of returning token 0 repeated,
    and the rows sharing their forward passes (another task, the bare model, a sampled row) answer exactly as alone.
    1e38: even the keys' dot products overflow, so a neighbour's masked attention scores must stay -inf, not NaN."""
    runner, prefixes = setup
    g = geometry_from_config(runner.model.config)
    overflowing = TaskPrefix("overflow", torch.full((g.num_layers, 2, g.num_kv_heads, 3, g.head_dim), value), "sha")
    bad = [GenerationRequest([40, 41, 42], overflowing, SamplingParams(max_new_tokens=6)),
           GenerationRequest([9, 8], overflowing, SamplingParams(max_new_tokens=6, do_sample=True, seed=3))]
    good = [request(prefixes, "alpha", [40, 41, 42], max_new_tokens=6), request(prefixes, None, [7, 8]),
            request(prefixes, "beta", [5, 6], max_new_tokens=6, do_sample=True, seed=5)]  # fmt: skip
    engine = make_engine(runner, policy="mixed", layout=layout)

    async def scenario() -> list[Any]:
        # The overflowing prefix first: slot layout, bank column 0, where other rows' padding columns point.
        mixed = [bad[0], good[0], good[1], bad[1], good[2]]
        return await asyncio.gather(*(engine.generate(r) for r in mixed), return_exceptions=True)

    results = run_engine(engine, scenario)
    assert engine.stats.max_batch_rows_seen == 5, "all rows shared the forward passes"
    for failed in (results[0], results[3]):
        assert isinstance(failed, ServiceError) and failed.code == "non_finite_logits", failed
        assert failed.status_code == 422 and "overflow" in failed.message and "NaN" in failed.message
    for req, result in zip(good, (results[1], results[2], results[4])):
        assert isinstance(result, GenerationResult), result
        assert result.token_ids == alone(runner, req).token_ids
    assert engine.stats.failed_rows == 2


@pytest.mark.parametrize("policy", ["mixed", "per-task"])
def test_constructing_the_engine_runs_no_forward(setup, policy: str) -> None:
    """The start-up checks run forwards (service.startup.check_model, called where the service is built); the engine
    constructor takes the chosen layout and runs none."""
    runner, _ = setup
    layout = check_model(runner, geometry_from_config(runner.model.config), policy)  # type: ignore[arg-type]
    assert layout == ("slots" if policy == "mixed" else "padded")
    calls = []
    hook = runner.model.get_input_embeddings().register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        engine = ContinuousBatchingEngine(runner, policy=policy, limits=EngineLimits(), layout=layout)  # type: ignore[arg-type]
    finally:
        hook.remove()
    assert calls == [] and engine.layout == layout


def test_the_engine_refuses_a_layout_the_start_up_checks_did_not_choose(setup) -> None:
    runner, _ = setup
    with pytest.raises(ValueError, match="check_model"):
        ContinuousBatchingEngine(runner, layout="auto")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mixed policy"):
        ContinuousBatchingEngine(runner, policy="per-task", layout="slots")
    fresh = ModelRunner(tiny_llama(seed=1), tiny_tokenizer(128))  # never checked: no slot attention installed
    with pytest.raises(ValueError, match="check_model"):
        ContinuousBatchingEngine(fresh, layout="slots")
