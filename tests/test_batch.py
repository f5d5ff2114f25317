"""The padded batch value (`service.batch.DecodeBatch`, the fallback layout): finished rows take their KV with them,
batches merge and every row continues exactly as it would alone. (Through the engine: test_engine.py; against PEFT:
test_parity.py.)"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from service.batch import DecodeBatch, generate
from service.prefix import TaskPrefix
from service.requests import GenerationRequest, SamplingParams
from service.runner import ModelRunner
from tests.helpers import random_task_prefix, tiny_llama, tiny_tokenizer

TASKS = {"beta": 9, "gamma": 2}  # task -> num_virtual_tokens


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(tiny_llama(seed=0, initializer_range=0.5, max_position_embeddings=512), tiny_tokenizer(128))


@pytest.fixture(scope="module")
def prefixes(runner: ModelRunner) -> dict[str, TaskPrefix]:
    return {task: random_task_prefix(runner.model, task, v, seed) for seed, (task, v) in enumerate(TASKS.items())}


def request(prefix: TaskPrefix | None, prompt: list[int], max_new_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(prompt, prefix, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))


def test_finished_rows_leave_the_cache(runner: ModelRunner, prefixes: dict[str, TaskPrefix]) -> None:
    batch = DecodeBatch.prefill(
        runner,
        [request(prefixes["beta"], [5, 6, 7, 8, 9, 10], max_new_tokens=1), request(prefixes["gamma"], [5], 5)],
    )
    width_before = batch.attention_mask.shape[1]
    finished = batch.pop_finished()
    assert len(finished) == 1 and len(batch) == 1
    keys = batch.cache.layers[0].keys
    assert keys.shape[0] == 1, "the finished row's KV is gone"
    assert keys.shape[2] == batch.attention_mask.shape[1] < width_before, "columns only it used are dropped"
    assert batch.attention_mask[:, 0].all(), "no leading padding is kept"


def test_concatenated_batches_continue_every_row_as_it_would_alone(
    runner: ModelRunner, prefixes: dict[str, TaskPrefix]
) -> None:
    requests = [
        request(prefixes["beta"], [5, 6, 7]),
        request(prefixes["gamma"], [8, 9, 10, 11, 12, 13, 14], max_new_tokens=5),
        request(None, [15]),
    ]
    first, second = DecodeBatch.prefill(runner, requests[:1]), DecodeBatch.prefill(runner, requests[1:])
    first.step()  # the batches are at different points of their generations when they merge
    merged = DecodeBatch.concatenate([first, second])
    assert len(merged) == 3
    assert merged.attention_mask.shape[1] == max(first.attention_mask.shape[1], second.attention_mask.shape[1])
    done = {}
    while len(merged):
        for row in merged.pop_finished():
            done[id(row.request)] = row.generated
        if len(merged):
            merged.step()
    alone = [generate(runner, [r])[0].token_ids for r in requests]
    assert [done[id(r)] for r in requests] == alone


def test_concatenate_refuses_nothing_and_returns_a_single_batch_as_is(runner: ModelRunner) -> None:
    only = DecodeBatch.prefill(runner, [request(None, [5, 6])])
    assert DecodeBatch.concatenate([only]) is only
    with pytest.raises(ValueError, match="nothing to concatenate"):
        DecodeBatch.concatenate([])


def test_probes_that_arrive_together_share_forwards_and_refuse_exactly_what_one_probe_refuses(
    runner: ModelRunner,
) -> None:
    """PrefixProber (the bulk import's probe): concurrent probes are taken together into one forward, and a prefix the
    model cannot compute with (finite values that overflow its norms) is refused with probe_prefix's own error, while
    the good prefixes batched beside it pass."""
    import threading

    import torch

    from service.batch import PrefixProber, probe_prefix
    from service.errors import InvalidPrefixError

    good = [random_task_prefix(runner.model, f"g{i}", 2 + i % 5, seed=i) for i in range(10)]
    bad = [TaskPrefix(f"b{i}", torch.full_like(good[i].kv, 1e30), f"b{i}") for i in range(2)]
    with pytest.raises(InvalidPrefixError) as alone:
        probe_prefix(runner, bad[0])
    prober = PrefixProber(runner, max_rows=8)
    outcomes: dict[str, str] = {}
    start = threading.Barrier(len(good) + len(bad))

    def probe(prefix: TaskPrefix) -> None:
        start.wait()
        try:
            prober(prefix)
            outcomes[prefix.task_id] = "ok"
        except InvalidPrefixError as exc:
            outcomes[prefix.task_id] = exc.message

    rows_per_forward = _run_threads_counting_rows(runner, 0.2, probe, good + bad)
    assert outcomes == {**{p.task_id: "ok" for p in good}, **{p.task_id: alone.value.message for p in bad}}
    assert max(rows_per_forward) > 1 and max(rows_per_forward) <= 8
    # 12 probes: far fewer forwards than one each, even counting the bad prefixes' confirmations alone
    assert len(rows_per_forward) < len(good) + len(bad)


def test_uploads_probing_one_task_after_another_keep_sharing_forwards(runner: ModelRunner) -> None:
    """A bulk import's workers each probe task after task: a worker whose row is done goes on to its next task at
    once, so every forward takes the rows queued behind the previous one (a prober that made each worker wait for
    the next forward before returning ran one row a forward: 20 tasks/s on SmolLM2)."""
    import threading

    from service.batch import PrefixProber

    workers, tasks_each = 8, 4
    prefixes = [[random_task_prefix(runner.model, f"w{w}t{t}", 3, seed=10 * w + t) for t in range(tasks_each)]
                for w in range(workers)]  # fmt: skip
    prober = PrefixProber(runner, max_rows=workers)
    start = threading.Barrier(workers)

    def work(mine: list[TaskPrefix]) -> None:
        start.wait()
        for prefix in mine:
            prober(prefix)

    rows_per_forward = _run_threads_counting_rows(runner, 0.05, work, prefixes)
    assert sum(rows_per_forward) == workers * tasks_each
    # one forward per wave of tasks, give or take a straggler's: not one forward per task
    assert len(rows_per_forward) <= 2 * tasks_each, rows_per_forward


def _run_threads_counting_rows(
    runner: ModelRunner, delay_s: float, target: Callable[[Any], None], args_each: Sequence[Any]
) -> list[int]:
    """Run `target(*args)` in a thread per entry of `args_each`, each forward slowed by `delay_s` (the first runs
    while the others queue up); returns the rows of every forward the model ran."""
    import threading

    from tests.helpers import slowed_forward

    rows_per_forward: list[int] = []
    hook = runner.model.register_forward_pre_hook(
        lambda _module, args, kwargs: rows_per_forward.append(int(kwargs["input_ids"].shape[0])), with_kwargs=True
    )
    try:
        with slowed_forward(runner.model, delay_s):
            threads = [threading.Thread(target=target, args=(args,)) for args in args_each]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        hook.remove()
    return rows_per_forward
