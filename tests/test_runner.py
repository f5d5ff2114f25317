"""The frozen model's runner (`service.runner.ModelRunner`): which tokens end a row, what a forward returns, and what
an encoder-decoder model must declare to be served."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from service.errors import UnsupportedModelError
from service.runner import ModelRunner
from tests.helpers import EOS, tiny_llama, tiny_seq2seq, tiny_tokenizer


def test_eos_token_of_the_config_ends_rows() -> None:
    model = tiny_seq2seq("t5")
    runner = ModelRunner(model, tiny_tokenizer())
    assert EOS in runner.eos_token_ids


def test_every_end_of_sequence_id_of_the_generation_config_and_the_tokenizer_counts() -> None:
    model = tiny_llama(seed=0)
    model.generation_config.eos_token_id = [7, 9]  # e.g. an instruct model's <|im_end|> and <|endoftext|>
    assert ModelRunner(model, tiny_tokenizer()).eos_token_ids == {7, 9, EOS}


def test_the_pad_token_falls_back_to_eos() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    assert ModelRunner(tiny_llama(seed=0), tokenizer).pad_token_id == tokenizer.eos_token_id == EOS


def test_a_forward_returns_float32_logits_of_the_last_position_and_fills_the_cache() -> None:
    model = tiny_llama(seed=0).to(torch.bfloat16)
    runner = ModelRunner(model, tiny_tokenizer())
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    cache = DynamicCache()
    logits = runner.forward(ids, torch.ones_like(ids), torch.arange(3).expand(2, 3), cache)
    assert logits.shape == (2, model.config.vocab_size) and logits.dtype == torch.float32
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, -1].float()
    torch.testing.assert_close(logits, expected)
    assert cache.get_seq_length() == 3


def test_an_encoder_decoder_model_without_a_decoder_start_token_is_refused() -> None:
    model = tiny_seq2seq("t5")
    model.config.decoder_start_token_id = None
    model.generation_config.decoder_start_token_id = None
    with pytest.raises(UnsupportedModelError, match="decoder_start_token_id"):
        ModelRunner(model, tiny_tokenizer())


def test_an_encoder_decoder_runner_knows_its_decoders_kv_shape() -> None:
    model = tiny_seq2seq("bart")
    runner = ModelRunner(model, tiny_tokenizer())
    decoder = model.config
    assert runner.is_encoder_decoder and runner.decoder_layers == decoder.decoder_layers
    head_dim = decoder.d_model // decoder.decoder_attention_heads
    assert runner.decoder_kv_shape == (decoder.decoder_attention_heads, head_dim)
