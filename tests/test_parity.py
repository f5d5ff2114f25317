"""Parity with PEFT: the service's greedy tokens equal a greedy loop over PEFT's own forward.

Why a loop over `PeftModel.forward` and not `PeftModel.generate`: on transformers 5.24 PEFT's generate silently
drops the prefix (the cache argument was renamed), while its forward still injects it. The reference runs each
prompt alone, unpadded; the service must match it at batch 1 and in left-padded batches of unequal prompts, with
one task or with several tasks of different prefix lengths in one batch — in both batch layouts: `slots` (the
engine's own KV store, prefix shared per task, fused prefill) and `padded` (transformers' cache, the fallback).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedModel

from service import slots
from service.scheduling.slots import generate as slots_generate
from service.batch import generate as padded_generate, verify_prefix_support
from service.geometry import geometry_from_config
from service.registry import PrefixRegistry
from service.requests import GenerationRequest, SamplingParams
from service.runner import ModelRunner
from tests.helpers import (
    TINY_DECODER_SPECS,
    make_peft_prefix_model,
    peft_greedy,
    read_adapter,
    save_adapter,
    tiny_decoder,
    tiny_tokenizer,
)

VOCAB = 128
# Tiny random decoder-only models of every listed family. initializer_range is raised so that a random prefix
# clearly changes the output (at the default 0.02 a tiny bloom's argmax ignores it and the test could not fail).
ARCHITECTURES = TINY_DECODER_SPECS  # one list of tiny model families, in tests/helpers.py
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3, 4, 5, 6], [20]]
NEW_TOKENS = 8


def registry_with(tmp_path: Path, model: PreTrainedModel, adapters: dict[str, PeftModel]) -> PrefixRegistry:
    registry = PrefixRegistry(
        tmp_path / "store",
        geometry_from_config(model.config),
        device=torch.device("cpu"),
        dtype=torch.float32,
        served_model_name="tiny",
        max_virtual_tokens=64,
        max_prefix_bytes=1 << 24,
        max_config_bytes=1 << 16,
    )
    for task_id, peft_model in adapters.items():
        save_adapter(peft_model, tmp_path / task_id)
        registry.put(task_id, *read_adapter(tmp_path / task_id))
    return registry


LAYOUTS = ["padded", "slots"]
FALLS_BACK_TO_PADDED = {"bloom"}  # ALiBi inside bloom's own attention: the slot attention cannot serve it


def generate(runner: ModelRunner, requests: list[GenerationRequest], layout: str, arch: str):
    """Run the requests as one batch in `layout`; for an architecture the slot layout refuses, check that it does."""
    if layout == "slots":
        if arch in FALLS_BACK_TO_PADDED:
            assert not slots.slot_layout_supported(runner), f"{arch} was expected to fall back to the padded layout"
            pytest.skip(f"{arch} is served by the padded layout (checked above)")
        assert slots.slot_layout_supported(runner), f"{arch} should run in the slot layout"
        # A small step budget makes longer prompts prefill in several chunks.
        return slots_generate(runner, requests, step_token_budget=5)
    return padded_generate(runner, requests)


def run_service(runner: ModelRunner, prefix, prompts: list[list[int]], layout: str, arch: str) -> list[list[int]]:
    requests = [GenerationRequest(p, prefix, SamplingParams(max_new_tokens=NEW_TOKENS)) for p in prompts]
    return [r.token_ids for r in generate(runner, requests, layout, arch)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_greedy_tokens_match_peft_forward(arch: str, layout: str, tmp_path: Path) -> None:
    model = tiny_decoder(arch, vocab_size=VOCAB)
    peft_model = make_peft_prefix_model(model, num_virtual_tokens=6, seed=1)
    registry = registry_with(tmp_path, model, {"task": peft_model})
    runner = ModelRunner(model, tiny_tokenizer(VOCAB))
    verify_prefix_support(runner, geometry_from_config(model.config))
    prefix = registry.get("task")

    expected = [peft_greedy(peft_model, p, NEW_TOKENS) for p in PROMPTS]
    base = [peft_greedy(model, p, NEW_TOKENS) for p in PROMPTS]
    assert expected != base, "the prefix must change the output, or this test could not fail"

    alone = [run_service(runner, prefix, [p], layout, arch)[0] for p in PROMPTS]
    assert alone == expected
    batched = run_service(runner, prefix, PROMPTS, layout, arch)  # batch 4, unequal prompts
    assert batched == expected


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2", "bloom", "opt", "gpt_neox", "qwen2-gqa"])
def test_mixed_tasks_with_different_prefix_lengths_share_a_batch(arch: str, layout: str, tmp_path: Path) -> None:
    model = tiny_decoder(arch, vocab_size=VOCAB)
    long_prefix = make_peft_prefix_model(model, num_virtual_tokens=9, seed=2)
    short_prefix = make_peft_prefix_model(model, num_virtual_tokens=3, seed=3, prefix_projection=True)
    registry = registry_with(tmp_path, model, {"long": long_prefix, "short": short_prefix})
    runner = ModelRunner(model, tiny_tokenizer(VOCAB))

    tasks = ["long", "short", None, "short", "long"]
    prompts = PROMPTS + [[7, 7, 8]]
    references = {"long": long_prefix, "short": short_prefix, None: model}
    expected = [peft_greedy(references[t], p, NEW_TOKENS) for t, p in zip(tasks, prompts)]

    requests = [
        GenerationRequest(p, registry.get(t) if t else None, SamplingParams(max_new_tokens=NEW_TOKENS))
        for t, p in zip(tasks, prompts)
    ]
    assert [r.token_ids for r in generate(runner, requests, layout, arch)] == expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_finish_independently_and_keep_their_tokens(layout: str, tmp_path: Path) -> None:
    """Rows with different max_new_tokens leave the batch early; the rest continue unchanged."""
    model = tiny_decoder("llama-gqa", vocab_size=VOCAB)
    peft_model = make_peft_prefix_model(model, num_virtual_tokens=4, seed=5)
    registry = registry_with(tmp_path, model, {"task": peft_model})
    runner = ModelRunner(model, tiny_tokenizer(VOCAB))
    lengths = [1, 8, 3, 5]
    requests = [
        GenerationRequest(p, registry.get("task"), SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, lengths)
    ]
    results = generate(runner, requests, layout, "llama-gqa")
    for prompt, n, result in zip(PROMPTS, lengths, results):
        assert result.token_ids == peft_greedy(peft_model, prompt, n)
        assert result.finish_reason.value == "length"
