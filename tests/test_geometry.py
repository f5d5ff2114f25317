"""Prefix geometry derivation and the start-up check that refuses models a PEFT prefix cannot fit."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from service.batch import ModelRunner, verify_prefix_support
from service.errors import UnsupportedModelError
from service.geometry import geometry_from_config
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


def test_model_whose_kv_shape_differs_from_peft_geometry_is_rejected_at_start() -> None:
    """Multi-query falcon keeps 1 KV head while PEFT's rule gives it one per query head: refuse, don't serve wrong."""
    falcon = config("falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(falcon).eval()
    with pytest.raises(UnsupportedModelError, match="falcon"):
        verify_prefix_support(ModelRunner(model, tiny_tokenizer()), geometry_from_config(falcon))


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
