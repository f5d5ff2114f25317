"""Real-word initialisation (service/training/trainer.py `init_from_text`, `--init-text`) and the low-data sweep's
table (service/training/sweep.py), on a tiny random model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.model_loader import LoadedModel, wrap_model
from service.text_prefix import text_kv, text_prompt_embeddings
from service.training.data import Example
from service.training.sweep import SweepRow, markdown_table
from service.training.trainer import (
    TrainConfig,
    _wrap,
    init_from_adapter_dir,
    init_from_text,
    save_adapter,
    train_prefix,
)
from tests.helpers import tiny_llama, tiny_tokenizer

INIT_TEXT = "t5 t9 t14 t3 t22"


def _fresh() -> LoadedModel:
    # PEFT wraps the model it trains: each test gets its own.
    return wrap_model(tiny_llama(seed=0, initializer_range=0.5, max_position_embeddings=96), tiny_tokenizer(), "tiny")


def test_initial_prefix_equals_the_activations_of_the_init_text() -> None:
    loaded = _fresh()
    ids = loaded.tokenizer(INIT_TEXT)["input_ids"]
    init = init_from_text(loaded, INIT_TEXT)
    assert tuple(init.shape) == (5, loaded.geometry.numbers_per_virtual_token)
    assert torch.equal(init, text_prompt_embeddings(loaded.model, ids, loaded.geometry))

    config = TrainConfig(num_virtual_tokens=5, prefix_projection=False, init="text")
    peft_model = _wrap(loaded, config, init)
    # What PEFT would save (and serve) before any step is exactly the init...
    with torch.no_grad():
        saved = peft_model.get_prompt_embedding_to_save("default")
        assert torch.equal(saved, init)
        # ...and what PEFT feeds the model as its cache are the model's own keys/values of the text, layer by layer.
        prompt = peft_model.get_prompt(batch_size=1)
    kv = text_kv(loaded.model, ids, loaded.geometry)  # (L, 2, H, V, D)
    for layer in range(loaded.geometry.num_layers):
        keys, values = (prompt.layers[layer].keys, prompt.layers[layer].values) if hasattr(prompt, "layers") else prompt[layer]
        assert torch.allclose(keys[0], kv[layer, 0]) and torch.allclose(values[0], kv[layer, 1])

    # And PEFT's forward with that prefix predicts what the base model predicts after the text itself.
    x = loaded.tokenizer("t30 t31")["input_ids"]
    with torch.no_grad():
        with_prefix = peft_model(input_ids=torch.tensor([x]), attention_mask=torch.ones(1, len(x))).logits[0, -1]
        concatenated = loaded.model(input_ids=torch.tensor([ids + x])).logits[0, -1]
    assert torch.allclose(with_prefix, concatenated, atol=1e-4)


def test_training_from_an_init_runs_and_saves_a_servable_adapter(tmp_path: Path) -> None:
    loaded = _fresh()
    init = init_from_text(loaded, INIT_TEXT)
    examples = [Example(prompt=f"t{i} t{i + 1}", completion=f" t{i + 2}") for i in range(10, 30)]
    config = TrainConfig(
        num_virtual_tokens=5, prefix_projection=False, init="text", steps=3, batch_size=4, lr=1e-2, progress=False
    )
    result = train_prefix(loaded, examples, config, eval_examples=examples[:4], task_id="init", init_embeddings=init)
    assert len(result.losses) == 3 and result.final_exact_match is not None
    assert not torch.equal(result.prompt_embeddings(), init)  # it trained
    out = save_adapter(result, tmp_path / "adapter", loaded)
    # The saved prefix can itself be an init (--init-task).
    again = init_from_adapter_dir(out, loaded)
    assert torch.equal(again, result.prompt_embeddings())


def test_init_with_the_mlp_or_a_wrong_shape_is_refused() -> None:
    loaded = _fresh()
    init = init_from_text(loaded, INIT_TEXT)
    examples = [Example(prompt="t10 t11", completion=" t12")]
    with pytest.raises(ValueError, match="prefix_projection=False"):
        train_prefix(loaded, examples, TrainConfig(num_virtual_tokens=5, steps=1), init_embeddings=init)
    with pytest.raises(ValueError, match="shape"):
        train_prefix(
            loaded, examples, TrainConfig(num_virtual_tokens=6, prefix_projection=False, steps=1), init_embeddings=init
        )


def test_sweep_table_has_one_column_per_init() -> None:
    rows = [
        SweepRow("sentiment", 8, init, 20, 1e-3, 16, correct, 32, 0.1, 1.0)
        for init, correct in (("random", 10), ("mlp", 30), ("text", 31))
    ]
    table = markdown_table(rows)
    assert table.splitlines()[0] == "| task | train examples | random K/V | MLP (reparam.) | real words (instruction) |"
    assert table.splitlines()[2] == "| sentiment | 8 | 10/32 | 30/32 | 31/32 |"
