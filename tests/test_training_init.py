"""Real-word initialisation (service/training/trainer.py `init_from_text`, `--init-text`) and the low-data sweep's
table (service/training/sweep.py), on a tiny random model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.cli import main as cli_main
from service.model_loader import LoadedModel, wrap_model
from service.settings import Settings
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
        cached = prompt.layers[layer]  # a transformers Cache
        keys, values = cached.keys, cached.values
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


# ---------------------------------------------------------------------------------------------------------------------
# The CLI: train --init-text writes task.json with the template it trained with; upload sends it; upload --text


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's `loaded` model (same seed and config) saved as a local HF directory, for the CLI's --model."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(seed=0, initializer_range=0.5, max_position_embeddings=96).save_pretrained(path)
    tiny_tokenizer(128).save_pretrained(path)
    return path


@pytest.fixture
def client(loaded: LoadedModel, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(prefix_dir=tmp_path / "store"), loaded)) as test_client:
        yield test_client


def test_cli_train_with_init_text_writes_and_uploads_the_template(
    tiny_model_dir: Path, client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"t{20 + i} t{40 + i}", "label": "t9"}) for i in range(8)) + "\n")
    monkeypatch.setattr(httpx, "post", lambda url, timeout=None, **kwargs: client.post(url, **kwargs))
    out = tmp_path / "adapter"
    code = cli_main([
        "train", "--data", str(data), "--task-id", "init-task", "--out", str(out), "--model", str(tiny_model_dir),
        "--template", "t60 {text} t61", "--init-text", INIT_TEXT, "--description", "tiny task", "--steps", "2",
        "--no-progress", "--log-level", "warning", "--upload", "http://testserver",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert json.loads((out / "task.json").read_text()) == {
        "format_version": 1, "prompt_template": "t60 {inputs} t61", "description": "tiny task", "source": "adapter",
    }  # fmt: skip
    log = json.loads((out / "training_log.json").read_text())
    assert log["config"]["init"] == "text" and log["config"]["prefix_projection"] is False
    assert json.loads((out / "adapter_config.json").read_text())["num_virtual_tokens"] == 5  # the init text's tokens
    record = client.get("/prefixes/init-task").json()
    assert (record["prompt_template"], record["description"], record["num_virtual_tokens"]) == (
        "t60 {inputs} t61", "tiny task", 5,
    )  # fmt: skip

    # --init-task starts from a stored prefix; a conflicting --num-virtual-tokens is refused before training.
    store = tmp_path / "store"
    code = cli_main([
        "train", "--data", str(data), "--task-id", "again", "--out", str(tmp_path / "again"),
        "--model", str(tiny_model_dir), "--init-task", "init-task", "--prefix-dir", str(store), "--steps", "1",
        "--no-progress", "--log-level", "warning",
    ])  # fmt: skip
    assert code == 0
    assert json.loads((tmp_path / "again" / "training_log.json").read_text())["config"]["init"] == "task:init-task"
    code = cli_main([
        "train", "--data", str(data), "--task-id", "bad", "--out", str(tmp_path / "bad"), "--model",
        str(tiny_model_dir), "--init-text", INIT_TEXT, "--num-virtual-tokens", "9", "--log-level", "warning",
    ])  # fmt: skip
    assert code == 2 and "differs from the initial prefix's length 5" in capsys.readouterr().err


def test_cli_upload_text_file(client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(httpx, "post", lambda url, timeout=None, **kwargs: client.post(url, **kwargs))
    text_file = tmp_path / "block.txt"
    text_file.write_text(INIT_TEXT, encoding="utf-8")
    code = cli_main([
        "upload", "--text", str(text_file), "--task-id", "from-text", "--prompt-template", "t60 {inputs}",
        "--url", "http://testserver",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    body = json.loads(printed)
    assert (body["source"], body["num_virtual_tokens"], body["prompt_template"]) == ("text", 5, "t60 {inputs}")
    assert cli_main(["upload", "--task-id", "x", "--url", "http://testserver"]) == 2  # neither a dir nor --text
