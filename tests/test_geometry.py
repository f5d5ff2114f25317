"""Prefix geometry derivation and the start-up check that refuses models a PEFT prefix cannot fit."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from service.batch import generate as generate_padded, verify_prefix_support
from service.errors import UnsupportedModelError
from service.geometry import geometry_from_config
from service.runner import ModelRunner
from tests.helpers import tiny_tokenizer


def config(model_type: str, **kwargs):
    return AutoConfig.for_model(model_type, vocab_size=128, **kwargs)


@pytest.mark.parametrize(
    ("model_type", "kwargs", "expected"),
    [
        # GQA: PEFT sizes the prefix by KV heads (token_dim = kv_heads * head_dim).
        ("llama", dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30), (30, 3, 64)),
        ("gpt2", dict(n_embd=32, n_head=4, n_layer=2), (2, 4, 8)),
        ("bloom", dict(hidden_size=32, n_head=4, n_layer=3), (3, 4, 8)),
        ("qwen2", dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2), (2, 2, 8)),
        # An explicit head_dim wins over hidden_size / heads.
        ("llama", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2), (2, 2, 16)),
    ],
)
def test_geometry_follows_peft(model_type: str, kwargs: dict, expected: tuple[int, int, int]) -> None:
    geometry = geometry_from_config(config(model_type, **kwargs))
    assert (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim) == expected
    assert geometry.token_dim == expected[1] * expected[2]
    assert geometry.numbers_per_virtual_token == expected[0] * 2 * geometry.token_dim


def test_smollm2_geometry_matches_notes() -> None:
    geometry = geometry_from_config(
        config("llama", hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)
    )
    assert geometry.token_dim == 192 and geometry.numbers_per_virtual_token == 11520


def test_sliding_window_caps_the_context() -> None:
    """Past the window, the model would evict prefix slots; the service refuses such requests instead."""
    geometry = geometry_from_config(
        config("mistral", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
               sliding_window=16, max_position_embeddings=4096)
    )
    assert geometry.max_positions == 16


def test_encoder_decoder_geometry_describes_the_decoder() -> None:
    """PEFT's seq2seq prefix reaches the decoder's self-attention only: its layers, heads and head size count."""
    t5 = geometry_from_config(config("t5", d_model=32, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=3))
    assert (t5.num_layers, t5.encoder_num_layers, t5.num_kv_heads, t5.head_dim) == (3, 2, 4, 16)
    assert t5.is_encoder_decoder and t5.token_dim == 64  # heads x d_kv, not d_model
    bart = geometry_from_config(
        config("bart", d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, max_position_embeddings=64)
    )
    assert (bart.num_layers, bart.encoder_num_layers, bart.head_dim, bart.max_positions) == (2, 3, 8, 64)


def test_unserved_encoder_decoder_families_are_rejected() -> None:
    with pytest.raises(UnsupportedModelError, match="encoder-decoder models served are"):
        geometry_from_config(config("pegasus"))
    with pytest.raises(UnsupportedModelError, match="head counts differ"):
        geometry_from_config(config("bart", encoder_attention_heads=4, decoder_attention_heads=2, d_model=32))


# Families whose KV layout is not simply "one head per query head": the premise (does PEFT's prefix shape match the
# model's cache?) is asked of the installed transformers and PEFT, not assumed; it moved for falcon in 5.25.
KV_LAYOUT_CASES = {
    "falcon-multi-query": ("falcon", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "falcon-multi-head": ("falcon", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=False)),
    "falcon-new-architecture": ("falcon", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               new_decoder_architecture=True, num_kv_heads=2)),
    "gpt_bigcode-multi-query": ("gpt_bigcode", dict(n_embd=32, n_layer=2, n_head=4, multi_query=True)),
    "gpt_bigcode-multi-head": ("gpt_bigcode", dict(n_embd=32, n_layer=2, n_head=4, multi_query=False)),
    # A stored num_key_value_heads against the model's own rule: PEFT takes 2 heads, the model caches 1 (refused).
    "gpt_bigcode-stated-kv-heads": ("gpt_bigcode", dict(n_embd=32, n_layer=2, n_head=4, multi_query=True,
                                                        num_key_value_heads=2)),
    "llama-gqa": ("llama", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=64)),
}  # fmt: skip


def _peft_prefix_shape(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the prefix PEFT itself builds, trains and saves for this model."""
    import copy

    from peft import PrefixTuningConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    cfg = peft_model.peft_config["default"]
    return cfg.num_layers, cfg.num_attention_heads, cfg.token_dim // cfg.num_attention_heads


def _model_cache_shape(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the cache the installed transformers builds for this model."""
    out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    keys = cache.layers[0].keys
    return len(cache.layers), int(keys.shape[1]), int(keys.shape[3])


@pytest.mark.parametrize("case", list(KV_LAYOUT_CASES))
def test_a_model_is_served_exactly_when_its_cache_fits_peft_prefix(case: str, tmp_path) -> None:
    """The server's geometry is PEFT's; where the model caches that shape it is served PEFT-exact, where it does not
    it is refused at start with a message naming the model type and both shapes."""
    from service.registry import PrefixRegistry
    from service.requests import GenerationRequest, SamplingParams
    from service.scheduling.slots import generate as slots_generate
    from service.slots import slot_layout_supported
    from tests.helpers import make_peft_prefix_model, peft_greedy, read_adapter, save_adapter

    model_type, kwargs = KV_LAYOUT_CASES[case]
    cfg = config(model_type, initializer_range=0.5, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    peft_shape, cache_shape = _peft_prefix_shape(model), _model_cache_shape(model)
    geometry = geometry_from_config(cfg)
    assert (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim) == peft_shape
    runner = ModelRunner(model, tiny_tokenizer())
    if cache_shape != peft_shape:
        with pytest.raises(UnsupportedModelError) as refused:
            verify_prefix_support(runner, geometry)
        assert model_type in str(refused.value)
        assert str(cache_shape) in str(refused.value) and str(peft_shape) in str(refused.value)
        return
    verify_prefix_support(runner, geometry)
    peft_model = make_peft_prefix_model(model, num_virtual_tokens=4, seed=1)
    registry = PrefixRegistry(
        tmp_path / "store", geometry, device=torch.device("cpu"), dtype=torch.float32, served_model_name="tiny",
        max_virtual_tokens=64, max_prefix_bytes=1 << 24, max_config_bytes=1 << 16,
    )
    save_adapter(peft_model, tmp_path / "adapter")
    registry.put("task", *read_adapter(tmp_path / "adapter"))
    prompts = [[5, 6, 7, 8], [9, 10]]
    expected = [peft_greedy(peft_model, p, 6) for p in prompts]
    assert expected != [peft_greedy(model, p, 6) for p in prompts], "the prefix must change the output"
    requests = [GenerationRequest(p, registry.get("task"), SamplingParams(max_new_tokens=6)) for p in prompts]
    if slot_layout_supported(runner):
        assert [r.token_ids for r in slots_generate(runner, requests)] == expected
    assert [r.token_ids for r in generate_padded(runner, requests)] == expected


def test_a_prefix_shape_the_model_does_not_cache_is_refused_naming_both_shapes() -> None:
    """The server's rule whatever the installed versions do: a geometry that differs from the model's cache (here one
    that claims 4 KV heads where the model caches 2) is refused at start, not reshaped into something else."""
    import dataclasses

    llama = config("llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                   intermediate_size=64)
    model = AutoModelForCausalLM.from_config(llama).eval()
    wrong = dataclasses.replace(geometry_from_config(llama), num_kv_heads=4)
    with pytest.raises(UnsupportedModelError, match=r"llama: the model caches .* = \(2, 2, 8\) but a PEFT prefix .* \(2, 4, 8\)"):
        verify_prefix_support(ModelRunner(model, tiny_tokenizer()), wrong)


def test_model_that_ignores_the_prefix_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    llama = config("llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                   intermediate_size=64)
    model = AutoModelForCausalLM.from_config(llama).eval()
    runner = ModelRunner(model, tiny_tokenizer())
    real_forward = runner.forward

    def forward_dropping_prefix(input_ids, attention_mask, position_ids, cache):
        logits = real_forward(input_ids, attention_mask, position_ids, cache)
        return torch.zeros_like(logits)  # as if the prefix had no effect at all

    monkeypatch.setattr(runner, "forward", forward_dropping_prefix)
    with pytest.raises(UnsupportedModelError, match="ignores the prefix"):
        verify_prefix_support(runner, geometry_from_config(llama))
