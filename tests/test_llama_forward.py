"""The slot layout's own llama forward (`service.llama_forward`): it serves exactly transformers' llama modules, holds
the weights once, and computes what transformers' forward computes through the same slot attention."""

from __future__ import annotations

import pytest
import torch

from service import slots
from service.llama_forward import llama_slot_forward
from service.requests import GenerationRequest, SamplingParams
from service.runner import ModelRunner
from service.scheduling.slot_schedule import SlotLimits, schedule_step
from tests.helpers import random_task_prefix, tiny_decoder, tiny_llama, tiny_tokenizer


def test_only_transformers_own_llama_modules_get_the_own_forward() -> None:
    assert llama_slot_forward(tiny_llama(seed=0)) is not None
    assert llama_slot_forward(tiny_decoder("qwen2-gqa")) is None, "another family, even of llama's shape"
    assert llama_slot_forward(tiny_decoder("gpt2")) is None


def test_the_fused_projections_are_the_models_own_weights_held_once() -> None:
    model = tiny_llama(seed=0, attention_bias=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.tensor([[5, 9, 12, 7]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    forward = llama_slot_forward(model)
    assert forward is not None and llama_slot_forward(model) is forward, "built once per model"
    attention = model.model.layers[0].self_attn
    fused = forward.layers[0].qkv
    assert attention.q_proj.weight.data_ptr() == fused.weight.data_ptr(), "q_proj is a view of the fused weight"
    assert attention.k_proj.bias.data_ptr() == fused.bias.data_ptr() + attention.q_proj.bias.numel() * 4
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), f"{name} changed"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_through_the_own_forward_gives_transformers_logits(dtype: torch.dtype) -> None:
    """The same mixed steps (prefill chunks, then decoding rows of two tasks and one without a prefix) run by two slot
    batches, one with the own forward and one with transformers' forward over the same slot attention."""
    reference_model = tiny_llama(seed=0, initializer_range=0.5).to(dtype)
    own_model = tiny_llama(seed=0, initializer_range=0.5).to(dtype)
    runners = [ModelRunner(m, tiny_tokenizer(128)) for m in (reference_model, own_model)]
    assert all(slots.slot_layout_supported(r) for r in runners)
    prefixes = [random_task_prefix(reference_model, t, v, seed) for seed, (t, v) in enumerate({"a": 3, "b": 5}.items())]
    requests = [
        GenerationRequest([5, 6, 7, 8], prefixes[0], SamplingParams(max_new_tokens=4)),
        GenerationRequest([9, 10], prefixes[1], SamplingParams(max_new_tokens=4)),
        GenerationRequest([11, 12, 13], None, SamplingParams(max_new_tokens=4)),
    ]
    limits = SlotLimits(num_slots=4, max_kv_tokens=1 << 12, step_token_budget=64)
    batches = [slots.SlotBatch(r, limits.num_slots) for r in runners]
    batches[0]._own_forward = None  # transformers' forward
    assert batches[1]._own_forward is not None
    rows = [[b.add(r) for r in requests] for b in batches]
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    for _ in range(4):
        for batch in batches:
            batch.execute(schedule_step(batch.rows, limits))
        reference, own = (b.last_logits.float() for b in batches)
        torch.testing.assert_close(own, reference, rtol=tolerance, atol=tolerance * float(reference.abs().max()))
    if dtype == torch.float32:
        assert [r.generated for r in rows[1]] == [r.generated for r in rows[0]]
