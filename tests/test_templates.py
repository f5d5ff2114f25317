"""Task prompt templates (service/templates.py): validation, rendering, and how every route applies them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.errors import InvalidPrefixError
from service.model_loader import LoadedModel
from service.settings import Settings
from service.templates import render, validate_description, validate_template
from tests.helpers import make_peft_prefix_adapter, read_adapter, sse_events

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "t60 t61 {inputs} t62"


# ---------------------------------------------------------------------------------------------------------------------
# Unit


def test_render_fills_the_one_slot_and_keeps_other_braces() -> None:
    assert render("Review : {inputs} Sentiment :", "great {film}") == "Review : great {film} Sentiment :"
    assert render("{x} {inputs} {}", "a {inputs} b") == "{x} a {inputs} b {}"  # the inputs are never re-scanned
    assert render(None, "plain") == "plain"
    assert render("Review : {inputs} :", "plain", raw=True) == "plain"


@pytest.mark.parametrize(
    ("template", "needle"),
    [("no slot", "found 0"), ("{inputs} and {inputs}", "found 2"), ("{input}", "found 0"), ("x" * 5000, "at most")],
)
def test_validate_template_rejects_with_a_clear_message(template: str, needle: str) -> None:
    with pytest.raises(InvalidPrefixError) as info:
        validate_template(template, max_chars=4096)
    assert info.value.status_code == 422 and needle in info.value.message
    assert info.value.details["field"] == "prompt_template"


def test_validate_accepts_and_normalises() -> None:
    assert validate_template("A {inputs} B", max_chars=100) == "A {inputs} B"
    assert validate_template(None, max_chars=100) is None and validate_template("", max_chars=100) is None
    assert validate_description("  short  ", max_chars=10) == "short"
    assert validate_description("   ", max_chars=10) is None
    with pytest.raises(InvalidPrefixError):
        validate_description("x" * 11, max_chars=10)


# ---------------------------------------------------------------------------------------------------------------------
# Through the HTTP API (tiny random model)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(prefix_dir=tmp_path / "store", max_template_chars=64)


@pytest.fixture
def client(settings: Settings, loaded: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_app(settings, loaded)) as test_client:
        yield test_client


def _upload(client: TestClient, loaded: LoadedModel, tmp_path: Path, task_id: str, **fields: str):
    adapter_dir = make_peft_prefix_adapter(loaded.model, tmp_path / task_id, num_virtual_tokens=4, seed=7)
    config, weights = read_adapter(adapter_dir)
    return client.post(
        "/prefixes",
        data={"task_id": task_id, **fields},
        files={
            "adapter_config": ("adapter_config.json", config),
            "adapter_model": ("adapter_model.safetensors", weights),
        },
    )


def _generate(client: TestClient, task_id: str, inputs: str, **extra) -> str:
    body = {"task_id": task_id, "inputs": inputs, "parameters": {"max_new_tokens": 6}, **extra}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


def test_generate_fills_the_template_and_raw_prompt_opts_out(
    client: TestClient, loaded: LoadedModel, tmp_path: Path
) -> None:
    created = _upload(client, loaded, tmp_path, "tpl", prompt_template=TEMPLATE, description="a test task")
    assert created.status_code == 201, created.text
    assert created.json()["prompt_template"] == TEMPLATE and created.json()["description"] == "a test task"

    filled = "t60 t61 t30 t31 t62"
    templated = _generate(client, "tpl", "t30 t31")
    assert templated == _generate(client, "tpl", filled, raw_prompt=True)
    assert templated != _generate(client, "tpl", "t30 t31", raw_prompt=True), "the template must matter"

    body = {"task_id": "tpl", "inputs": "t30 t31", "parameters": {"max_new_tokens": 6}}
    response = client.post("/generate", json=body)
    assert response.json()["details"]["prompt_tokens"] == 5  # the filled template's tokens
    stream = client.post("/generate_stream", json=body)
    assert stream.status_code == 200 and sse_events(stream.text)[-1]["generated_text"] == templated

    completion = client.post(
        "/v1/completions", json={"model": "tpl", "prompt": "t30 t31", "max_tokens": 6, "temperature": 0}
    )
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"] == templated
    raw = client.post(
        "/v1/completions",
        json={"model": "tpl", "prompt": filled, "max_tokens": 6, "temperature": 0, "raw_prompt": True},
    )
    assert raw.json()["choices"][0]["text"] == templated


def test_chat_on_a_templated_task_fills_the_template_with_the_last_user_message(
    client: TestClient, loaded: LoadedModel, tmp_path: Path
) -> None:
    assert _upload(client, loaded, tmp_path, "tpl", prompt_template=TEMPLATE).status_code == 201
    expected = _generate(client, "tpl", "t30 t31")
    messages = [
        {"role": "system", "content": "t90"},
        {"role": "user", "content": "t44"},
        {"role": "assistant", "content": "t45"},
        {"role": "user", "content": "t30 t31"},
    ]
    chat = client.post(
        "/v1/chat/completions", json={"model": "tpl", "messages": messages, "max_tokens": 6, "temperature": 0}
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == expected
    assert chat.json()["usage"]["prompt_tokens"] == 5

    no_user = client.post(
        "/v1/chat/completions",
        json={"model": "tpl", "messages": [{"role": "system", "content": "t5"}], "temperature": 0},
    )
    assert no_user.status_code == 422 and "role 'user'" in no_user.json()["error"]["message"]
    # raw_prompt falls back to the chat template, which the tiny tokenizer lacks: that route's own clear 422.
    raw = client.post(
        "/v1/chat/completions",
        json={"model": "tpl", "messages": messages, "temperature": 0, "raw_prompt": True},
    )
    assert raw.status_code == 422 and "chat template" in raw.json()["error"]["message"]


@pytest.mark.parametrize(
    ("fields", "status", "needle"),
    [
        ({"prompt_template": "no slot here"}, 422, "exactly one {inputs}"),
        ({"prompt_template": "{inputs} {inputs}"}, 422, "found 2"),
        ({"prompt_template": "{inputs}" + "x" * 64}, 422, "at most 64"),
        ({"description": "d" * 1001}, 422, "at most 1000"),
    ],
)
def test_bad_template_or_description_is_422_and_nothing_is_stored(
    client: TestClient, loaded: LoadedModel, tmp_path: Path, settings: Settings, fields, status: int, needle: str
) -> None:
    response = _upload(client, loaded, tmp_path, "bad", **fields)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]
    assert client.get("/prefixes").json()["prefixes"] == []
    assert list(settings.prefix_dir.iterdir()) == []


def test_template_is_listed_and_persists_across_restart(
    settings: Settings, loaded: LoadedModel, tmp_path: Path
) -> None:
    with TestClient(create_app(settings, loaded)) as client:
        assert _upload(client, loaded, tmp_path, "tpl", prompt_template=TEMPLATE, description="desc").status_code == 201
        assert _upload(client, loaded, tmp_path, "plain").status_code == 201
        before = _generate(client, "tpl", "t30")
    assert (settings.prefix_dir / "tpl" / "task.json").is_file()
    assert not (settings.prefix_dir / "plain" / "task.json").exists()  # PEFT's two files + metadata only

    with TestClient(create_app(settings, loaded)) as client:
        listed = {p["task_id"]: p for p in client.get("/prefixes").json()["prefixes"]}
        assert (listed["tpl"]["prompt_template"], listed["tpl"]["description"]) == (TEMPLATE, "desc")
        assert listed["plain"]["prompt_template"] is None and listed["plain"]["source"] == "adapter"
        assert client.get("/prefixes/tpl").json()["prompt_template"] == TEMPLATE
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert (models["tpl"]["prompt_template"], models["tpl"]["description"]) == (TEMPLATE, "desc")
        assert client.get("/v1/models/tpl").json()["prompt_template"] == TEMPLATE
        assert _generate(client, "tpl", "t30") == before

        # A replace without a template drops it (the new upload says everything about the task).
        assert _upload(client, loaded, tmp_path, "tpl", replace="true").status_code == 200
        assert client.get("/prefixes/tpl").json()["prompt_template"] is None
    assert not (settings.prefix_dir / "tpl" / "task.json").exists()


def test_a_corrupt_task_json_skips_only_that_task(settings: Settings, loaded: LoadedModel, tmp_path: Path) -> None:
    with TestClient(create_app(settings, loaded)) as client:
        assert _upload(client, loaded, tmp_path, "tpl", prompt_template=TEMPLATE).status_code == 201
        assert _upload(client, loaded, tmp_path, "other").status_code == 201
    (settings.prefix_dir / "tpl" / "task.json").write_text('{"prompt_template": "no slot"}')
    with TestClient(create_app(settings, loaded)) as client:
        assert [p["task_id"] for p in client.get("/prefixes").json()["prefixes"]] == ["other"]


# ---------------------------------------------------------------------------------------------------------------------
# The shipped example tasks, sent plainly


@pytest.mark.slow
def test_shipped_tasks_answer_held_out_examples_sent_plainly(embedded_model: LoadedModel, tmp_path: Path) -> None:
    from service.training.examples import EXAMPLE_TASKS

    store = tmp_path / "prefixes"
    shutil.copytree(REPO / "prefixes", store)
    settings = Settings(prefix_dir=store)
    with TestClient(create_app(settings, embedded_model)) as client:
        for task in EXAMPLE_TASKS.values():
            records = task.records("heldout")[:12]
            answers = [e.answer for e in task.examples("heldout")[:12]]
            correct = 0
            for record, answer in zip(records, answers):
                plain = task.raw_input(record)
                response = client.post(
                    "/generate",
                    json={"task_id": task.task_id, "inputs": plain, "parameters": {"max_new_tokens": 12}},
                )
                assert response.status_code == 200, response.text
                correct += response.json()["generated_text"].strip() == answer
            assert correct == len(records), (task.task_id, correct)
        chat = client.post(
            "/v1/chat/completions",
            json={"model": "sentiment", "messages": [{"role": "user", "content": "great film"}], "temperature": 0,
                  "max_tokens": 5},
        )  # fmt: skip
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == " positive"


def test_the_template_counts_toward_the_character_bound_before_tokenizing(
    loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one input path (service/inputs.py) bounds the filled template's characters, on every route, before any
    tokenization: inputs that fit alone but not inside the template are refused without tokenizing them."""
    settings = Settings(prefix_dir=tmp_path / "store", max_prompt_tokens=4, max_prompt_chars_per_token=4)  # 16 chars
    template = "t60 t61 {inputs} t62"  # 12 characters of its own
    inputs = "t30 t31"  # 7: fits alone (raw_prompt), not templated (19 > 16)
    with TestClient(create_app(settings, loaded)) as client:
        assert _upload(client, loaded, tmp_path, "tpl", prompt_template=template).status_code == 201
        calls: list[object] = []
        tokenizer = client.app.state.service.inputs.tokenizer
        original = type(tokenizer).__call__
        monkeypatch.setattr(
            type(tokenizer), "__call__", lambda self, *a, **k: calls.append(a) or original(self, *a, **k)
        )
        requests = [
            ("/generate", {"task_id": "tpl", "inputs": inputs}),
            ("/generate_stream", {"task_id": "tpl", "inputs": inputs}),
            ("/v1/completions", {"model": "tpl", "prompt": inputs}),
            ("/v1/chat/completions", {"model": "tpl", "messages": [{"role": "user", "content": inputs}]}),
        ]
        for path, body in requests:
            response = client.post(path, json=body)
            assert response.status_code == 422, (path, response.text)
            assert "16 characters" in response.text and "19 characters" in response.text, (path, response.text)
        assert calls == [], "refused by the character bound, yet tokenized"
        raw = client.post("/generate", json={"task_id": "tpl", "inputs": inputs, "raw_prompt": True,
                                             "parameters": {"max_new_tokens": 1}})
        assert raw.status_code == 200, raw.text

