"""Tasks made from text (service/text_prefix.py): the prefix is the model's own K/V of the text, so greedy output of
(task from T, inputs x) equals the base model's greedy output of T + x; the API stores, replaces, deletes and
downloads such tasks like any other, and PEFT loads the download."""

from __future__ import annotations

import copy
import io
import json
import zipfile
from pathlib import Path
from typing import Iterator

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel

from service import cli
from service.api.app import create_app
from service.batch import generate
from service.geometry import geometry_from_config
from service.model_loader import LoadedModel
from service.prefix import prompt_embeddings_to_kv
from service.registry import PrefixRegistry, TaskInfo
from service.requests import GenerationRequest, SamplingParams
from service.runner import ModelRunner
from service.settings import Settings
from service.text_prefix import kv_to_prompt_embeddings, make_text_adapter, text_kv
from tests.helpers import TINY_DECODER_SPECS, ThreadedServer, peft_greedy, tiny_decoder, tiny_tokenizer

VOCAB = 128
NEW_TOKENS = 8
TEXT = " ".join(f"t{i}" for i in [5, 9, 14, 3, 22, 40, 7, 61, 33, 12, 90, 4])  # 12 tokens
INPUTS = ["t30 t31 t32", "t70", "t8 t9 t10 t11 t12 t13"]


def _registry(tmp_path: Path, model) -> PrefixRegistry:
    return PrefixRegistry(
        tmp_path / "store",
        geometry_from_config(model.config),
        device=torch.device("cpu"),
        dtype=torch.float32,
        served_model_name="tiny",
        max_virtual_tokens=4,  # below the text's length: a task made from text has its own, larger limit
        max_prefix_bytes=1 << 20,
        max_config_bytes=1 << 16,
        max_text_tokens=64,
    )


def test_kv_layout_round_trips_with_the_registry_conversion() -> None:
    model = tiny_decoder("llama-gqa")
    geometry = geometry_from_config(model.config)
    kv = text_kv(model, [5, 6, 7, 8], geometry)
    assert tuple(kv.shape) == (geometry.num_layers, 2, geometry.num_kv_heads, 4, geometry.head_dim)
    embeddings = kv_to_prompt_embeddings(kv)
    assert tuple(embeddings.shape) == (4, geometry.numbers_per_virtual_token)
    back = prompt_embeddings_to_kv(embeddings, geometry, dtype=torch.float32, device="cpu")
    assert torch.equal(back, kv)


@pytest.mark.parametrize("arch", list(TINY_DECODER_SPECS))
def test_text_task_greedy_equals_base_model_on_the_concatenated_prompt(arch: str, tmp_path: Path) -> None:
    model = tiny_decoder(arch)
    tokenizer = tiny_tokenizer(VOCAB)
    geometry = geometry_from_config(model.config)
    made = make_text_adapter(model, tokenizer, geometry, TEXT, base_model_name_or_path="tiny", max_tokens=64)
    assert made.num_tokens == 12
    registry = _registry(tmp_path, model)
    registry.put("text-task", made.config_bytes, made.weights_bytes, info=TaskInfo(source="text", text=TEXT))
    prefix = registry.get("text-task")
    assert prefix.num_virtual_tokens == 12

    text_ids = tokenizer(TEXT)["input_ids"]
    prompts = [tokenizer(x)["input_ids"] for x in INPUTS]
    expected = [peft_greedy(model, text_ids + p, NEW_TOKENS) for p in prompts]
    without = [peft_greedy(model, p, NEW_TOKENS) for p in prompts]
    assert expected != without, "the text must change the output, or this test could not fail"

    runner = ModelRunner(model, tokenizer)
    alone = [generate(runner, [GenerationRequest(p, prefix, SamplingParams(max_new_tokens=NEW_TOKENS))])[0].token_ids
             for p in prompts]  # fmt: skip
    assert alone == expected
    # In one left-padded batch with the bare model's rows: still exact.
    requests = [GenerationRequest(p, prefix, SamplingParams(max_new_tokens=NEW_TOKENS)) for p in prompts]
    requests.append(GenerationRequest(prompts[0], None, SamplingParams(max_new_tokens=NEW_TOKENS)))
    batched = [r.token_ids for r in generate(runner, requests)]
    assert batched == expected + [without[0]]


@pytest.mark.slow
def test_text_task_is_exact_on_the_embedded_model(embedded_model: LoadedModel, tmp_path: Path) -> None:
    loaded = embedded_model
    text = (
        "Translate English to French.\nsea otter => loutre de mer\ncheese => fromage\nplush giraffe => girafe en "
        "peluche\n"
    )
    made = make_text_adapter(
        loaded.model, loaded.tokenizer, loaded.geometry, text, base_model_name_or_path=loaded.name, max_tokens=512
    )
    registry = PrefixRegistry(
        tmp_path / "store", loaded.geometry, device=loaded.device, dtype=loaded.dtype, served_model_name=loaded.name,
        max_virtual_tokens=20, max_prefix_bytes=1 << 24, max_config_bytes=1 << 16, max_text_tokens=512,
    )  # fmt: skip
    registry.put("fr", made.config_bytes, made.weights_bytes, info=TaskInfo(source="text", text=text))
    runner = ModelRunner(loaded.model, loaded.tokenizer)
    text_ids = loaded.tokenizer(text)["input_ids"]
    inputs = ["cat =>", "blue car =>", "good morning =>"]
    prefix = registry.get("fr")
    greedy = SamplingParams(max_new_tokens=8)
    requests = [GenerationRequest(loaded.tokenizer(x)["input_ids"], prefix, greedy) for x in inputs]
    results = [r.token_ids for r in generate(runner, requests)]
    for x, got in zip(inputs, results):
        concatenated = text_ids + loaded.tokenizer(x)["input_ids"]
        assert loaded.tokenizer(text + x)["input_ids"] == concatenated  # the text ends on a token boundary
        assert got == peft_greedy(loaded.model, concatenated, 8), x


# ---------------------------------------------------------------------------------------------------------------------
# Through the HTTP API


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(prefix_dir=tmp_path / "store", max_virtual_tokens=8, max_text_task_tokens=40)


@pytest.fixture
def client(settings: Settings, loaded: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_app(settings, loaded)) as test_client:
        yield test_client


def _greedy(client: TestClient, task_id: str, inputs: str, n: int = NEW_TOKENS) -> str:
    body = {"task_id": task_id, "inputs": inputs, "parameters": {"max_new_tokens": n}}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


def _base_text(loaded: LoadedModel, prompt: str, n: int = NEW_TOKENS) -> str:
    ids = peft_greedy(loaded.model, loaded.tokenizer(prompt)["input_ids"], n)
    return loaded.tokenizer.decode(ids, skip_special_tokens=True)


def test_upload_text_generate_replace_delete(client: TestClient, loaded: LoadedModel) -> None:
    created = client.post("/prefixes", data={"task_id": "few-shot", "text": TEXT, "description": "a text task"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["num_virtual_tokens"] == 12 and body["source"] == "text" and body["description"] == "a text task"
    assert _greedy(client, "few-shot", "t30 t31") == _base_text(loaded, TEXT + " t30 t31")

    listed = client.get("/prefixes").json()["prefixes"]
    assert [(p["task_id"], p["source"], p["num_virtual_tokens"]) for p in listed] == [("few-shot", "text", 12)]

    again = client.post("/prefixes", data={"task_id": "few-shot", "text": "t1 t2"})
    assert again.status_code == 409, again.text
    other = "t50 t51 t52 t53 t54"
    replaced = client.post("/prefixes", data={"task_id": "few-shot", "text": other, "replace": "true"})
    assert replaced.status_code == 200 and replaced.json()["num_virtual_tokens"] == 5
    assert _greedy(client, "few-shot", "t30 t31") == _base_text(loaded, other + " t30 t31")

    assert client.delete("/prefixes/few-shot").status_code == 204
    assert client.post("/generate", json={"task_id": "few-shot", "inputs": "t30"}).status_code == 404


def test_text_over_the_limit_or_bad_is_refused_and_nothing_is_stored(client: TestClient, settings: Settings) -> None:
    long_text = " ".join(f"t{i % 100 + 3}" for i in range(41))  # 41 tokens, the limit is 40
    too_long = client.post("/prefixes", data={"task_id": "long", "text": long_text})
    assert too_long.status_code == 413, too_long.text
    assert "41 tokens" in too_long.json()["error"] and too_long.json()["field"] == "text"
    huge = client.post("/prefixes", data={"task_id": "long", "text": "t5 " * 1000})
    assert huge.status_code == 413, huge.text

    blank = client.post("/prefixes", data={"task_id": "blank", "text": "   "})
    assert blank.status_code == 422 and blank.json()["field"] == "text"
    bad_template = client.post("/prefixes", data={"task_id": "tpl", "text": "t5 t6", "prompt_template": "no slot"})
    assert bad_template.status_code == 422 and "{inputs}" in bad_template.json()["error"]
    bad_id = client.post("/prefixes", data={"task_id": "../x", "text": "t5 t6"})
    assert bad_id.status_code == 422
    both = client.post(
        "/prefixes", data={"task_id": "both", "text": "t5"}, files={"adapter_config": ("adapter_config.json", b"{}")}
    )
    assert both.status_code == 422 and "not both" in both.json()["error"]
    neither = client.post("/prefixes", data={"task_id": "neither"})
    assert neither.status_code == 422 and "adapter_config" in neither.json()["error"]

    assert client.get("/prefixes").json()["prefixes"] == []
    assert [p.name for p in settings.prefix_dir.iterdir()] == []


def test_text_task_counts_against_the_context(client: TestClient, settings: Settings) -> None:
    text = " ".join(f"t{i % 100 + 3}" for i in range(40))
    assert client.post("/prefixes", data={"task_id": "ctx", "text": text}).status_code == 201
    # 96 positions: 40 (text) + 30 (prompt) + 30 new tokens = 100 > 96.
    response = client.post(
        "/generate", json={"task_id": "ctx", "inputs": " ".join(["t5"] * 30), "parameters": {"max_new_tokens": 30}}
    )
    assert response.status_code == 422 and "40 virtual tokens" in response.json()["error"]


def test_downloaded_adapter_loads_in_peft_with_the_same_greedy_tokens(
    client: TestClient, loaded: LoadedModel, tmp_path: Path
) -> None:
    template = "t60 {inputs} t61"
    created = client.post("/prefixes", data={"task_id": "dl", "text": TEXT, "prompt_template": template})
    assert created.status_code == 201
    response = client.get("/prefixes/dl/adapter")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert sorted(archive.namelist()) == ["dl/adapter_config.json", "dl/adapter_model.safetensors", "dl/task.json"]
        archive.extractall(tmp_path / "download")
    adapter_dir = tmp_path / "download" / "dl"
    task = json.loads((adapter_dir / "task.json").read_text())
    assert task["source"] == "text" and task["text"] == TEXT and task["prompt_template"] == template

    # A copy: the module-scoped model is shared with the server under test.
    peft_model = PeftModel.from_pretrained(copy.deepcopy(loaded.model), str(adapter_dir)).eval()
    prompt = "t60 t30 t31 t61"  # the template filled with "t30 t31"
    ids = peft_greedy(peft_model, loaded.tokenizer(prompt)["input_ids"], NEW_TOKENS)
    via_peft = loaded.tokenizer.decode(ids, skip_special_tokens=True)
    assert _greedy(client, "dl", "t30 t31") == via_peft == _base_text(loaded, TEXT + " " + prompt)
    assert client.get("/prefixes/missing/adapter").status_code == 404


def test_trained_adapter_download_round_trips(client: TestClient, loaded: LoadedModel, tmp_path: Path) -> None:
    """Any stored prefix downloads as the uploaded PEFT files, byte for byte."""
    from tests.helpers import make_peft_prefix_adapter, read_adapter

    adapter_dir = make_peft_prefix_adapter(loaded.model, tmp_path / "a", num_virtual_tokens=4, seed=3)
    config, weights = read_adapter(adapter_dir)
    files = {"adapter_config": ("adapter_config.json", config), "adapter_model": ("adapter_model.safetensors", weights)}
    assert client.post("/prefixes", data={"task_id": "trained"}, files=files).status_code == 201
    with zipfile.ZipFile(io.BytesIO(client.get("/prefixes/trained/adapter").content)) as archive:
        assert archive.read("trained/adapter_config.json") == config
        assert archive.read("trained/adapter_model.safetensors") == weights
        assert "trained/task.json" not in archive.namelist()


# ---------------------------------------------------------------------------------------------------------------------
# Text tasks at their real limits (issue 18): a real tokenizer, 2,048 tokens


@pytest.mark.slow  # the embedded model's tokenizer (converted once, then cached)
def test_a_text_with_long_tokens_is_not_refused_before_tokenizing(loaded_smol_tokenizer: LoadedModel,
                                                                  tmp_path: Path) -> None:
    """520 lines of 64 '=' are 33,800 characters but 1,040 tokens: a fixed 16-characters-per-token pre-check refused
    them. Only a text that cannot fit by the tokenizer's longest vocabulary entry is refused untokenized."""
    text = ("=" * 64 + "\n") * 520
    settings = Settings(prefix_dir=tmp_path / "store")  # max_text_task_tokens 2048
    with TestClient(create_app(settings, loaded_smol_tokenizer)) as client:
        created = client.post("/prefixes", data={"task_id": "rules", "text": text})
        assert created.status_code == 201, created.text
        assert created.json()["num_virtual_tokens"] == len(loaded_smol_tokenizer.tokenizer(text)["input_ids"]) > 1000
        bound = client.app.state.service.inputs.chars_per_token
        assert bound == 81  # SmolLM2's longest vocabulary entry: the prompts' bound
        over = client.post("/prefixes", data={"task_id": "over", "text": "=" * (2048 * bound + 1)})
        assert over.status_code == 413, over.text
        assert "2048" in over.json()["error"] and str(2048 * bound) in over.json()["error"], over.json()


@pytest.mark.slow  # the embedded model's tokenizer (converted once, then cached)
@pytest.mark.parametrize("num_tokens", [300, 2048])
def test_a_downloaded_text_task_re_uploads_as_its_text(
    loaded_smol_tokenizer: LoadedModel, tmp_path: Path, num_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`prefix-serve upload DIR` on an unzipped download re-creates a text task from task.json's text: the same
    prefix (sha256), `source: text` and text kept, for every length the server holds (its files would be refused
    over max_virtual_tokens, and at 2,048 tokens of a real model they are ~94 MB)."""
    text = "a" + " b" * (num_tokens - 1)
    settings = Settings(prefix_dir=tmp_path / "store")  # max_virtual_tokens 256, max_text_task_tokens 2048
    monkeypatch.setattr(cli, "configure_logging", lambda *args, **kwargs: None)  # keep pytest's log capture
    with ThreadedServer(create_app(settings, loaded_smol_tokenizer)) as server:
        with TestClient(server.app) as client:
            form = {"task_id": "long", "text": text, "prompt_template": "Q: {inputs} A:", "description": "long"}
            created = client.post("/prefixes", data=form)
            assert created.status_code == 201 and created.json()["num_virtual_tokens"] == num_tokens, created.text
            with zipfile.ZipFile(io.BytesIO(client.get("/prefixes/long/adapter").content)) as archive:
                archive.extractall(tmp_path / "download")
            command = ["upload", str(tmp_path / "download" / "long"), "--task-id", "copy", "--url", server.url]
            assert cli.main(command) == 0
            copy_record = client.get("/prefixes/copy").json()
            original = created.json()
            for key in ("sha256", "num_virtual_tokens", "source", "prompt_template", "description"):
                assert copy_record[key] == original[key], key
            with zipfile.ZipFile(io.BytesIO(client.get("/prefixes/copy/adapter").content)) as archive:
                assert json.loads(archive.read("copy/task.json"))["text"] == text
