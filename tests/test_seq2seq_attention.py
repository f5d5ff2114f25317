"""The encoder-decoder attention plumbing (`service.seq2seq_attention`): installed on a model it changes nothing
without a plan, installs once, and a plan is seen only by forwards run inside its block. (The encoder prefix against
the paper's formula, and PEFT parity: test_seq2seq.py.)"""

from __future__ import annotations

import torch

from service.runner import ModelRunner
from service.seq2seq_attention import Seq2SeqPlan, _current_plan, active_plan, install
from tests.helpers import tiny_seq2seq, tiny_tokenizer

PROMPT = [5, 9, 12, 7, 3, 44, 2]


def test_without_a_plan_the_model_computes_what_sdpa_computes() -> None:
    model = tiny_seq2seq("t5")
    reference = tiny_seq2seq("t5")
    ModelRunner(model, tiny_tokenizer())  # installs the attention function
    ids, decoder = torch.tensor([PROMPT]), torch.tensor([[0, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, decoder_input_ids=decoder).logits,
            reference(input_ids=ids, decoder_input_ids=decoder).logits,
        )


def test_installing_twice_hooks_the_decoder_positions_once() -> None:
    model = tiny_seq2seq("bart")
    install(model)
    install(model)
    positions = model.get_decoder().embed_positions
    assert len(positions._forward_hooks) == 1
    assert model.config._attn_implementation == "prefix_serve_seq2seq"


def test_a_plan_sets_bart_decoder_positions_per_row() -> None:
    model = tiny_seq2seq("bart")
    install(model)
    ids, decoder = torch.tensor([PROMPT]), torch.tensor([[0, 5]])
    with torch.no_grad():
        plain = model(input_ids=ids, decoder_input_ids=decoder).logits
        with active_plan(Seq2SeqPlan(decoder_positions=torch.tensor([[0, 1]]))):
            same = model(input_ids=ids, decoder_input_ids=decoder).logits
        with active_plan(Seq2SeqPlan(decoder_positions=torch.tensor([[4, 5]]))):  # as behind a 4-token prefix
            shifted = model(input_ids=ids, decoder_input_ids=decoder).logits
    torch.testing.assert_close(same, plain)
    assert not torch.allclose(shifted, plain)
    assert _current_plan() is None, "the plan ends with its block"
