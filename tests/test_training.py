"""Prefix training (`prefix-serve train`): artifacts, learning, API round trip, data errors, NaN guard, examples.

Everything but the last test runs on a tiny random Llama with the word-level test tokenizer ("t5 t6" <-> [5, 6]), so
the file stays well under a minute on CPU. The slow test checks the shipped example prefixes on the embedded model.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.cli import main as cli_main
from service.model_loader import LoadedModel, wrap_model
from service.registry import CONFIG_FILE, WEIGHTS_FILE
from service.runner import ModelRunner
from service.settings import Settings
from service.training.data import Example, apply_template, load_examples
from service.training.errors import DataError, TrainingDivergedError
from service.training.evaluate import exact_match, open_registry, prefix_from_adapter_dir, prefix_from_embeddings
from service.training.examples import COMPLAINT_WORDS, EXAMPLE_TASKS, SENTIMENT_WORDS
from service.training.report import eval_items
from service.training.trainer import TrainConfig, save_adapter, train_prefix
from tests.helpers import read_adapter, tiny_llama, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
ANSWER = " t9 t10"
# initializer_range 0.1: large enough that the model is not near-uniform, small enough for a prefix to steer it fast.
TINY = {"initializer_range": 0.1, "max_position_embeddings": 96}
FAST = {"num_virtual_tokens": 4, "lr": 0.1, "eval_every": 0, "progress": False}


def tiny_loaded() -> LoadedModel:
    return wrap_model(tiny_llama(seed=0, **TINY), tiny_tokenizer(128), "tiny-llama")


def constant_task(n: int, seed: int = 0) -> list[Example]:
    """Prompts of 2-6 random words, all answered " t9 t10": learnable by a prefix in a few dozen steps."""
    rng = random.Random(seed)
    return [
        Example(" ".join(f"t{rng.randint(20, 120)}" for _ in range(rng.randint(2, 6))), ANSWER, line=i + 1)
        for i in range(n)
    ]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy CPU two threads waiting for each other are several
    times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_loaded()


@pytest.fixture(scope="module")
def trained(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory):
    """One short training run shared by the artifact and round-trip tests: (result, adapter dir, examples)."""
    examples = constant_task(8)
    result = train_prefix(loaded, examples, TrainConfig(steps=60, **FAST), eval_examples=examples, task_id="tiny")
    out = save_adapter(result, tmp_path_factory.mktemp("adapter") / "tiny", loaded)
    return result, out, examples


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model and tokenizer saved as a local HF directory, for the CLI's --model."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(seed=0, **TINY).save_pretrained(path)
    tiny_tokenizer(128).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Training


def test_training_writes_an_adapter_the_registry_accepts(loaded: LoadedModel, trained, tmp_path: Path) -> None:
    result, out, _ = trained
    assert {CONFIG_FILE, WEIGHTS_FILE, "training_log.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert config["prefix_projection"] is True and config["num_virtual_tokens"] == 4
    assert config["base_model_name_or_path"] == "tiny-llama"

    registry = open_registry(tmp_path / "store", loaded)
    record, created, warnings = registry.put("tiny", *read_adapter(out))
    assert created and warnings == [] and record.num_virtual_tokens == 4
    # What the registry serves is exactly what training evaluated (PEFT runs the MLP at save time).
    expected = prefix_from_embeddings("tiny", result.prompt_embeddings(), loaded).kv
    assert torch.equal(registry.get("tiny").kv, expected)
    assert torch.equal(prefix_from_adapter_dir(out, "tiny", loaded).kv, expected)

    log = json.loads((out / "training_log.json").read_text())
    assert log["total_steps"] == 60 and len(log["losses"]) == 60 and log["evals"][-1]["step"] == 60
    assert 0 < result.trainable_params < result.all_params


def test_base_model_is_left_untouched(trained, loaded: LoadedModel) -> None:
    reference = tiny_llama(seed=0, **TINY)
    for (name, param), (_, ref) in zip(loaded.model.named_parameters(), reference.named_parameters()):
        assert torch.equal(param, ref), name
        assert not param.requires_grad, name
    assert not loaded.model.training


def test_loss_decreases_on_a_fixed_batch(loaded: LoadedModel) -> None:
    examples = constant_task(8, seed=1)  # one batch of 8: every step sees the same examples
    result = train_prefix(loaded, examples, TrainConfig(steps=15, batch_size=8, **FAST))
    losses = result.losses
    assert losses[-1] < 0.7 * losses[0] and losses[-1] < losses[len(losses) // 2] < losses[0], losses


def test_training_is_reproducible(loaded: LoadedModel) -> None:
    examples = constant_task(12, seed=2)
    config = dict(steps=5, batch_size=4, seed=7, **FAST)
    first = train_prefix(loaded, examples, TrainConfig(**config)).prompt_embeddings()
    second = train_prefix(loaded, examples, TrainConfig(**config)).prompt_embeddings()
    assert torch.equal(first, second)


def test_nan_loss_stops_training_with_a_clear_message(tmp_path: Path) -> None:
    model = tiny_llama(seed=0, **TINY)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")  # one poisoned logit makes the log-softmax NaN
    poisoned = wrap_model(model, tiny_tokenizer(128), "tiny-llama")
    with pytest.raises(TrainingDivergedError, match=r"step 1/10: the loss became nan.*Lower --lr"):
        train_prefix(poisoned, constant_task(8), TrainConfig(steps=10, **FAST))


# ---------------------------------------------------------------------------------------------------------------------
# The artifact through the HTTP API


@pytest.fixture
def client(loaded: LoadedModel, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(prefix_dir=tmp_path / "store", batch_window_ms=5)
    with TestClient(create_app(settings, loaded)) as test_client:
        yield test_client


def test_trained_adapter_round_trips_through_the_api(client: TestClient, trained, loaded: LoadedModel) -> None:
    result, out, examples = trained
    config, weights = read_adapter(out)
    response = client.post(
        "/prefixes",
        data={"task_id": "tiny"},
        files={
            "adapter_config": ("adapter_config.json", config),
            "adapter_model": ("adapter_model.safetensors", weights),
        },
    )
    assert response.status_code == 201, response.text

    # /generate answers exactly as the training run's own engine-path evaluation did, prompt by prompt.
    evaluated = {p.prompt: p.generated for p in result.final_exact_match.predictions}
    assert result.final_exact_match.correct >= 6, result.final_exact_match.to_json()
    for example in examples:
        body = client.post(
            "/generate", json={"task_id": "tiny", "inputs": example.prompt, "parameters": {"max_new_tokens": 6}}
        )
        assert body.status_code == 200, body.text
        assert body.json()["generated_text"] == evaluated[example.prompt]
    right = [e for e in examples if evaluated[e.prompt].strip() == e.answer]
    answer = client.post("/generate", json={"task_id": "tiny", "inputs": right[0].prompt}).json()
    assert answer["generated_text"].strip() == "t9 t10" and answer["details"]["finish_reason"] == "eos_token"


def test_cli_train_upload_and_eval(
    tiny_model_dir: Path, client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`prefix-serve train ... --upload URL` end to end (the upload goes to the in-process app), then `eval`."""
    examples = constant_task(8)
    data = write_jsonl(
        tmp_path / "train.jsonl", [json.dumps({"prompt": e.prompt, "completion": e.completion}) for e in examples]
    )
    monkeypatch.setattr(httpx, "post", lambda url, timeout=None, **kwargs: client.post(url, **kwargs))
    out = tmp_path / "adapter"
    code = cli_main([
        "train", "--data", str(data), "--eval-data", str(data), "--task-id", "cli-task", "--out", str(out),
        "--model", str(tiny_model_dir), "--steps", "60", "--lr", "0.1", "--num-virtual-tokens", "4",
        "--no-progress", "--log-level", "warning", "--upload", "http://testserver",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"saved the prefix of task 'cli-task' to {out}" in printed and '"task_id": "cli-task"' in printed
    assert [p["task_id"] for p in client.get("/prefixes").json()["prefixes"]] == ["cli-task"]
    reply = client.post("/generate", json={"task_id": "cli-task", "inputs": examples[0].prompt}).json()
    assert "generated_text" in reply

    report = tmp_path / "eval.json"
    code = cli_main([
        "eval", "--data", str(data), "--adapter", str(out), "--model", str(tiny_model_dir), "--json", str(report),
        "--log-level", "warning",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and "| zero-shot (same prompt) | with prefix |" in printed.replace("held-out n | ", "")
    results = json.loads(report.read_text())["tasks"][0]
    assert results["prefix"]["total"] == 8 and results["prefix"]["correct"] > results["zero_shot"]["correct"]


# ---------------------------------------------------------------------------------------------------------------------
# Data errors


def test_data_errors_name_every_bad_line(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            '{"prompt": "a", "completion": " b"}',
            '{"prompt": "a"}',  # 2: no completion
            "{not json",  # 3
            "",  # blank lines are fine
            '["a", "b"]',  # 5: not an object
            '{"text": "great", "label": null}',  # 6
            '{"question": "q", "answer": "a"}',  # 7: unknown schema
            '{"prompt": 5, "completion": "x"}',  # 8: wrong type
            '{"prompt": "a", "completion": "   "}',  # 9: blank target
        ],
    )
    with pytest.raises(DataError) as caught:
        load_examples(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: 7 bad line(s):")
    for needle in [
        'line 2: missing field "completion"',
        "line 3: invalid JSON",
        "line 5: expected",
        "got a JSON array",
        'line 6: missing field "label"',
        "line 7: expected",
        "got keys ['answer', 'question']",
        'line 8: "prompt" must be a string, got a JSON number',
        'line 9: "completion" is blank',
    ]:
        assert needle in message, (needle, message)
    assert "line 1" not in message and "line 4" not in message


@pytest.mark.parametrize("content, needle", [("", "the file is empty"), ("\n  \n\n", "it has only blank lines")])
def test_empty_data_is_an_error(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=f"no examples \\({needle}\\)"):
        load_examples(path)


def test_cli_reports_bad_data_and_exits_2(tmp_path: Path, capsys) -> None:
    data = write_jsonl(
        tmp_path / "train.jsonl", ['{"prompt": "a", "completion": " b"}', '{"prompt": "a", "completion": ']
    )
    code = cli_main(
        ["train", "--data", str(data), "--task-id", "t", "--out", str(tmp_path / "out"), "--log-level", "error"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "line 2: invalid JSON" in err and not (tmp_path / "out").exists()
    code = cli_main(
        ["train", "--data", str(tmp_path / "missing.jsonl"), "--task-id", "t", "--out", "o", "--log-level", "error"]
    )
    assert code == 2 and "missing.jsonl: no such file" in capsys.readouterr().err
    code = cli_main(["train", "--data", str(data), "--task-id", "bad/id", "--out", "o", "--log-level", "error"])
    assert code == 2 and "invalid task id" in capsys.readouterr().err


def test_text_label_records_use_the_template(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "cls.jsonl", ['{"text": "I love it", "label": "positive"}', '{"text": "meh", "label": 0}']
    )
    first, second = load_examples(path, "Review : {text} Sentiment :")
    assert (first.prompt, first.completion, first.line) == ("Review : I love it Sentiment :", " positive", 1)
    assert (second.completion, second.answer) == (" 0", "0")
    # The PEFT guide's style, with the separator's space in the prompt: the label is learnt without one.
    assert apply_template("Tweet text : {text} Label : ", "hi", "complaint").completion == "complaint"
    with pytest.raises(DataError, match="must contain"):
        load_examples(path, "no placeholder")


def test_examples_that_do_not_fit_the_context_are_reported(loaded: LoadedModel) -> None:
    long = Example(" ".join(["t5"] * 100), " t9", line=3)
    with pytest.raises(DataError, match="line 3: 102 tokens"):
        train_prefix(loaded, [long], TrainConfig(steps=1, **FAST))


# ---------------------------------------------------------------------------------------------------------------------
# Example tasks


def test_example_data_is_deterministic_and_splits_are_disjoint(tmp_path: Path, capsys) -> None:
    assert set(EXAMPLE_TASKS) == {"sentiment", "complaints", "date-iso"}
    for task in EXAMPLE_TASKS.values():
        train, heldout = task.examples("train"), task.examples("heldout")
        assert train == task.examples("train") and len(train) == task.train_size and len(heldout) == task.heldout_size
        assert not {e.prompt for e in train} & {e.prompt for e in heldout}
    # Held-out material is new: every word list is split into disjoint parts; no held-out date shares its year.
    for pools in (SENTIMENT_WORDS, COMPLAINT_WORDS):
        for key, heldout_part in pools["heldout"].items():
            assert heldout_part and pools["train"][key] and not set(heldout_part) & set(pools["train"][key]), key
    year = lambda e: e.answer[:4]
    dates = EXAMPLE_TASKS["date-iso"]
    assert not {year(e) for e in dates.examples("train")} & {year(e) for e in dates.examples("heldout")}

    assert cli_main(["examples", "make-data", str(tmp_path)]) == 0
    written = load_examples(tmp_path / "sentiment" / "heldout.jsonl", EXAMPLE_TASKS["sentiment"].template or "")
    assert [(e.prompt, e.completion) for e in written] == [
        (e.prompt, e.completion) for e in EXAMPLE_TASKS["sentiment"].examples("heldout")
    ]
    assert "prefix-serve train --data" in capsys.readouterr().out


@pytest.mark.slow
def test_shipped_example_prefixes_answer_held_out_prompts(embedded_model: LoadedModel, tmp_path: Path) -> None:
    """The committed prefixes/ load into a registry and solve held-out prompts through the serving engine."""
    store = tmp_path / "prefixes"
    shutil.copytree(REPO / "prefixes", store)  # load_all may tidy its root; never touch the repository's copy
    registry = open_registry(store, embedded_model)
    assert set(EXAMPLE_TASKS) <= {r.task_id for r in registry.list()}
    runner = ModelRunner(embedded_model.model, embedded_model.tokenizer)
    for task in EXAMPLE_TASKS.values():
        items = eval_items(task.examples("heldout")[:8], runner)
        prefixed = exact_match(runner, items, registry.get(task.task_id))
        assert prefixed.correct == prefixed.total, (task.task_id, prefixed.to_json())
        bare = exact_match(runner, items, None)
        assert bare.correct < prefixed.correct, (task.task_id, bare.to_json())
