"""validate_adapter on real PEFT prefix adapters and on every way an upload can be wrong."""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save as save_safetensors

from service.errors import InvalidPrefixError, PayloadTooLargeError
from service.geometry import PrefixGeometry
from service.prefix import prompt_embeddings_to_kv
from service.prefix_format import ValidatedAdapter, validate_adapter
from tests.helpers import (
    STORE_LIMITS,
    edit_config,
    make_peft_prefix_adapter,
    make_peft_prefix_model,
    pickle_bytes,
    read_adapter,
    safetensors_bytes,
)

V = 5
SERVED = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def adapter(tiny_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    return read_adapter(make_peft_prefix_adapter(tiny_model, tmp_path_factory.mktemp("adapter"), V, seed=1))


def validate(config: bytes, weights: bytes, geometry: PrefixGeometry, **overrides: Any) -> ValidatedAdapter:
    kwargs = {**STORE_LIMITS, "served_model_name": SERVED, **overrides}
    return validate_adapter(config, weights, geometry, **kwargs)


def reject(config: bytes, weights: bytes, geometry: PrefixGeometry, field: str, **overrides: Any) -> InvalidPrefixError:
    with pytest.raises(InvalidPrefixError) as info:
        validate(config, weights, geometry, **overrides)
    err = info.value
    assert err.status_code == 422
    assert err.details["field"] == field, err.message
    assert "expected" in err.details and "got" in err.details
    json.dumps(err.to_json(), allow_nan=False)  # what the HTTP layer sends must serialise
    return err


def prompt_embeddings(weights: bytes) -> torch.Tensor:
    from safetensors.torch import load

    return load(weights)["prompt_embeddings"]


# ----------------------------------------------------------------------------- what PEFT writes, and acceptance


def test_peft_saves_one_prompt_embeddings_tensor_and_gqa_config(adapter: tuple[bytes, bytes]) -> None:
    config_bytes, weights = adapter
    config = json.loads(config_bytes)
    assert config["peft_type"] == "PREFIX_TUNING" and config["task_type"] == "CAUSAL_LM"
    # GQA: PEFT stores the KV-head count and kv_heads * head_dim, not the query heads / hidden size.
    assert (config["num_layers"], config["num_attention_heads"], config["token_dim"]) == (2, 2, 16)
    assert config["num_transformer_submodules"] == 1 and config["num_virtual_tokens"] == V
    from safetensors.torch import load

    tensors = load(weights)
    assert list(tensors) == ["prompt_embeddings"]
    assert tensors["prompt_embeddings"].shape == (V, 2 * 2 * 16) and tensors["prompt_embeddings"].dtype == torch.float32


def test_valid_adapter(adapter: tuple[bytes, bytes], tiny_geometry: PrefixGeometry) -> None:
    config_bytes, weights = adapter
    result = validate(config_bytes, weights, tiny_geometry)
    assert result.num_virtual_tokens == V
    assert result.config == json.loads(config_bytes)
    assert result.prompt_embeddings.dtype == torch.float32 and result.prompt_embeddings.device.type == "cpu"
    assert torch.equal(result.prompt_embeddings, prompt_embeddings(weights))
    assert result.warnings == []  # a from-config model has base_model_name_or_path null: nothing to compare
    assert result.base_model_name_or_path is None


def test_gqa_geometry(tiny_geometry: PrefixGeometry) -> None:
    assert (tiny_geometry.num_layers, tiny_geometry.num_kv_heads, tiny_geometry.head_dim) == (2, 2, 8)
    assert tiny_geometry.token_dim == 16 and tiny_geometry.numbers_per_virtual_token == 64


@pytest.mark.parametrize("prefix_projection", [False, True])
def test_layout_matches_peft_get_prompt(
    tiny_model: torch.nn.Module, tiny_geometry: PrefixGeometry, tmp_path: Path, prefix_projection: bool
) -> None:
    peft_model = make_peft_prefix_model(tiny_model, 7, seed=3, prefix_projection=prefix_projection)
    peft_model.save_pretrained(str(tmp_path))
    result = validate(*read_adapter(tmp_path), tiny_geometry)
    kv = prompt_embeddings_to_kv(result.prompt_embeddings, tiny_geometry, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        cache = peft_model.get_prompt(batch_size=1)
    assert len(cache.layers) == tiny_geometry.num_layers
    for layer in range(tiny_geometry.num_layers):
        torch.testing.assert_close(kv[layer, 0], cache.layers[layer].keys[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(kv[layer, 1], cache.layers[layer].values[0], rtol=0, atol=1e-6)


def test_helper_prefix_changes_the_output(tiny_model: torch.nn.Module) -> None:
    """The helper's init must make the prefix matter, or parity tests downstream would prove nothing."""
    peft_model = make_peft_prefix_model(tiny_model, V, seed=4)
    input_ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        base = tiny_model(input_ids=input_ids).logits
        with_prefix = peft_model(input_ids=input_ids).logits
    assert (base - with_prefix).abs().max().item() > 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_accepted_float_dtypes_become_float32(
    adapter: tuple[bytes, bytes], tiny_geometry: PrefixGeometry, dtype: torch.dtype
) -> None:
    config_bytes, weights = adapter
    original = prompt_embeddings(weights)
    result = validate(config_bytes, safetensors_bytes({"prompt_embeddings": original.to(dtype)}), tiny_geometry)
    assert result.prompt_embeddings.dtype == torch.float32
    torch.testing.assert_close(result.prompt_embeddings, original.to(dtype).float())


def test_base_model_warning(adapter: tuple[bytes, bytes], tiny_geometry: PrefixGeometry) -> None:
    config_bytes, weights = adapter
    other = edit_config(config_bytes, base_model_name_or_path="meta-llama/Llama-3.2-1B")
    result = validate(other, weights, tiny_geometry)
    assert len(result.warnings) == 1
    assert "meta-llama/Llama-3.2-1B" in result.warnings[0] and SERVED in result.warnings[0]
    # Loose comparison: basename, case-insensitive, local path or Hub id.
    for same in (SERVED, "smollm2-135m-instruct", "/models/SmolLM2-135M-Instruct/", "C:\\m\\SmolLM2-135M-Instruct"):
        assert validate(edit_config(config_bytes, base_model_name_or_path=same), weights, tiny_geometry).warnings == []


def test_real_base_model_name_is_saved_and_warned(
    tiny_model: torch.nn.Module, tiny_geometry: PrefixGeometry, tmp_path: Path
) -> None:
    out = make_peft_prefix_adapter(tiny_model, tmp_path, V, seed=2, base_model_name_or_path="org/Other-Model")
    config_bytes, weights = read_adapter(out)
    assert json.loads(config_bytes)["base_model_name_or_path"] == "org/Other-Model"
    result = validate(config_bytes, weights, tiny_geometry)
    assert result.base_model_name_or_path == "org/Other-Model" and len(result.warnings) == 1


# ----------------------------------------------------------------------------- size caps (413)


def test_config_too_large(adapter: tuple[bytes, bytes], tiny_geometry: PrefixGeometry) -> None:
    config_bytes, weights = adapter
    with pytest.raises(PayloadTooLargeError) as info:
        validate(config_bytes, weights, tiny_geometry, max_config_bytes=len(config_bytes) - 1)
    assert info.value.status_code == 413 and info.value.details["field"] == "adapter_config"
    validate(config_bytes, weights, tiny_geometry, max_config_bytes=len(config_bytes))  # the cap itself is allowed


def test_weights_too_large(adapter: tuple[bytes, bytes], tiny_geometry: PrefixGeometry) -> None:
    config_bytes, weights = adapter
    with pytest.raises(PayloadTooLargeError) as info:
        validate(config_bytes, weights, tiny_geometry, max_prefix_bytes=len(weights) - 1)
    assert info.value.status_code == 413 and info.value.details["field"] == "adapter_model"
    validate(config_bytes, weights, tiny_geometry, max_prefix_bytes=len(weights))


# ----------------------------------------------------------------------------- config rejections (422)

CONFIG_CASES: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("not utf-8", lambda c: b"\xff\xfe\x00{" + c, "adapter_config"),
    ("utf-16", lambda c: c.decode().encode("utf-16"), "adapter_config"),
    ("invalid json", lambda c: c[:-2], "adapter_config"),
    ("empty", lambda c: b"", "adapter_config"),
    ("json array", lambda c: b"[1, 2]", "adapter_config"),
    ("json string", lambda c: b'"PREFIX_TUNING"', "adapter_config"),
    ("deeply nested", lambda c: b"[" * 10000 + b"]" * 10000, "adapter_config"),
    ("huge int literal", lambda c: b'{"num_virtual_tokens": ' + b"9" * 5000 + b"}", "adapter_config"),
    ("lora", lambda c: edit_config(c, peft_type="LORA"), "peft_type"),
    ("prompt tuning", lambda c: edit_config(c, peft_type="PROMPT_TUNING"), "peft_type"),
    ("lowercase peft_type", lambda c: edit_config(c, peft_type="prefix_tuning"), "peft_type"),
    ("no peft_type", lambda c: edit_config(c, peft_type=...), "peft_type"),
    ("peft_type object", lambda c: edit_config(c, peft_type={"a": 1}), "peft_type"),
    ("seq2seq", lambda c: edit_config(c, task_type="SEQ_2_SEQ_LM"), "task_type"),
    ("no task_type", lambda c: edit_config(c, task_type=None), "task_type"),
    ("V zero", lambda c: edit_config(c, num_virtual_tokens=0), "num_virtual_tokens"),
    ("V negative", lambda c: edit_config(c, num_virtual_tokens=-5), "num_virtual_tokens"),
    ("V over cap", lambda c: edit_config(c, num_virtual_tokens=65), "num_virtual_tokens"),
    ("V string", lambda c: edit_config(c, num_virtual_tokens="5"), "num_virtual_tokens"),
    ("V float", lambda c: edit_config(c, num_virtual_tokens=5.0), "num_virtual_tokens"),
    ("V bool", lambda c: edit_config(c, num_virtual_tokens=True), "num_virtual_tokens"),
    ("V missing", lambda c: edit_config(c, num_virtual_tokens=...), "num_virtual_tokens"),
    ("V NaN", lambda c: c.replace(b'"num_virtual_tokens": 5', b'"num_virtual_tokens": NaN'), "num_virtual_tokens"),
    ("layers", lambda c: edit_config(c, num_layers=3), "num_layers"),
    ("layers missing", lambda c: edit_config(c, num_layers=...), "num_layers"),
    # The classic GQA mistake: query heads / hidden size instead of KV heads / kv_heads * head_dim.
    ("query heads", lambda c: edit_config(c, num_attention_heads=4), "num_attention_heads"),
    ("hidden size", lambda c: edit_config(c, token_dim=32), "token_dim"),
    ("token_dim string", lambda c: edit_config(c, token_dim="16"), "token_dim"),
    ("two submodules", lambda c: edit_config(c, num_transformer_submodules=2), "num_transformer_submodules"),
    ("submodules string", lambda c: edit_config(c, num_transformer_submodules="1"), "num_transformer_submodules"),
    ("base model number", lambda c: edit_config(c, base_model_name_or_path=5), "base_model_name_or_path"),
]


@pytest.mark.parametrize(("case", "mutate", "field"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_rejections(
    adapter: tuple[bytes, bytes], tiny_geometry: PrefixGeometry, case: str, mutate: Callable[[bytes], bytes], field: str
) -> None:
    config_bytes, weights = adapter
    reject(mutate(config_bytes), weights, tiny_geometry, field, max_config_bytes=1 << 16)


def test_error_names_expected_and_got(adapter: tuple[bytes, bytes], tiny_geometry: PrefixGeometry) -> None:
    config_bytes, weights = adapter
    err = reject(edit_config(config_bytes, num_attention_heads=4), weights, tiny_geometry, "num_attention_heads")
    assert err.details["expected"] == 2 and err.details["got"] == 4
    err = reject(edit_config(config_bytes, token_dim=32), weights, tiny_geometry, "token_dim")
    assert err.details["expected"] == 16 and err.details["got"] == 32
    err = reject(edit_config(config_bytes, num_virtual_tokens=65), weights, tiny_geometry, "num_virtual_tokens")
    assert "64" in str(err.details["expected"]) and err.details["got"] == 65


def test_config_with_bom_and_null_submodules_accepted(
    adapter: tuple[bytes, bytes], tiny_geometry: PrefixGeometry
) -> None:
    config_bytes, weights = adapter
    assert validate(b"\xef\xbb\xbf" + config_bytes, weights, tiny_geometry).num_virtual_tokens == V
    no_submodules = edit_config(config_bytes, num_transformer_submodules=None)
    assert validate(no_submodules, weights, tiny_geometry).num_virtual_tokens == V


def test_virtual_tokens_capped_by_context(adapter: tuple[bytes, bytes], tiny_geometry: PrefixGeometry) -> None:
    config_bytes, weights = adapter
    small = replace(tiny_geometry, max_positions=V)  # V prefix slots would leave no room for a single real token
    reject(config_bytes, weights, small, "num_virtual_tokens")
    assert validate(config_bytes, weights, replace(tiny_geometry, max_positions=V + 1)).num_virtual_tokens == V


def test_other_geometry_rejected(adapter: tuple[bytes, bytes], tiny_geometry: PrefixGeometry) -> None:
    config_bytes, weights = adapter
    reject(config_bytes, weights, replace(tiny_geometry, num_layers=3), "num_layers")
    reject(config_bytes, weights, replace(tiny_geometry, num_kv_heads=4), "num_attention_heads")  # an MHA model
    reject(config_bytes, weights, replace(tiny_geometry, head_dim=16), "token_dim")


# ----------------------------------------------------------------------------- weights rejections (422)


def _one(tensor: torch.Tensor, name: str = "prompt_embeddings") -> bytes:
    return safetensors_bytes({name: tensor})


def _lying_header(weights: bytes, delta: int) -> bytes:
    (size,) = struct.unpack("<Q", weights[:8])
    return struct.pack("<Q", size + delta) + weights[8:]


WEIGHT_CASES: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("empty", lambda w: b"", "adapter_model"),
    ("pickle renamed", lambda w: pickle_bytes({"prompt_embeddings": torch.zeros(V, 64)}), "adapter_model"),
    ("raw pickle", lambda w: pickle.dumps({"prompt_embeddings": [0.0] * 10}), "adapter_model"),
    ("truncated", lambda w: w[: len(w) - 7], "adapter_model"),
    ("truncated header", lambda w: w[:20], "adapter_model"),
    ("only length", lambda w: w[:8], "adapter_model"),
    ("header claims huge", lambda w: struct.pack("<Q", 2**63) + w[8:], "adapter_model"),
    ("header claims longer", lambda w: _lying_header(w, 16), "adapter_model"),
    ("header claims shorter", lambda w: _lying_header(w, -4), "adapter_model"),
    ("trailing garbage", lambda w: w + b"\x00" * 16, "adapter_model"),
    ("garbage", lambda w: bytes(range(256)) * 8, "adapter_model"),
    ("text", lambda w: b"hello, this is not a tensor file", "adapter_model"),
    ("no tensors", lambda w: safetensors_bytes({}), "adapter_model"),
    (
        "extra tensor",
        lambda w: safetensors_bytes({"prompt_embeddings": torch.zeros(V, 64), "x": torch.zeros(1)}),
        "adapter_model",
    ),
    (
        "embedding layers saved too",
        lambda w: safetensors_bytes(
            {
                "prompt_embeddings": torch.zeros(V, 64),
                "base_model.model.embed_tokens.weight": torch.zeros(128, 32),
                "base_model.lm_head.weight": torch.zeros(128, 32),
            }
        ),
        "adapter_model",
    ),
    ("prefixed name", lambda w: _one(torch.zeros(V, 64), "base_model.prompt_embeddings"), "adapter_model"),
    ("encoder name", lambda w: _one(torch.zeros(V, 64), "prompt_encoder.default.embedding.weight"), "adapter_model"),
    ("int dtype", lambda w: _one(torch.zeros(V, 64, dtype=torch.int32)), "prompt_embeddings.dtype"),
    ("bool dtype", lambda w: _one(torch.zeros(V, 64, dtype=torch.bool)), "prompt_embeddings.dtype"),
    ("float8", lambda w: _one(torch.zeros(V, 64).to(torch.float8_e4m3fn)), "prompt_embeddings.dtype"),
    ("fewer rows than V", lambda w: _one(torch.zeros(V - 1, 64)), "prompt_embeddings.shape"),
    ("wrong width", lambda w: _one(torch.zeros(V, 128)), "prompt_embeddings.shape"),
    ("1-D", lambda w: _one(torch.zeros(V * 64)), "prompt_embeddings.shape"),
    ("3-D", lambda w: _one(torch.zeros(1, V, 64)), "prompt_embeddings.shape"),
]


@pytest.mark.parametrize(("case", "mutate", "field"), WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_weight_rejections(
    adapter: tuple[bytes, bytes], tiny_geometry: PrefixGeometry, case: str, mutate: Callable[[bytes], bytes], field: str
) -> None:
    config_bytes, weights = adapter
    reject(config_bytes, mutate(weights), tiny_geometry, field)


@pytest.mark.parametrize(
    "bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_rejected(
    adapter: tuple[bytes, bytes], tiny_geometry: PrefixGeometry, bad: float, dtype: torch.dtype
) -> None:
    config_bytes, weights = adapter
    tensor = prompt_embeddings(weights).clone().to(dtype)
    tensor[2, 17] = bad
    reject(config_bytes, safetensors_bytes({"prompt_embeddings": tensor}), tiny_geometry, "prompt_embeddings")


def test_float64_beyond_float32_range_rejected(adapter: tuple[bytes, bytes], tiny_geometry: PrefixGeometry) -> None:
    config_bytes, weights = adapter
    tensor = prompt_embeddings(weights).double()
    tensor[0, 0] = 1e39  # finite in float64, inf once converted to float32
    reject(config_bytes, safetensors_bytes({"prompt_embeddings": tensor}), tiny_geometry, "prompt_embeddings")


def test_never_unpickles(
    adapter: tuple[bytes, bytes], tiny_geometry: PrefixGeometry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pickle upload must be rejected by the safetensors parser, not deserialised."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle-based loading was called on uploaded bytes")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    config_bytes, weights = adapter
    err = reject(config_bytes, pickle_bytes({"prompt_embeddings": torch.zeros(V, 64)}), tiny_geometry, "adapter_model")
    assert "torch.save" in err.message and "only safetensors" in err.message
    err = reject(config_bytes, pickle.dumps({"prompt_embeddings": [0.0]}), tiny_geometry, "adapter_model")
    assert "pickle" in err.message
    assert validate(config_bytes, weights, tiny_geometry).num_virtual_tokens == V


def test_config_errors_say_what_came_in_the_users_terms(
    adapter: tuple[bytes, bytes], tiny_geometry: PrefixGeometry
) -> None:
    """A quoted number is a string, not "got 20"; an absent field is missing, not "got None"."""
    config, weights = adapter
    quoted = reject(edit_config(config, num_virtual_tokens="4"), weights, tiny_geometry, "num_virtual_tokens")
    assert 'the string "4"' in quoted.message, quoted.message
    missing = reject(edit_config(config, peft_type=...), weights, tiny_geometry, "peft_type")
    assert "missing" in missing.message and "None" not in missing.message, missing.message
    null = reject(edit_config(config, num_layers=None), weights, tiny_geometry, "num_layers")
    assert "null" in null.message and "None" not in null.message, null.message


def test_oversized_safetensors_metadata_is_refused(adapter: tuple[bytes, bytes], tiny_geometry: PrefixGeometry) -> None:
    """A 30 MB `__metadata__` string used to be stored verbatim beside a 0.9 MB prefix."""
    config, weights = adapter
    tensor = prompt_embeddings(weights)
    padded = save_safetensors({"prompt_embeddings": tensor}, metadata={"format": "pt", "junk": "x" * 100_000})
    err = reject(config, padded, tiny_geometry, "adapter_model")
    assert "__metadata__" in err.message and "16384" in err.message, err.message
    modest = save_safetensors({"prompt_embeddings": tensor}, metadata={"format": "pt", "note": "trained on X"})
    assert validate(config, modest, tiny_geometry).num_virtual_tokens == tensor.shape[0]
