"""Upload battery (fast, in-process): every malformed adapter or task id gets a 4xx JSON error and leaves the
on-disk store byte-for-byte unchanged (dot-named temp folders included); a rejected replace keeps the old prefix.
Also: a body over the cap without a Content-Length is a 413."""

from __future__ import annotations

import json
import random
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors

from service.api.app import create_app
from service.model_loader import LoadedModel
from service.settings import Settings
from tests.helpers import TINY_MAX_POSITIONS as MAX_POSITIONS
from tests.helpers import (
    ThreadedServer,
    Version,
    assert_json_error,
    edit_config,
    generate_body,
    make_version,
    pickle_bytes,
    safetensors_bytes,
    store_snapshot,
    upload_files,
    upload_form,
)

CONFIG_CAP = 4096
WEIGHTS_CAP = 64 * 1024
BATTERY_V = 4


@dataclass
class Battery:
    client: TestClient
    store: Path
    config: bytes
    weights: bytes
    tensor: torch.Tensor
    keep: Version


@pytest.fixture(scope="module")
def battery(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Battery]:
    tmp = tmp_path_factory.mktemp("battery")
    settings = Settings(
        prefix_dir=tmp / "store", max_prefix_bytes=WEIGHTS_CAP, max_config_bytes=CONFIG_CAP, max_running_rows=4
    )
    keep = make_version(loaded.model, tmp, "keep", BATTERY_V, seed=1, tokenizer=loaded.tokenizer)
    other = make_version(loaded.model, tmp, "other", BATTERY_V, seed=2, tokenizer=loaded.tokenizer)
    config, weights = other.config, other.weights
    tensor = load_safetensors(weights)["prompt_embeddings"]
    with TestClient(create_app(settings, loaded)) as client:
        created = client.post("/prefixes", data=upload_form("keep", None), files=upload_files(keep.config, keep.weights))
        assert created.status_code == 201, created.text
        yield Battery(client, settings.prefix_dir, config, weights, tensor, keep)


def _tensor(t: torch.Tensor) -> bytes:
    return safetensors_bytes({"prompt_embeddings": t})


def _with_value(t: torch.Tensor, value: float, dtype: torch.dtype = torch.float32) -> bytes:
    t = t.clone().to(dtype)
    t[1, 3] = value
    return _tensor(t)


def _lying_header(weights: bytes, claimed: int) -> bytes:
    return struct.pack("<Q", claimed) + weights[8:]


def _offsets_past_end(weights: bytes) -> bytes:
    (n,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8 : 8 + n])
    header["prompt_embeddings"]["data_offsets"][1] += 4096
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + weights[8 + n :]


def _reshape_config(config: bytes, **changes: Any) -> bytes:
    return edit_config(config, **changes)


# Tiny model geometry: 2 layers, 2 KV heads x head_dim 8 -> token_dim 16, width 2 * 2 * 16 = 64.
WIDTH = 64
# Each case: (config, weights, tensor) -> (config bytes, weights bytes, expected status).
Builder = Callable[[bytes, bytes, torch.Tensor], tuple[bytes, bytes, int]]
ADAPTER_CASES: dict[str, Builder] = {
    # Not safetensors at all
    "pickle_renamed_to_safetensors": lambda c, w, t: (c, pickle_bytes({"prompt_embeddings": t}), 422),
    "legacy_pickle_protocol_2": lambda c, w, t: (c, b"\x80\x02}q\x00." + w[:32], 422),
    "truncated_in_the_data": lambda c, w, t: (c, w[: len(w) - 17], 422),
    "truncated_in_the_header": lambda c, w, t: (c, w[:20], 422),
    "only_the_length_prefix": lambda c, w, t: (c, w[:8], 422),
    "header_size_larger_than_file": lambda c, w, t: (c, _lying_header(w, len(w) + 1), 422),
    "header_size_u64_max": lambda c, w, t: (c, _lying_header(w, 2**64 - 1), 422),
    "header_size_zero": lambda c, w, t: (c, _lying_header(w, 0), 422),
    "data_offsets_past_the_end": lambda c, w, t: (c, _offsets_past_end(w), 422),
    "random_bytes": lambda c, w, t: (c, random.Random(5).randbytes(len(w)), 422),
    # Wrong tensor name / extra tensors / dtype
    "wrong_tensor_name": lambda c, w, t: (c, safetensors_bytes({"prefix_embeddings": t}), 422),
    "adapter_name_prefixed_tensor": lambda c, w, t: (c, safetensors_bytes({"base_model.prompt_embeddings": t}), 422),
    "extra_tensor": lambda c, w, t: (c, safetensors_bytes({"prompt_embeddings": t, "x": t[:1].clone()}), 422),
    "no_tensor": lambda c, w, t: (c, safetensors_bytes({}), 422),
    "integer_dtype": lambda c, w, t: (c, _tensor(t.to(torch.int32)), 422),
    # Geometry: a config field wrong (tensor as the served model expects it) ...
    "config_num_layers_wrong": lambda c, w, t: (_reshape_config(c, num_layers=3), w, 422),
    "config_num_attention_heads_wrong": lambda c, w, t: (_reshape_config(c, num_attention_heads=4), w, 422),
    "config_num_attention_heads_query_heads": lambda c, w, t: (_reshape_config(c, num_attention_heads=1), w, 422),
    "config_token_dim_wrong": lambda c, w, t: (_reshape_config(c, token_dim=32), w, 422),
    # ... or a consistent adapter for another model (config and tensor agree with each other, not with the server)
    "other_model_num_layers": lambda c, w, t: (
        _reshape_config(c, num_layers=3), _tensor(torch.randn(BATTERY_V, 3 * 2 * 16)), 422),
    "other_model_num_heads": lambda c, w, t: (
        _reshape_config(c, num_attention_heads=4, token_dim=32), _tensor(torch.randn(BATTERY_V, 2 * 2 * 32)), 422),
    "other_model_head_dim": lambda c, w, t: (
        _reshape_config(c, token_dim=32), _tensor(torch.randn(BATTERY_V, 2 * 2 * 32)), 422),
    # ... or the tensor's shape wrong
    "tensor_width_wrong": lambda c, w, t: (c, _tensor(torch.randn(BATTERY_V, WIDTH + 1)), 422),
    "tensor_1d": lambda c, w, t: (c, _tensor(t.flatten()), 422),
    "tensor_3d": lambda c, w, t: (c, _tensor(t.reshape(BATTERY_V, 4, 16)), 422),
    "tensor_transposed": lambda c, w, t: (c, _tensor(t.t().contiguous()), 422),
    "num_virtual_tokens_more_than_tensor": lambda c, w, t: (_reshape_config(c, num_virtual_tokens=BATTERY_V + 1), w, 422),
    "num_virtual_tokens_fewer_than_tensor": lambda c, w, t: (_reshape_config(c, num_virtual_tokens=BATTERY_V - 1), w, 422),
    # Values
    "nan_value": lambda c, w, t: (c, _with_value(t, float("nan")), 422),
    "inf_value": lambda c, w, t: (c, _with_value(t, float("inf")), 422),
    "minus_inf_value": lambda c, w, t: (c, _with_value(t, float("-inf")), 422),
    "float64_beyond_float32_range": lambda c, w, t: (c, _with_value(t, 1e300, torch.float64), 422),
    "nan_in_bfloat16": lambda c, w, t: (c, _with_value(t, float("nan"), torch.bfloat16), 422),
    # finite, but the model's computation overflows with it (issue 18: token 0 forever); the upload's probe forward
    "finite_values_that_overflow_the_model": lambda c, w, t: (c, _tensor(torch.full_like(t, 1e30)), 422),
    # V out of range
    "v_zero": lambda c, w, t: (_reshape_config(c, num_virtual_tokens=0), _tensor(torch.zeros(0, WIDTH)), 422),
    "v_negative": lambda c, w, t: (_reshape_config(c, num_virtual_tokens=-4), w, 422),
    "v_fills_the_context": lambda c, w, t: (  # V = max_positions leaves no room for a token; 32 KiB, under the cap
        _reshape_config(c, num_virtual_tokens=MAX_POSITIONS), _tensor(torch.randn(MAX_POSITIONS, WIDTH)), 422),
    "v_huge": lambda c, w, t: (_reshape_config(c, num_virtual_tokens=10**9), w, 422),
    "v_beyond_int64": lambda c, w, t: (_reshape_config(c, num_virtual_tokens=10**30), w, 422),
    "v_as_string": lambda c, w, t: (_reshape_config(c, num_virtual_tokens=str(BATTERY_V)), w, 422),
    "v_as_float": lambda c, w, t: (_reshape_config(c, num_virtual_tokens=float(BATTERY_V)), w, 422),
    "v_as_bool": lambda c, w, t: (_reshape_config(c, num_virtual_tokens=True), w, 422),
    "v_missing": lambda c, w, t: (_reshape_config(c, num_virtual_tokens=...), w, 422),
    # Config file itself
    "config_not_json": lambda c, w, t: (b"{peft_type: PREFIX_TUNING", w, 422),
    "config_json_array": lambda c, w, t: (b"[1, 2, 3]", w, 422),
    "config_not_utf8": lambda c, w, t: (b"\xff\xfe" + c, w, 422),
    "config_deeply_nested": lambda c, w, t: (b"[" * 2000 + b"]" * 2000, w, 422),
    "config_lora": lambda c, w, t: (_reshape_config(c, peft_type="LORA"), w, 422),
    "config_seq2seq": lambda c, w, t: (_reshape_config(c, task_type="SEQ_2_SEQ_LM"), w, 422),
    # Sizes
    "weights_0_bytes": lambda c, w, t: (c, b"", 422),
    "config_0_bytes": lambda c, w, t: (b"", w, 422),
    "weights_over_the_cap": lambda c, w, t: (c, w + b"\0" * (WEIGHTS_CAP + 1 - len(w)), 413),
    "config_over_the_cap": lambda c, w, t: (c + b" " * (CONFIG_CAP + 1 - len(c)), w, 413),
}

BAD_TASK_IDS = {
    "dot_dot_slash": "../escape",
    "dot_dot": "..",
    "dot": ".",
    "slash": "a/b",
    "absolute": "/etc",
    "backslash": "a\\b",
    "nul": "a\x00b",
    "trailing_newline": "task\n",
    "leading_dot": ".hidden",
    "leading_dash": "-x",
    "space": "a b",
    "latin1": "t\u00e2che",
    "cyrillic": "\u0437\u0430\u0434\u0430\u0447\u0430",
    "emoji": "task\U0001f600",
    "fullwidth_dot_slash": "\uff0e\uff0e\uff0fx",
    "65_chars": "a" * 65,
    "4096_chars": "b" * 4096,
    "url_encoded_dot_dot": "%2e%2e%2fx",
}


def _assert_untouched(battery: Battery, before: dict[str, str]) -> None:
    assert store_snapshot(battery.store) == before, "a rejected upload changed the store"
    listed = battery.client.get("/prefixes").json()["prefixes"]
    assert [(p["task_id"], p["sha256"]) for p in listed] == [("keep", battery.keep.sha256)]


@pytest.mark.parametrize("target", ["new_task", "replace_existing"])
@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_bad_adapter_is_4xx_and_writes_nothing(battery: Battery, case: str, target: str) -> None:
    config, weights, status = ADAPTER_CASES[case](battery.config, battery.weights, battery.tensor)
    task_id, replace = ("victim", None) if target == "new_task" else ("keep", True)
    before = store_snapshot(battery.store)
    response = battery.client.post("/prefixes", data=upload_form(task_id, replace), files=upload_files(config, weights))
    assert_json_error(response, status)
    _assert_untouched(battery, before)


@pytest.mark.parametrize("name", sorted(BAD_TASK_IDS))
def test_bad_task_id_is_422_and_writes_nothing(battery: Battery, name: str) -> None:
    before = store_snapshot(battery.store)
    response = battery.client.post(
        "/prefixes", data=upload_form(BAD_TASK_IDS[name], None), files=upload_files(battery.config, battery.weights)
    )
    assert_json_error(response, 422)
    _assert_untouched(battery, before)


@pytest.mark.parametrize("field_name", ["task_id", "adapter_config", "adapter_model"])
def test_missing_part_is_422_and_writes_nothing(battery: Battery, field_name: str) -> None:
    before = store_snapshot(battery.store)
    data = {} if field_name == "task_id" else upload_form("victim", None)
    files = {k: v for k, v in upload_files(battery.config, battery.weights).items() if k != field_name}
    assert_json_error(battery.client.post("/prefixes", data=data, files=files), 422)
    _assert_untouched(battery, before)


def test_battery_controls_a_valid_upload_is_accepted_at_the_limits(battery: Battery) -> None:
    """The battery is not vacuous: the same adapter with a 64-character id is accepted, and the survivor of every
    rejected replace still generates its own text."""
    out = battery.client.post("/generate", json=generate_body("keep"))
    assert out.status_code == 200 and out.json()["generated_text"] == battery.keep.expected_text
    longest = "a" * 64
    created = battery.client.post(
        "/prefixes", data=upload_form(longest, None), files=upload_files(battery.config, battery.weights)
    )
    assert created.status_code == 201, created.text
    assert (battery.store / longest).is_dir()
    assert battery.client.delete(f"/prefixes/{longest}").status_code == 204
    assert not (battery.store / longest).exists()


@pytest.mark.parametrize("path", ["/prefixes", "/generate"])
def test_body_over_the_cap_without_content_length_is_413(loaded: LoadedModel, tmp_path: Path, path: str) -> None:
    limit = 100_000
    settings = Settings(prefix_dir=tmp_path / "store", max_body_bytes=limit, max_json_body_bytes=limit)
    boundary = uuid.uuid4().hex

    def chunks() -> Iterator[bytes]:  # a generator body: httpx sends it chunked, with no Content-Length
        if path == "/prefixes":
            yield (f'--{boundary}\r\nContent-Disposition: form-data; name="task_id"\r\n\r\nbig\r\n--{boundary}\r\n'
                   'Content-Disposition: form-data; name="adapter_model"; filename="m.safetensors"\r\n\r\n').encode()
        else:
            yield b'{"task_id": "big", "inputs": "'
        for _ in range(5 * limit // 10_000):
            yield b"t5 " * 3_333 + b"t"

    content_type = f"multipart/form-data; boundary={boundary}" if path == "/prefixes" else "application/json"
    with ThreadedServer(create_app(settings, loaded)) as server:
        response = httpx.post(server.url + path, content=chunks(), headers={"content-type": content_type}, timeout=60)
        assert "content-length" not in response.request.headers
    assert not any(settings.prefix_dir.iterdir())
    assert_json_error(response, 413)
