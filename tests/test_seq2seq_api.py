"""An encoder-decoder model behind the HTTP API: PEFT SEQ_2_SEQ_LM and full-prefix uploads, generation as PEFT computes
it, streaming, stop sequences, OpenAI completions, and every bad upload refused with a 4xx that stores nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.geometry import geometry_from_config
from service.model_loader import LoadedModel, wrap_model
from service.settings import Settings
from tests.helpers import (
    EOS,
    assert_error,
    edit_config,
    make_peft_prefix_adapter,
    make_peft_seq2seq_model,
    peft_seq2seq_greedy,
    read_adapter,
    safetensors_bytes,
    save_adapter,
    sse_events,
    store_snapshot,
    tiny_bart,
    tiny_seq2seq,
    tiny_t5,
    tiny_tokenizer,
    upload,
)

PROMPT = "t5 t9 t12 t7 t3 t44"


@pytest.fixture(scope="module")
def seq2seq_loaded() -> LoadedModel:
    return wrap_model(tiny_seq2seq("t5"), tiny_tokenizer(128), "tiny-t5")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def client(store: Path, seq2seq_loaded: LoadedModel) -> Iterator[TestClient]:
    settings = Settings(prefix_dir=store, max_running_rows=8, max_prefix_bytes=1 << 20)
    with TestClient(create_app(settings, seq2seq_loaded)) as test_client:
        yield test_client


def peft_adapter(loaded: LoadedModel, directory: Path, v: int, seed: int, num_layers: int | None = None) -> Any:
    peft_model = make_peft_seq2seq_model(loaded.model, v, seed, num_layers=num_layers)
    save_adapter(peft_model, directory)
    return peft_model


def full_prefix_files(adapter_dir: Path, loaded: LoadedModel, encoder_tokens: int, seed: int) -> tuple[bytes, bytes]:
    """A PEFT adapter made full: the encoder tensor beside prompt_embeddings and the config key that announces it."""
    from safetensors.torch import load

    config, weights = read_adapter(adapter_dir)
    g = loaded.geometry
    generator = torch.Generator().manual_seed(seed)
    encoder = torch.randn((encoder_tokens, g.encoder_num_layers * 2 * g.token_dim), generator=generator)
    tensors = {**load(weights), "encoder_prompt_embeddings": encoder}
    return edit_config(config, encoder_num_virtual_tokens=encoder_tokens), safetensors_bytes(tensors)


def generate(client: TestClient, task_id: str, **parameters: Any) -> Any:
    body = {"task_id": task_id, "inputs": PROMPT, "parameters": {"max_new_tokens": 6, **parameters}}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_peft_seq2seq_adapter_is_served_as_peft_computes_it(
    client: TestClient, seq2seq_loaded: LoadedModel, tmp_path: Path
) -> None:
    peft_model = peft_adapter(seq2seq_loaded, tmp_path / "a", v=6, seed=1)
    created = upload(client, "summarise", tmp_path / "a")
    assert created.status_code == 201, created.text
    assert created.json()["num_virtual_tokens"] == 6
    prompt_ids = seq2seq_loaded.tokenizer(PROMPT)["input_ids"]
    expected = peft_seq2seq_greedy(peft_model, prompt_ids, 6, decoder_start_token_id=0, eos_token_id=EOS)
    body = generate(client, "summarise")
    assert body["generated_text"] == seq2seq_loaded.tokenizer.decode(expected, skip_special_tokens=True)
    assert body["details"]["generated_tokens"] == len(expected)


def test_full_prefix_upload_generates_with_its_encoder_half(
    client: TestClient, seq2seq_loaded: LoadedModel, tmp_path: Path
) -> None:
    peft_adapter(seq2seq_loaded, tmp_path / "a", v=4, seed=2)
    assert upload(client, "decoder-only", tmp_path / "a").status_code == 201
    config, weights = full_prefix_files(tmp_path / "a", seq2seq_loaded, encoder_tokens=5, seed=3)
    full = upload(client, "full", tmp_path / "a", config=config, weights=weights)
    assert full.status_code == 201, full.text
    plain, with_encoder = generate(client, "decoder-only"), generate(client, "full")
    assert plain["generated_text"] != with_encoder["generated_text"]
    listed = {p["task_id"]: p for p in client.get("/prefixes").json()["prefixes"]}
    assert listed["full"]["num_virtual_tokens"] == 4


def test_streaming_stop_sequences_and_openai_completions(
    client: TestClient, seq2seq_loaded: LoadedModel, tmp_path: Path
) -> None:
    peft_adapter(seq2seq_loaded, tmp_path / "a", v=5, seed=4)
    assert upload(client, "task", tmp_path / "a").status_code == 201
    whole = generate(client, "task", max_new_tokens=8)["generated_text"]
    stream = client.post(
        "/generate_stream",
        json={"task_id": "task", "inputs": PROMPT, "parameters": {"max_new_tokens": 8}},
    )
    events = sse_events(stream.text)
    assert "".join(e["token"]["text"] for e in events) == whole
    assert events[-1]["generated_text"] == whole
    stop = whole.split()[2]
    stopped = generate(client, "task", max_new_tokens=8, stop=[stop])
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert stopped["generated_text"] == " ".join(whole.split()[:3])  # up to and including the stop (TGI's rule)
    completion = client.post("/v1/completions", json={"model": "task", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["text"] == whole


def test_bad_seq2seq_uploads_are_4xx_and_store_nothing(
    client: TestClient, seq2seq_loaded: LoadedModel, store: Path, tmp_path: Path, loaded: LoadedModel
) -> None:
    geometry = seq2seq_loaded.geometry
    peft_adapter(seq2seq_loaded, tmp_path / "good", v=4, seed=5)
    config, weights = read_adapter(tmp_path / "good")
    full_config, full_weights = full_prefix_files(tmp_path / "good", seq2seq_loaded, encoder_tokens=3, seed=6)
    make_peft_prefix_adapter(loaded.model, tmp_path / "causal", num_virtual_tokens=4, seed=7)  # a decoder-only one
    short = make_peft_seq2seq_model(seq2seq_loaded.model, 4, seed=8, num_layers=geometry.num_layers)
    save_adapter(short, tmp_path / "short")
    short_config = edit_config(read_adapter(tmp_path / "short")[0], num_layers=geometry.num_layers - 1)
    encoder_only_weights = safetensors_bytes({"encoder_prompt_embeddings": torch.zeros(3, 8)})
    from safetensors.torch import load

    wrong_encoder = {**load(full_weights), "encoder_prompt_embeddings": torch.zeros(3, 8)}
    before = store_snapshot(store)
    cases: list[tuple[str, dict[str, Any], int, tuple[str, ...]]] = [
        ("causal adapter", {"config": read_adapter(tmp_path / "causal")[0], "weights": read_adapter(tmp_path / "causal")[1]},
         422, ("task_type", "SEQ_2_SEQ_LM", "decoder-only")),
        ("L below the decoder's depth", {"config": short_config, "weights": read_adapter(tmp_path / "short")[1]},
         422, ("num_layers", f"at least {geometry.num_layers}")),
        ("token_dim", {"config": edit_config(config, token_dim=geometry.token_dim * 2)}, 422, ("token_dim",)),
        ("submodules", {"config": edit_config(config, num_transformer_submodules=1)}, 422, ("num_transformer_submodules",)),
        ("encoder tensor without its key", {"weights": full_weights}, 422, ("encoder_num_virtual_tokens",)),
        ("key without the tensor", {"config": full_config}, 422, ("encoder_prompt_embeddings",)),
        ("encoder tensor of the wrong shape", {"config": full_config, "weights": safetensors_bytes(wrong_encoder)},
         422, ("encoder_prompt_embeddings.shape",)),
        ("only an encoder tensor", {"config": full_config, "weights": encoder_only_weights}, 422, ("prompt_embeddings",)),
        ("encoder length out of range", {"config": edit_config(full_config, encoder_num_virtual_tokens=0),
                                         "weights": full_weights}, 422, ("encoder_num_virtual_tokens",)),
    ]  # fmt: skip
    for name, overrides, status, needles in cases:
        response = upload(client, "bad", tmp_path / "good", **overrides)
        assert response.status_code == status, (name, response.text)
        text = json.dumps(response.json())
        assert all(n in text for n in needles), (name, text)
    text_task = client.post("/prefixes", data={"task_id": "bad", "text": "an instruction"})
    assert_error(text_task, 422, "decoder-only model")
    assert store_snapshot(store) == before
    assert client.get("/prefixes").json()["prefixes"] == []


def test_seq2seq_adapters_are_refused_by_a_decoder_only_server(
    loaded: LoadedModel, seq2seq_loaded: LoadedModel, tmp_path: Path
) -> None:
    peft_adapter(seq2seq_loaded, tmp_path / "s2s", v=4, seed=9)
    full_config, full_weights = full_prefix_files(tmp_path / "s2s", seq2seq_loaded, encoder_tokens=3, seed=10)
    g = loaded.geometry
    causal_shaped = safetensors_bytes(
        {"prompt_embeddings": torch.zeros(4, g.numbers_per_virtual_token), "encoder_prompt_embeddings": torch.zeros(3, 8)}
    )
    settings = Settings(prefix_dir=tmp_path / "store", max_prefix_bytes=1 << 20)
    with TestClient(create_app(settings, loaded)) as client:
        assert_error(upload(client, "x", tmp_path / "s2s"), 422, "task_type", "encoder-decoder")
        causal_config = edit_config(full_config, task_type="CAUSAL_LM", num_layers=g.num_layers, token_dim=g.token_dim,
                                    num_attention_heads=g.num_kv_heads, num_transformer_submodules=1)  # fmt: skip
        assert_error(
            upload(client, "x", tmp_path / "s2s", config=causal_config, weights=causal_shaped),
            422, "encoder_num_virtual_tokens", "encoder-decoder model",
        )  # fmt: skip
        assert_error(
            upload(client, "x", tmp_path / "s2s", config=edit_config(causal_config, encoder_num_virtual_tokens=None),
                   weights=causal_shaped),
            422, "encoder_prompt_embeddings",
        )  # fmt: skip
        assert full_weights  # the full file itself is refused by the task_type check above on this server
        assert client.get("/prefixes").json()["prefixes"] == []
    assert geometry_from_config(seq2seq_loaded.model.config).is_encoder_decoder


def words(count: int) -> str:
    """A prompt of exactly `count` tokens for tiny_tokenizer (ids 3..122, no special tokens)."""
    return " ".join(f"t{3 + i % 120}" for i in range(count))


def test_encoder_and_decoder_positions_are_checked_each_against_its_own_limit(tmp_path: Path) -> None:
    """Issue 18: BART's encoder and decoder have 512 positions each. 510 prompt tokens with max_new_tokens 3 fit
    (the old check summed both sides: 510 + 4 + 3 = 517 > 512); each side over its own limit is a 422 naming it."""
    loaded = wrap_model(tiny_bart(max_position_embeddings=512), tiny_tokenizer(128), "tiny-bart-512")
    peft_adapter(loaded, tmp_path / "a", v=4, seed=1)
    settings = Settings(prefix_dir=tmp_path / "store", max_prefix_bytes=1 << 20)
    with TestClient(create_app(settings, loaded)) as client:
        assert upload(client, "task", tmp_path / "a").status_code == 201

        def post(prompt: str, max_new_tokens: int) -> Any:
            body = {"task_id": "task", "inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}}
            return client.post("/generate", json=body)

        served = post(words(510), 3)
        assert served.status_code == 200, served.text
        assert served.json()["details"]["prompt_tokens"] == 510
        assert post(words(512), 3).status_code == 200  # the encoder's last position

        encoder = assert_error(post(words(513), 3), 422, "encoder", "513", "512")
        assert encoder["type"] == "context_length_exceeded" and encoder["side"] == "encoder"
        assert "decoder:" not in encoder["error"]
        # Decoder: prefix 4 + start token 1 + 508 new tokens = 513 > 512, whatever the (short) prompt.
        decoder = assert_error(post(words(3), 508), 422, "decoder", "4", "508", "513", "512")
        assert decoder["type"] == "context_length_exceeded" and decoder["side"] == "decoder"
        assert post(words(3), 507).status_code == 200
        completion = client.post("/v1/completions", json={"model": "task", "prompt": words(513), "max_tokens": 3})
        assert completion.status_code == 422 and "encoder" in completion.text
        info = client.get("/tasks/task/info").json()  # TGI's limits as the input path applies them
        assert (info["max_input_tokens"], info["max_total_tokens"]) == (512, 512 + 507)


def test_t5_relative_positions_set_no_context_limit(tmp_path: Path) -> None:
    """T5's position bias is relative (distances past 128 share a bucket): no table to run out of on either side. A
    config's `n_positions` (512 in Google's, 64 here) is the pre-training length, not a limit of the model."""
    loaded = wrap_model(tiny_t5(n_positions=64), tiny_tokenizer(128), "tiny-t5-64")
    assert not loaded.geometry.bounded_positions and loaded.geometry.max_positions == 64
    peft_adapter(loaded, tmp_path / "a", v=4, seed=2)
    settings = Settings(prefix_dir=tmp_path / "store", max_prefix_bytes=1 << 20, max_prompt_tokens=200)
    with TestClient(create_app(settings, loaded)) as client:
        assert upload(client, "task", tmp_path / "a").status_code == 201
        body = {"task_id": "task", "inputs": words(150), "parameters": {"max_new_tokens": 80}}
        served = client.post("/generate", json=body)
        assert served.status_code == 200, served.text
        assert served.json()["details"]["prompt_tokens"] == 150
        # The server's own limits still bound the request.
        too_long = client.post("/generate", json={**body, "inputs": words(201)})
        assert_error(too_long, 422, "201", "200")


@pytest.mark.slow
def test_serve_process_with_a_seq2seq_model_dir(seq2seq_loaded: LoadedModel, tmp_path: Path) -> None:
    """`prefix-serve serve --model <BART dir>` as a real process: the checkpoint loads with its seq2seq class, a PEFT
    SEQ_2_SEQ_LM adapter uploaded with `prefix-serve upload` answers as PEFT's forward computes it."""
    import subprocess

    import httpx

    from tests.helpers import ServerProcess, prefix_serve_command, save_model_dir

    model = tiny_seq2seq("bart")
    model_dir = save_model_dir(model, tmp_path / "tiny-bart")
    peft_model = make_peft_seq2seq_model(model, 5, seed=28)  # a seed whose answer is not an immediate EOS
    save_adapter(peft_model, tmp_path / "adapter")
    server = ServerProcess(model_dir, tmp_path / "store", tmp_path / "server.log").start()
    try:
        uploaded = subprocess.run(
            [*prefix_serve_command(), "upload", str(tmp_path / "adapter"), "--task-id", "s2s", "--url", server.url],
            capture_output=True, text=True,
        )  # fmt: skip
        assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
        response = httpx.post(
            f"{server.url}/generate", json={"task_id": "s2s", "inputs": PROMPT, "parameters": {"max_new_tokens": 6}},
            timeout=60,
        )  # fmt: skip
        assert response.status_code == 200, response.text
        tokenizer = tiny_tokenizer(128)
        expected = peft_seq2seq_greedy(
            peft_model, tokenizer(PROMPT)["input_ids"], 6, decoder_start_token_id=EOS, eos_token_id=EOS
        )
        assert response.json()["generated_text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert response.json()["details"]["generated_tokens"] == len(expected) >= 3, "not an immediate EOS"
        assert httpx.get(f"{server.url}/health").json()["model"] == "tiny-bart"
    finally:
        server.stop()
