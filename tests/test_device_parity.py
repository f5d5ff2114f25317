"""PEFT parity on the serving device and dtype: float32 token for token, bfloat16 within its documented agreement.

CI runs this on the CPU; the GPU check (benchmarks/gpu/check.sh) runs the same tests with
PREFIX_SERVE_TEST_DEVICE=cuda. Models: a random SmolLM2-135M-shaped Llama (30 layers, GQA 9/3, vocab 49,152) and
three tiny families. The reference is a greedy loop over PEFT's own forward (no cache) on the same device and dtype,
one prompt at a time; the service runs the prompts as one left-padded batch of unequal lengths in each layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

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
    tiny_tokenizer,
)

DEVICE = torch.device(os.environ.get("PREFIX_SERVE_TEST_DEVICE", "cpu"))
NEW_TOKENS = 8
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3, 4, 5, 6], [20, 21, 22]]
# bfloat16 keeps 8 bits of mantissa: the service (its own attention kernel, batched, left-padded) and PEFT's forward
# (sdpa, alone) round differently, so a near-tie can flip a greedy token (and everything after it). Required in
# bfloat16: where a prompt's tokens first differ, the reference's own logits had the service's token within this
# fraction of the logits' spread (std) of its top token: a rounding-sized tie, not a wrong prefix.
# A random token's gap is ~4 std below the top one for a 49,152-token vocabulary; rounding-sized gaps measured here
# on the CPU reach ~0.05.
BF16_TIE_TOLERANCE = 0.15

SMOLLM2_SHAPE = dict(
    model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
    rms_norm_eps=1e-5, rope_theta=100000.0,
)  # fmt: skip
# The whole depth on a GPU (or with PREFIX_SERVE_TEST_FULL_SHAPES=1); on a CPU, 4 of its 30 layers keep CI's time
# (every width, the GQA grouping and the vocabulary stay).
FULL_SHAPES = DEVICE.type == "cuda" or os.environ.get("PREFIX_SERVE_TEST_FULL_SHAPES") == "1"
MODELS = {
    "smollm2-shape": SMOLLM2_SHAPE | ({} if FULL_SHAPES else {"num_hidden_layers": 4}),
    **{arch: TINY_DECODER_SPECS[arch] | {"vocab_size": 128} for arch in ("llama-gqa", "gpt2", "gpt_neox")},
}
LAYOUTS = ("slots", "padded")
DTYPES = (torch.float32, torch.bfloat16)


def _model(name: str, dtype: torch.dtype) -> PreTrainedModel:
    spec = dict(MODELS[name])
    model_type = spec.pop("model_type")
    # A large init scale so a random prefix clearly changes the output (tiny: 0.5; 30 layers deep: 0.1 stays finite).
    scale = 0.1 if name == "smollm2-shape" else 0.5
    config = AutoConfig.for_model(model_type, initializer_range=scale, **spec)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(dtype).eval()


def _service_tokens(model: PreTrainedModel, tmp_path: Path, peft_model, layout: str) -> list[list[int]]:
    registry = PrefixRegistry(
        tmp_path / "store", geometry_from_config(model.config), device=DEVICE, dtype=model.dtype,
        served_model_name="parity", max_virtual_tokens=64, max_prefix_bytes=1 << 28, max_config_bytes=1 << 16,
    )
    save_adapter(peft_model, tmp_path / "adapter")
    registry.put("task", *read_adapter(tmp_path / "adapter"))
    runner = ModelRunner(model, tiny_tokenizer(128))
    verify_prefix_support(runner, geometry_from_config(model.config))
    prefix = registry.get("task")
    assert prefix.kv.device.type == DEVICE.type and prefix.kv.dtype == model.dtype
    requests = [GenerationRequest(p, prefix, SamplingParams(max_new_tokens=NEW_TOKENS)) for p in PROMPTS]
    if layout == "slots":
        assert slots.slot_layout_supported(runner)
        results = slots_generate(runner, requests, step_token_budget=5)  # longer prompts prefill in chunks
    else:
        results = padded_generate(runner, requests)
    return [r.token_ids for r in results]


def _first_disagreement_gaps(peft_model, got: list[list[int]], expected: list[list[int]]) -> list[float]:
    """For each prompt whose tokens differ: the reference's logit gap (top minus the service's token) at the first
    difference, in units of the logits' std."""
    gaps = []
    device = next(peft_model.parameters()).device
    for prompt, g, e in zip(PROMPTS, got, expected):
        t = next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), None)
        if t is None:
            continue
        ids = torch.tensor([prompt + e[:t]], device=device)
        with torch.inference_mode():
            logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
        gaps.append(float((logits[e[t]] - logits[g[t]]) / logits.std()))
    return gaps


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_tokens_match_peft_on_the_serving_device(name: str, layout: str, dtype: torch.dtype, tmp_path: Path) -> None:
    model, peft_model, expected = _reference(name, dtype)
    got = _service_tokens(model, tmp_path, peft_model, layout)
    if dtype == torch.float32:
        assert got == expected
    else:
        gaps = _first_disagreement_gaps(peft_model, got, expected)
        assert all(gap <= BF16_TIE_TOLERANCE for gap in gaps), (gaps, got, expected)


_REFERENCES: dict[tuple[str, torch.dtype], tuple[PreTrainedModel, object, list[list[int]]]] = {}


def _reference(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, object, list[list[int]]]:
    """The model, its PEFT twin and PEFT's greedy tokens, built once per model and dtype (both layouts use them)."""
    key = (name, dtype)
    if key not in _REFERENCES:
        _REFERENCES.clear()  # one model in memory at a time
        model = _model(name, dtype)
        peft_model = make_peft_prefix_model(model, num_virtual_tokens=6, seed=1)
        expected = [peft_greedy(peft_model, p, NEW_TOKENS) for p in PROMPTS]
        base = [peft_greedy(model, p, NEW_TOKENS) for p in PROMPTS]
        assert expected != base, "the prefix must change the output, or this test could not fail"
        _REFERENCES[key] = (model, peft_model, expected)
    return _REFERENCES[key]
