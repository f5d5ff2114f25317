"""The HTTP API as a client sees it, against the ASGI app with a tiny random model (no network, no weights)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.model_loader import LoadedModel
from service.settings import Settings
from tests.helpers import TINY_MAX_POSITIONS as MAX_POSITIONS
from tests.helpers import (
    ThreadedServer,
    adapter,
    assert_error,
    edit_config,
    expected_text,
    read_adapter,
    sse_events,
    upload,
    slowed_forward,
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(prefix_dir=tmp_path / "store", max_running_rows=8, max_prefix_bytes=1 << 20)


@pytest.fixture
def client(settings: Settings, loaded: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_app(settings, loaded)) as test_client:
        yield test_client


def test_health_and_docs(client: TestClient) -> None:
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "model": "tiny-llama", "device": "cpu", "dtype": "float32", "prefixes": 0}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/generate", "/prefixes", "/prefixes/{task_id}", "/health"} <= set(paths)


def test_upload_generate_replace_delete_lifecycle(client: TestClient, loaded: LoadedModel, tmp_path: Path) -> None:
    first_dir, first = adapter(loaded, tmp_path, "a1", v=5, seed=1)
    second_dir, second = adapter(loaded, tmp_path, "a2", v=7, seed=2, prefix_projection=True)
    prompt = "t5 t6 t7 t8"

    created = upload(client, "sentiment", first_dir)
    assert created.status_code == 201, created.text
    weights = read_adapter(first_dir)[1]
    assert created.json()["sha256"] == hashlib.sha256(weights).hexdigest()
    assert created.json()["bytes"] == len(weights)
    assert created.json()["num_virtual_tokens"] == 5

    generated = client.post("/generate", json={"task_id": "sentiment", "inputs": prompt, "parameters": {"max_new_tokens": 6}})
    assert generated.status_code == 200, generated.text
    body = generated.json()
    assert body["generated_text"] == expected_text(loaded, first, prompt, 6)
    assert body["details"] == {"finish_reason": "length", "generated_tokens": 6, "prompt_tokens": 4, "seed": None}

    assert_error(upload(client, "sentiment", second_dir), 409, "sentiment", "replace=true")
    replaced = upload(client, "sentiment", second_dir, replace=True)
    assert replaced.status_code == 200 and replaced.json()["num_virtual_tokens"] == 7

    again = client.post("/generate", json={"task_id": "sentiment", "inputs": prompt, "parameters": {"max_new_tokens": 6}})
    assert again.json()["generated_text"] == expected_text(loaded, second, prompt, 6)
    assert again.json()["generated_text"] != body["generated_text"]

    listed = client.get("/prefixes").json()["prefixes"]
    assert [p["task_id"] for p in listed] == ["sentiment"]
    assert client.get("/prefixes/sentiment").json()["num_virtual_tokens"] == 7
    assert client.get("/health").json()["prefixes"] == 1

    assert client.delete("/prefixes/sentiment").status_code == 204
    assert_error(client.post("/generate", json={"task_id": "sentiment", "inputs": prompt}), 404, "sentiment")
    assert_error(client.delete("/prefixes/sentiment"), 404, "sentiment")
    assert_error(client.get("/prefixes/sentiment"), 404, "sentiment")


def test_store_survives_restart(settings: Settings, loaded: LoadedModel, tmp_path: Path) -> None:
    adapter_dir, peft_model = adapter(loaded, tmp_path, "a", v=4, seed=3)
    with TestClient(create_app(settings, loaded)) as client:
        assert upload(client, "persist", adapter_dir).status_code == 201
    with TestClient(create_app(settings, loaded)) as client:
        assert [p["task_id"] for p in client.get("/prefixes").json()["prefixes"]] == ["persist"]
        out = client.post("/generate", json={"task_id": "persist", "inputs": "t9 t10", "parameters": {"max_new_tokens": 4}})
        assert out.json()["generated_text"] == expected_text(loaded, peft_model, "t9 t10", 4)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"task_id": "x", "inputs": "t5", "parameters": {"temperature": 0}}, "temperature"),
        ({"task_id": "x", "inputs": "t5", "parameters": {"top_p": 1.5}}, "top_p"),
        ({"task_id": "x", "inputs": "t5", "parameters": {"top_k": 0}}, "top_k"),
        ({"task_id": "x", "inputs": "t5", "parameters": {"max_new_tokens": 0}}, "max_new_tokens"),
        ({"task_id": "x", "inputs": "t5", "parameters": {"repetition_penalty": -1}}, "repetition_penalty"),
        ({"task_id": "x", "inputs": "t5", "parameters": {"stop": [""]}}, "stop"),
        ({"task_id": "x", "inputs": "t5", "parameters": {"seed": -1}}, "seed"),
        ({"task_id": "x", "inputs": "t5", "parameters": {"bogus": 1}}, "bogus"),
        ({"task_id": "x", "inputs": ""}, "inputs"),
        ({"task_id": "../etc", "inputs": "t5"}, "task_id"),
        ({"inputs": "t5"}, "task_id"),
    ],
)
def test_bad_generate_parameters_are_422(client: TestClient, body: dict, needle: str) -> None:
    assert_error(client.post("/generate", json=body), 422, needle)


def test_malformed_json_is_422(client: TestClient) -> None:
    response = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 422)


def test_unknown_task_is_404_naming_it(client: TestClient) -> None:
    body = assert_error(client.post("/generate", json={"task_id": "nope", "inputs": "t5"}), 404, "nope")
    assert body["task_id"] == "nope"


def test_too_long_request_names_the_limits(client: TestClient, loaded: LoadedModel, tmp_path: Path) -> None:
    upload(client, "t", adapter(loaded, tmp_path, "a", v=10, seed=4)[0])
    prompt = " ".join(f"t{i}" for i in range(3, 63))  # 60 tokens
    response = client.post("/generate", json={"task_id": "t", "inputs": prompt, "parameters": {"max_new_tokens": 30}})
    body = assert_error(response, 422, "60", "10", "30", str(MAX_POSITIONS))
    assert body["max_context"] == MAX_POSITIONS
    fits = client.post("/generate", json={"task_id": "t", "inputs": prompt, "parameters": {"max_new_tokens": 26}})
    assert fits.status_code == 200, fits.text


def test_max_new_tokens_over_server_limit_is_422(settings: Settings, loaded: LoadedModel, tmp_path: Path) -> None:
    settings.max_new_tokens_limit = 8
    with TestClient(create_app(settings, loaded)) as client:
        upload(client, "t", adapter(loaded, tmp_path, "a", v=3, seed=4)[0])
        response = client.post("/generate", json={"task_id": "t", "inputs": "t5", "parameters": {"max_new_tokens": 9}})
        assert_error(response, 422, "max_new_tokens", "8")


def test_upload_errors(client: TestClient, loaded: LoadedModel, tmp_path: Path) -> None:
    adapter_dir, _ = adapter(loaded, tmp_path, "a", v=4, seed=5)
    config, weights = read_adapter(adapter_dir)
    assert_error(upload(client, "t", adapter_dir, config=edit_config(config, num_layers=3)), 422, "num_layers")
    assert_error(upload(client, "t", adapter_dir, config=edit_config(config, peft_type="LORA")), 422, "peft_type")
    assert_error(upload(client, "t", adapter_dir, weights=b"\x80\x04not safetensors"), 422, "adapter_model")
    assert_error(upload(client, "t", adapter_dir, weights=b""), 422, "adapter_model")
    assert_error(upload(client, "t", adapter_dir, weights=b"0" * ((1 << 20) + 1)), 413, "adapter_model")
    assert_error(upload(client, "bad/id", adapter_dir), 422, "task")
    missing = client.post("/prefixes", data={"task_id": "t"}, files={"adapter_config": ("c.json", config)})
    assert_error(missing, 422, "adapter_model")
    assert client.get("/prefixes").json()["prefixes"] == []
    assert not any((tmp_path / "store").glob("t*")), "a rejected upload must leave nothing in the store"


def test_upload_for_another_base_model_warns(client: TestClient, loaded: LoadedModel, tmp_path: Path) -> None:
    adapter_dir, _ = adapter(loaded, tmp_path, "a", v=4, seed=6, base_model_name_or_path="org/other-model")
    response = upload(client, "t", adapter_dir)
    assert response.status_code == 201
    assert any("other-model" in w for w in response.json()["warnings"])


@pytest.mark.parametrize("batching", ["mixed", "per-task"])
def test_concurrent_same_task_requests_are_batched_and_exact(
    settings: Settings, loaded: LoadedModel, tmp_path: Path, batching: str
) -> None:
    settings.batching = batching
    settings.batch_window_ms = 50
    adapter_dir, peft_model = adapter(loaded, tmp_path, "a", v=6, seed=7)
    prompts = ["t5 t6 t7 t8 t9", "t11", "t20 t21 t22", "t30 t31", "t40 t41 t42 t43", "t50"]
    with TestClient(create_app(settings, loaded)) as client:
        upload(client, "t", adapter_dir)

        def call(prompt: str) -> str:
            body = {"task_id": "t", "inputs": prompt, "parameters": {"max_new_tokens": 5}}
            return client.post("/generate", json=body).json()["generated_text"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            texts = list(pool.map(call, prompts))
        stats = client.app.state.service.engine.stats
    assert texts == [expected_text(loaded, peft_model, p, 5) for p in prompts]
    assert stats.max_batch_rows_seen > 1, "concurrent requests share a forward pass"


def test_stop_sequence_ends_generation(client: TestClient, loaded: LoadedModel, tmp_path: Path) -> None:
    upload(client, "t", adapter(loaded, tmp_path, "a", v=5, seed=8)[0])
    free = client.post("/generate", json={"task_id": "t", "inputs": "t5 t6", "parameters": {"max_new_tokens": 6}}).json()
    words = free["generated_text"].split()
    stop = words[2]
    cut = words[: words.index(stop) + 1]
    stopped = client.post(
        "/generate", json={"task_id": "t", "inputs": "t5 t6", "parameters": {"max_new_tokens": 6, "stop": [stop]}}
    ).json()
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert stopped["generated_text"].split() == cut
    assert stopped["details"]["generated_tokens"] == len(cut)


def test_seeded_sampling_is_reproducible(client: TestClient, loaded: LoadedModel, tmp_path: Path) -> None:
    upload(client, "t", adapter(loaded, tmp_path, "a", v=5, seed=9)[0])

    def sample(seed: int) -> dict:
        params = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.5, "top_k": 50, "top_p": 0.95, "seed": seed}
        return client.post("/generate", json={"task_id": "t", "inputs": "t5 t6", "parameters": params}).json()

    first, again, other = sample(1234), sample(1234), sample(99)
    assert first["generated_text"] == again["generated_text"]
    assert first["details"]["seed"] == 1234
    assert first["generated_text"] != other["generated_text"]


def test_eos_finishes_with_eos_reason(client: TestClient, loaded: LoadedModel, tmp_path: Path) -> None:
    """Make EOS the likeliest token by biasing the LM head, then check the finish reason and the text."""
    upload(client, "t", adapter(loaded, tmp_path, "a", v=2, seed=10)[0])
    head = loaded.model.get_output_embeddings()
    eos = loaded.tokenizer.eos_token_id
    saved = head.weight[eos].clone()
    try:
        with torch.no_grad():
            head.weight[eos] = head.weight.abs().max() * 50 * torch.sign(head.weight.sum(0))
        out = client.post("/generate", json={"task_id": "t", "inputs": "t5 t6", "parameters": {"max_new_tokens": 10}})
    finally:
        with torch.no_grad():
            head.weight[eos] = saved
    details = out.json()["details"]
    assert details["finish_reason"] == "eos_token"
    assert details["generated_tokens"] < 10
    assert "</s>" not in out.json()["generated_text"]


def test_upload_cli_posts_adapter_dir(loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`prefix-serve upload` sends the two files as the API expects (routed into the ASGI app)."""
    import httpx

    from service import cli

    app = create_app(Settings(prefix_dir=tmp_path / "store"), loaded)
    adapter_dir, _ = adapter(loaded, tmp_path, "a", v=3, seed=11)
    with TestClient(app) as client:
        monkeypatch.setattr(httpx, "post", lambda url, timeout=None, **kw: client.post(url.replace("http://svc", ""), **kw))
        assert cli.main(["upload", str(adapter_dir), "--task-id", "cli-task", "--url", "http://svc"]) == 0
        assert cli.main(["upload", str(adapter_dir), "--task-id", "cli-task", "--url", "http://svc"]) == 1
        assert cli.main(["upload", str(adapter_dir), "--task-id", "cli-task", "--url", "http://svc", "--replace"]) == 0
        assert client.get("/prefixes/cli-task").status_code == 200
    assert cli.main(["upload", str(tmp_path / "missing"), "--task-id", "x"]) == 2


def test_generate_stream_sends_one_event_per_token(client: TestClient, loaded: LoadedModel, tmp_path: Path) -> None:
    upload(client, "t", adapter(loaded, tmp_path, "a", v=5, seed=12)[0])
    body = {"task_id": "t", "inputs": "t5 t6 t7", "parameters": {"max_new_tokens": 7}}
    whole = client.post("/generate", json=body).json()
    with client.stream("POST", "/generate_stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events("\n".join(response.iter_lines()))
    assert len(events) == whole["details"]["generated_tokens"]
    assert all(e["token"]["text"] is not None for e in events)
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == whole["generated_text"]
    assert events[-1]["details"] == whole["details"]
    assert "".join(e["token"]["text"] for e in events).strip() == whole["generated_text"]


def test_generate_stream_errors_are_json_before_streaming(client: TestClient) -> None:
    response = client.post("/generate_stream", json={"task_id": "missing", "inputs": "t5"})
    assert_error(response, 404, "missing")
    assert_error(client.post("/generate_stream", json={"task_id": "missing", "inputs": ""}), 422, "inputs")


def test_full_queue_answers_429_with_retry_after(client: TestClient, loaded: LoadedModel, tmp_path: Path) -> None:
    from service.engine import EngineLimits

    upload(client, "t", adapter(loaded, tmp_path, "a", v=2, seed=13)[0])
    client.app.state.service.engine.limits = EngineLimits(max_waiting=0)
    for route in ("/generate", "/generate_stream"):
        response = client.post(route, json={"task_id": "t", "inputs": "t5"})
        assert_error(response, 429, "queue is full")
        assert int(response.headers["retry-after"]) >= 1


def test_client_disconnect_cancels_the_streaming_row(settings: Settings, loaded: LoadedModel, tmp_path: Path) -> None:
    """Through a real uvicorn server on loopback: closing the connection mid-stream retires the row."""
    import time

    import httpx

    app = create_app(settings, loaded)
    # The slowdown keeps the row alive long enough to disconnect.
    with ThreadedServer(app) as server, slowed_forward(loaded.model, 0.02):
        engine = app.state.service.engine
        config, weights = read_adapter(adapter(loaded, tmp_path, "a", v=3, seed=14)[0])
        httpx.post(f"{server.url}/prefixes", data={"task_id": "t"},
                   files={"adapter_config": ("c.json", config), "adapter_model": ("m.safetensors", weights)})
        body = {"task_id": "t", "inputs": "t5 t6", "parameters": {"max_new_tokens": 80}}
        with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        deadline = time.monotonic() + 10
        while engine.stats.cancelled < 1:
            assert time.monotonic() < deadline, "the row kept decoding after the client left"
            time.sleep(0.02)
        assert engine.stats.finished == 1 and engine.stats.running_rows == 0

