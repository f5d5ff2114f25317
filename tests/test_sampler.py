"""Per-row token selection (`service.sampler.RowSampler`): transformers' own processors, a seeded row draws the same
tokens every time, an unseeded row reports the seed it drew with, and extreme parameters never fail the batch.
(Seeds inside busy batches, end to end: test_engine.py.)"""

from __future__ import annotations

import torch
from transformers import RepetitionPenaltyLogitsProcessor

from service.requests import SamplingParams
from service.sampler import RowSampler

CPU = torch.device("cpu")


def draws(sampler: RowSampler, logits: torch.Tensor, n: int = 20) -> list[int]:
    history = torch.tensor([[1, 2, 3]])
    return [int(sampler.select_tensor(history, logits)) for _ in range(n)]


def flat_logits(vocab: int = 50) -> torch.Tensor:
    return torch.zeros((1, vocab))  # every token equally likely: draws depend on the generator alone


def test_plain_greedy_needs_no_per_row_pass() -> None:
    sampler = RowSampler(SamplingParams(), CPU)
    assert sampler.is_plain_greedy and sampler.seed is None and sampler.generator is None
    assert not RowSampler(SamplingParams(repetition_penalty=1.3), CPU).is_plain_greedy
    assert not RowSampler(SamplingParams(do_sample=True), CPU).is_plain_greedy


def test_greedy_with_a_repetition_penalty_is_transformers_processor_then_argmax() -> None:
    sampler = RowSampler(SamplingParams(repetition_penalty=4.0), CPU)
    history = torch.tensor([[3]])
    logits = torch.tensor([[0.0, 1.0, 0.0, 3.0]])
    expected = RepetitionPenaltyLogitsProcessor(4.0)(history, logits.clone()).argmax()
    assert int(sampler.select_tensor(history, logits)) == int(expected) == 1, "token 3's lead is penalised away"


def test_a_seeded_row_draws_the_same_tokens_every_time() -> None:
    params = SamplingParams(do_sample=True, seed=1234)
    first, second = draws(RowSampler(params, CPU), flat_logits()), draws(RowSampler(params, CPU), flat_logits())
    assert first == second and len(set(first)) > 1, "the same seed, the same (non-constant) draws"
    other = draws(RowSampler(SamplingParams(do_sample=True, seed=1235), CPU), flat_logits())
    assert other != first


def test_an_unseeded_row_reports_the_seed_that_reproduces_it() -> None:
    sampler = RowSampler(SamplingParams(do_sample=True), CPU)
    assert isinstance(sampler.seed, int)
    replay = RowSampler(SamplingParams(do_sample=True, seed=sampler.seed), CPU)
    assert draws(sampler, flat_logits()) == draws(replay, flat_logits())


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.9, -5.0]])
    assert set(draws(RowSampler(SamplingParams(do_sample=True, top_k=1, seed=0), CPU), logits)) == {1}
    nucleus = draws(RowSampler(SamplingParams(do_sample=True, top_p=0.6, seed=0), CPU), logits, n=50)
    assert set(nucleus) <= {1, 2} and len(set(nucleus)) == 2


def test_extreme_parameters_take_the_greedy_limit_instead_of_failing() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.9, -5.0]])
    sampler = RowSampler(SamplingParams(do_sample=True, temperature=1e-300, seed=0), CPU)
    assert set(draws(sampler, logits)) == {1}, "sampling as the temperature tends to 0 is greedy"
