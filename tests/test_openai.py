"""The OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions) through the official `openai`
client against a live uvicorn server on loopback, with a tiny random Llama and an uploaded task prefix."""

from __future__ import annotations

import time
from typing import Iterator

import httpx
import openai
import pytest
import torch

from service.api.app import create_app
from service.model_loader import LoadedModel, wrap_model
from service.settings import Settings
from tests.helpers import (
    ThreadedServer, make_peft_prefix_model, read_adapter, save_adapter, slowed_forward, tiny_llama, tiny_tokenizer,
)

BASE = "tiny-llama"
TASK = "summarize"
# Word-level tiny tokenizer: every word must be a "tN" token. system -> t3, user -> t4, assistant turn -> t5.
CHAT_TEMPLATE = (
    "{{ bos_token }} {% for m in messages %}"
    "{% if m['role'] == 'system' %}t3{% elif m['role'] == 'user' %}t4{% else %}t5{% endif %} {{ m['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}t5{% endif %}"
)
MESSAGES = [{"role": "system", "content": "t10 t11"}, {"role": "user", "content": "t12 t13 t14"}]
RENDERED = "<s> t3 t10 t11 t4 t12 t13 t14 t5"


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    tokenizer = tiny_tokenizer(128)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = tiny_llama(seed=0, initializer_range=0.5, max_position_embeddings=96)
    return wrap_model(model, tokenizer, BASE)


@pytest.fixture(scope="module")
def server(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    """(base URL, the app) of a live server holding one task prefix."""
    tmp = tmp_path_factory.mktemp("openai")
    app = create_app(Settings(prefix_dir=tmp / "store", max_running_rows=8, max_prefix_bytes=1 << 20), loaded)
    with ThreadedServer(app) as live:
        save_adapter(make_peft_prefix_model(loaded.model, num_virtual_tokens=5, seed=21), tmp / "adapter")
        config, weights = read_adapter(tmp / "adapter")
        uploaded = httpx.post(
            f"{live.url}/prefixes",
            data={"task_id": TASK},
            files={"adapter_config": ("c.json", config), "adapter_model": ("m.safetensors", weights)},
        )
        assert uploaded.status_code == 201, uploaded.text
        yield live.url, app


@pytest.fixture(scope="module")
def client(server: tuple[str, object]):
    with openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def tgi(server, inputs: str, max_new_tokens: int, **parameters) -> dict:
    body = {"task_id": TASK, "inputs": inputs, "parameters": {"max_new_tokens": max_new_tokens, **parameters}}
    response = httpx.post(f"{server[0]}/generate", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def message(error: openai.APIStatusError) -> str:
    """/v1 errors have OpenAI's shape, so the official client's `str(exc)` shows the message (not just the status)."""
    body = error.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] and body["error"]["code"], body
    assert body["error"]["message"] in str(error), str(error)
    return body["error"]["message"]


def test_models_lists_the_base_model_and_every_task(client, server) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [BASE, TASK]
    base, task = models
    assert (base.object, base.owned_by, base.parent, base.root) == ("model", "prefix-serve", None, BASE)
    assert (task.object, task.owned_by, task.parent, task.root) == ("model", "prefix-serve", BASE, BASE)
    assert abs(task.created - time.time()) < 600
    assert client.models.retrieve(TASK).parent == BASE
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("nope")
    assert "nope" in message(caught.value)
    paths = httpx.get(f"{server[0]}/openapi.json").json()["paths"]
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= set(paths)


def test_completion_is_generate_without_the_stop_sequence(client, server) -> None:
    prompt = "t5 t6 t7"
    free = tgi(server, prompt, 8)
    out = client.completions.create(model=TASK, prompt=prompt, max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == TASK
    assert [(c.index, c.text, c.finish_reason, c.logprobs) for c in out.choices] == [
        (0, free["generated_text"], "length", None)
    ]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (3, 8, 11)

    stop = free["generated_text"].split()[3]
    kept = tgi(server, prompt, 8, stop=[stop, "t999"])
    assert kept["details"]["finish_reason"] == "stop_sequence" and kept["generated_text"].endswith(stop)
    cut = client.completions.create(model=TASK, prompt=[prompt], max_tokens=8, temperature=0, stop=[stop, "t999"])
    assert cut.choices[0].text == kept["generated_text"][: -len(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens == kept["details"]["generated_tokens"]
    single = client.completions.create(model=TASK, prompt=prompt, max_tokens=8, temperature=0, stop=stop)
    assert single.choices[0].text == cut.choices[0].text


def test_base_model_name_generates_without_a_prefix(client, loaded: LoadedModel) -> None:
    out = client.completions.create(model=BASE, prompt="t5 t6 t7", max_tokens=4, temperature=0)
    ids = [5, 6, 7]
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(loaded.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out.choices[0].text == loaded.tokenizer.decode(ids[3:], skip_special_tokens=True)


def test_seeded_sampling_is_the_default_and_reproducible(client) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=TASK, prompt="t5 t6", max_tokens=12, seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_chat_completion_renders_the_chat_template(client, server, loaded: LoadedModel) -> None:
    assert loaded.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == RENDERED
    expected = tgi(server, RENDERED, 6)
    out = client.chat.completions.create(model=TASK, messages=MESSAGES, max_tokens=6, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    choice = out.choices[0]
    assert (choice.message.role, choice.message.content) == ("assistant", expected["generated_text"])
    assert choice.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (9, 6, 15)
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES]
    newer = client.chat.completions.create(model=TASK, messages=parts, max_completion_tokens=6, temperature=0)
    assert newer.choices[0].message.content == expected["generated_text"]


def test_streamed_completion_joins_to_the_whole_text(client, server) -> None:
    prompt = "t8 t9"
    whole = client.completions.create(model=TASK, prompt=prompt, max_tokens=10, temperature=0)
    stop = whole.choices[0].text.split()[4]
    whole = client.completions.create(model=TASK, prompt=prompt, max_tokens=10, temperature=0, stop=stop)
    assert whole.choices[0].finish_reason == "stop"
    request = {"model": TASK, "prompt": prompt, "max_tokens": 10, "temperature": 0, "stop": stop}
    chunks = list(client.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(texts) > 2, "one chunk per token"
    assert "".join(texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "text_completion"

    raw = httpx.post(f"{server[0]}/v1/completions", json={**request, "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert [line for line in raw.text.splitlines() if line][-1] == "data: [DONE]"


def test_streamed_chat_joins_to_the_whole_message(client) -> None:
    request = {"model": TASK, "messages": MESSAGES, "max_tokens": 7, "temperature": 0}
    chunks = list(client.chat.completions.create(**request, stream=True))
    whole = client.chat.completions.create(**request)
    assert chunks[0].object == "chat.completion.chunk"
    assert (chunks[0].choices[0].delta.role, chunks[0].choices[0].delta.content) == ("assistant", "")
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_closing_a_stream_cancels_the_row(client, server) -> None:
    engine = server[1].state.service.engine
    with slowed_forward(engine.runner.model, 0.02):
        cancelled = engine.stats.cancelled
        stream = client.chat.completions.create(model=TASK, messages=MESSAGES, max_tokens=60, stream=True)
        next(iter(stream))
        stream.close()
        deadline = time.monotonic() + 10
        while engine.stats.cancelled <= cancelled:
            assert time.monotonic() < deadline, "the row kept decoding after the client left"
            time.sleep(0.02)


@pytest.mark.parametrize(
    ("kwargs", "status", "needles"),
    [
        ({"model": "nope"}, 404, ["nope"]),
        ({"model": "org/nope"}, 404, ["org/nope"]),
        ({"n": 2}, 422, ["n=2"]),
        ({"presence_penalty": 0.5}, 422, ["presence_penalty"]),
        ({"frequency_penalty": 1, "presence_penalty": 0}, 422, ["frequency_penalty"]),
        ({"logprobs": 2, "n": 3}, 422, ["logprobs", "n=3"]),
        ({"prompt": ["t5", "t6"]}, 422, ["prompt", "one prompt"]),
        ({"temperature": 2.5}, 422, ["temperature"]),
        ({"stop": [""]}, 422, ["stop"]),
        ({"stop": [f"t{i}" for i in range(17)]}, 422, ["stop", "16"]),
        ({"max_tokens": 100}, 422, ["max_tokens (100)", "96"]),
        ({"extra_body": {"bogus": 1}}, 422, ["bogus"]),
        ({"model": "nope", "stream": True}, 404, ["nope"]),
        ({"n": 2, "stream": True}, 422, ["n=2"]),
    ],
)
def test_completion_errors_name_the_problem(client, kwargs: dict, status: int, needles: list[str]) -> None:
    request = {"model": TASK, "prompt": "t5 t6", "max_tokens": 4, "temperature": 0, **kwargs}
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(**request)
    assert caught.value.status_code == status
    for needle in needles:
        assert needle in message(caught.value), (needle, message(caught.value))


def test_chat_errors_name_the_problem(client, loaded: LoadedModel) -> None:
    def chat(**kwargs):
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(**{"model": TASK, "messages": MESSAGES, "max_tokens": 4, **kwargs})
        return caught.value

    assert chat(model="nope").status_code == 404
    error = chat(presence_penalty=0.2, tools=[{"type": "function", "function": {"name": "f"}}])
    assert error.status_code == 422 and "presence_penalty" in message(error) and "tools" in message(error)
    assert chat(n=2, stream=True).status_code == 422
    loaded.tokenizer.chat_template = None
    try:
        error = chat()
        assert error.status_code == 422 and "chat template" in message(error) and BASE in message(error)
    finally:
        loaded.tokenizer.chat_template = CHAT_TEMPLATE


def test_stop_sequences_are_held_back_and_stripped() -> None:
    from service.api.routes.openai import _held_back, _strip_stop
    from service.requests import FinishReason, GenerationResult

    assert _held_back("t5 t1", ("t12 t13",)) == 2  # "t1" may grow into the stop sequence
    assert _held_back("t5 t12 ", ("t12 t13", "7 ")) == 4
    assert _held_back("t5 t6", ("t12",)) == 0
    assert _held_back("t5", ()) == 0

    def result(text: str, reason: FinishReason) -> GenerationResult:
        return GenerationResult(token_ids=[], text=text, finish_reason=reason, prompt_tokens=1)

    assert _strip_stop(result("t5 t6 t7", FinishReason.STOP_SEQUENCE), ("t7", "t6 t7", "t9")) == "t5 "
    assert _strip_stop(result("t5 t6 t7", FinishReason.LENGTH), ("t7",)) == "t5 t6 t7"


def test_openai_requests_are_counted_in_metrics(client, server) -> None:
    client.completions.create(model=TASK, prompt="t5", max_tokens=2, temperature=0)
    client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2, temperature=0)
    lines = httpx.get(f"{server[0]}/metrics").text.splitlines()
    assert any('route="/v1/completions"' in line and f'task="{TASK}"' in line for line in lines)
    assert any('route="/v1/chat/completions"' in line and f'task="{BASE}"' in line for line in lines)
    assert any(line.startswith("prefix_serve_generated_tokens") and f'task="{TASK}"' in line for line in lines)
