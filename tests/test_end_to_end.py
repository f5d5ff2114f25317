"""The embedded default model for real: PEFT parity on SmolLM2, and `prefix-serve serve` as a real process."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from service.batch import generate
from service.model_loader import LoadedModel
from service.registry import PrefixRegistry
from service.requests import GenerationRequest, SamplingParams
from service.runner import ModelRunner
from tests.helpers import free_port, make_peft_prefix_model, peft_greedy, prefix_serve_command, read_adapter, save_adapter

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Name a colour of the sky."]


def chat_ids(loaded: LoadedModel, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    rendered = loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return loaded.tokenizer(rendered)["input_ids"]


def test_embedded_model_matches_peft_in_a_mixed_batch(embedded_model: LoadedModel, tmp_path: Path) -> None:
    """NOTES' measurement as a test: two prefixes (V=20, V=10) mixed in one batch, each row = its own PEFT run."""
    long_model = make_peft_prefix_model(embedded_model.model, num_virtual_tokens=20, seed=1)
    short_model = make_peft_prefix_model(embedded_model.model, num_virtual_tokens=10, seed=2)
    registry = PrefixRegistry(
        tmp_path / "store",
        embedded_model.geometry,
        device=embedded_model.device,
        dtype=embedded_model.dtype,
        served_model_name=embedded_model.name,
        max_virtual_tokens=64,
        max_prefix_bytes=1 << 26,
        max_config_bytes=1 << 16,
    )
    for name, peft_model in (("long", long_model), ("short", short_model)):
        save_adapter(peft_model, tmp_path / name)
        registry.put(name, *read_adapter(tmp_path / name))

    rows = [("long", PROMPTS[0]), ("short", PROMPTS[1]), ("short", PROMPTS[0]), ("long", PROMPTS[1])]
    references = {"long": long_model, "short": short_model}
    new_tokens = 6
    expected = [peft_greedy(references[t], chat_ids(embedded_model, p), new_tokens) for t, p in rows]
    runner = ModelRunner(embedded_model.model, embedded_model.tokenizer)
    requests = [
        GenerationRequest(chat_ids(embedded_model, p), registry.get(t), SamplingParams(max_new_tokens=new_tokens))
        for t, p in rows
    ]
    assert [r.token_ids for r in generate(runner, requests)] == expected
    base = generate(runner, [GenerationRequest(chat_ids(embedded_model, PROMPTS[0]), None, SamplingParams(max_new_tokens=8))])
    assert "Paris" in base[0].text


def test_serve_process_answers_with_an_uploaded_prefix(
    embedded_model: LoadedModel, embedded_cache_dir: Path, tmp_path: Path
) -> None:
    adapter_dir = tmp_path / "adapter"
    save_adapter(make_peft_prefix_model(embedded_model.model, num_virtual_tokens=8, seed=3), adapter_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [*prefix_serve_command(), "serve", "--port", str(port), "--prefix-dir", str(tmp_path / "store"),
         "--cache-dir", str(embedded_cache_dir), "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                health = httpx.get(f"{url}/health", timeout=2)
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.5)
        assert health.json()["model"] == embedded_model.name

        uploaded = subprocess.run(
            [*prefix_serve_command(), "upload", str(adapter_dir), "--task-id", "e2e", "--url", url], capture_output=True, text=True
        )
        assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
        response = httpx.post(
            f"{url}/generate",
            json={"task_id": "e2e", "inputs": "The weather today is", "parameters": {"max_new_tokens": 8}},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert response.json()["details"]["generated_tokens"] >= 1
        assert response.json()["generated_text"].strip()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
