"""Parse and validate one uploaded PEFT PREFIX_TUNING adapter (adapter_config.json + adapter_model.safetensors).

What PEFT 0.21.2 `save_pretrained` writes for a prefix adapter (checked against its sources and real saves):
- `adapter_config.json` with `peft_type: "PREFIX_TUNING"`, `task_type`, `num_virtual_tokens`, `num_layers`,
  `num_attention_heads` (the KV-head count under GQA), `token_dim` (kv_heads * head_dim under GQA),
  `num_transformer_submodules` (1 for decoder-only), `prefix_projection`, `encoder_hidden_size`,
  `base_model_name_or_path` (null for a model built from a config), `inference_mode`, `peft_version`, ...
- `adapter_model.safetensors` with exactly one tensor named `prompt_embeddings` (no adapter-name prefix: prompt
  learning methods store their state without it), shape (V, num_layers * 2 * token_dim), float32, metadata
  {"format": "pt"}. With `prefix_projection=True` the tensor is already the output of the MLP.

Encoder-decoder models take PEFT's `task_type: "SEQ_2_SEQ_LM"` adapters (`num_transformer_submodules` 2; any
`num_layers` >= the decoder's depth, see `service.prefix.prompt_embeddings_to_kv`). A *full* prefix (Li & Liang's
encoder + decoder prefix, trained by `prefix-serve train --prefix-sites encoder,decoder`) is the same PEFT file with
one more config key, `encoder_num_virtual_tokens` (Ve), and one more tensor, `encoder_prompt_embeddings` of shape
(Ve, encoder_layers * 2 * token_dim). Readers that check the file's tensors, as earlier versions of this server do,
refuse it with a message naming the extra tensor. PEFT 0.21 itself loads it with a warning about the unknown config
key and uses only the decoder half: the file is documented as prefix-serve's, not PEFT's.

Everything here works on untrusted bytes: the weights are parsed only by `safetensors` (never pickle), and any
failure becomes a 4xx error that names the field, what was expected and what came.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from service.errors import InvalidPrefixError, PayloadTooLargeError
from service.geometry import PrefixGeometry

logger = logging.getLogger(__name__)

EXPECTED_PEFT_TYPE = "PREFIX_TUNING"
CAUSAL_TASK_TYPE = "CAUSAL_LM"
SEQ2SEQ_TASK_TYPE = "SEQ_2_SEQ_LM"
WEIGHTS_TENSOR_NAME = "prompt_embeddings"
ENCODER_WEIGHTS_TENSOR_NAME = "encoder_prompt_embeddings"
ENCODER_LENGTH_FIELD = "encoder_num_virtual_tokens"
# PEFT's header (one tensor entry, `__metadata__` {"format": "pt"}) is ~130 bytes. The cap stops a file that is mostly
# header - a 30 MB `__metadata__` string rode along with a 0.9 MB prefix and was stored verbatim.
MAX_SAFETENSORS_HEADER_BYTES = 16 * 1024
_ACCEPTED_DTYPES: dict[torch.dtype, str] = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}


@dataclass(frozen=True)
class ValidatedAdapter:
    config: dict[str, Any]  # the parsed adapter_config.json
    prompt_embeddings: torch.Tensor  # (V, L*2*token_dim), float32, CPU
    num_virtual_tokens: int
    warnings: list[str]  # e.g. base_model_name_or_path differs from the served model
    encoder_prompt_embeddings: torch.Tensor | None = None  # a full prefix's (Ve, L_encoder*2*token_dim)

    @property
    def base_model_name_or_path(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None


def validate_adapter(
    config_bytes: bytes,
    weights_bytes: bytes,
    geometry: PrefixGeometry,
    *,
    served_model_name: str,
    max_virtual_tokens: int,
    max_prefix_bytes: int,
    max_config_bytes: int,
    check_values: bool = True,
) -> ValidatedAdapter:
    """Check an adapter against the served model's geometry; return its prompt embeddings as float32 on CPU.

    Raises PayloadTooLargeError (413) for the size caps and InvalidPrefixError (422) for everything else.
    `check_values=False` skips the finite-values pass: for a stored task whose bytes (sha256) are the ones checked at
    upload, read again on a cold load (the registry still checks the values in the served dtype).
    """
    # Size caps first: cheapest check, and nothing is parsed from an oversized upload.
    if len(config_bytes) > max_config_bytes:
        raise PayloadTooLargeError(
            f"adapter_config.json is {len(config_bytes)} bytes; the limit is {max_config_bytes}",
            field="adapter_config",
            limit=max_config_bytes,
            got=len(config_bytes),
        )
    if len(weights_bytes) > max_prefix_bytes:
        raise PayloadTooLargeError(
            f"adapter_model.safetensors is {len(weights_bytes)} bytes; the limit is {max_prefix_bytes}",
            field="adapter_model",
            limit=max_prefix_bytes,
            got=len(weights_bytes),
        )

    config = _parse_config(config_bytes)
    shape = _check_config(config, geometry, max_virtual_tokens=max_virtual_tokens)
    tensors = _parse_weights(weights_bytes, geometry, shape, check_values=check_values)
    warnings = _base_model_warnings(config, served_model_name)
    for text in warnings:
        logger.info("adapter warning: %s", text)
    return ValidatedAdapter(
        config=config,
        prompt_embeddings=tensors[WEIGHTS_TENSOR_NAME],
        num_virtual_tokens=shape.num_virtual_tokens,
        warnings=warnings,
        encoder_prompt_embeddings=tensors.get(ENCODER_WEIGHTS_TENSOR_NAME),
    )


def validate_stored_config(
    config_bytes: bytes,
    weights_size: int,
    geometry: PrefixGeometry,
    *,
    max_virtual_tokens: int,
    max_prefix_bytes: int,
    max_config_bytes: int,
) -> tuple[dict[str, Any], int]:
    """The checks of `validate_adapter` that need no weights (a stored task at start-up: its config against the
    served model and today's limits, its weights' size from a stat). Returns (config, num_virtual_tokens); the
    weights are parsed and checked when the task is first used."""
    if len(config_bytes) > max_config_bytes:
        raise PayloadTooLargeError(
            f"adapter_config.json is {len(config_bytes)} bytes; the limit is {max_config_bytes}",
            field="adapter_config", limit=max_config_bytes, got=len(config_bytes),
        )
    if weights_size > max_prefix_bytes:
        raise PayloadTooLargeError(
            f"adapter_model.safetensors is {weights_size} bytes; the limit is {max_prefix_bytes}",
            field="adapter_model", limit=max_prefix_bytes, got=weights_size,
        )
    config = _parse_config(config_bytes)
    shape = _check_config(config, geometry, max_virtual_tokens=max_virtual_tokens)
    return config, shape.num_virtual_tokens


@dataclass(frozen=True)
class _AdapterShape:
    """What the config promises the weights file holds."""

    num_virtual_tokens: int
    num_layers: int  # the adapter's L (seq2seq: >= the decoder's depth)
    encoder_num_virtual_tokens: int  # 0: no encoder prefix (every PEFT adapter)

    def expected(self, geometry: PrefixGeometry) -> dict[str, list[int]]:
        shapes = {WEIGHTS_TENSOR_NAME: [self.num_virtual_tokens, self.num_layers * 2 * geometry.token_dim]}
        if self.encoder_num_virtual_tokens:
            width = geometry.encoder_num_layers * 2 * geometry.token_dim
            shapes[ENCODER_WEIGHTS_TENSOR_NAME] = [self.encoder_num_virtual_tokens, width]
        return shapes


_UTF8_BOM = b"\xef\xbb\xbf"


def decode_utf8(data: bytes, field: str, *, skip: int = 0) -> str:
    """The one rule for every text an upload carries (the form's text fields, the text sent as a file part,
    adapter_config.json): UTF-8, else a 422 naming the field and the offset of the first bad byte. Nothing is
    decoded leniently: a Latin-1 fallback stored mojibake the client never sent. `skip`: leading bytes to leave out
    (a BOM); offsets still count from the first byte."""
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        got = f"invalid UTF-8 at byte {offset} (0x{data[offset]:02x}: {exc.reason})"
        raise InvalidPrefixError(field, "UTF-8 text", got, message=f"{field}: expected UTF-8 text, got {got}") from None


def _parse_config(config_bytes: bytes) -> dict[str, Any]:
    # Tolerate the BOM some editors write.
    text = decode_utf8(config_bytes, "adapter_config", skip=len(_UTF8_BOM) if config_bytes.startswith(_UTF8_BOM) else 0)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        got = f"invalid JSON ({exc.msg} at line {exc.lineno})"
        raise InvalidPrefixError("adapter_config", "a JSON object", got) from None
    except RecursionError:  # deeply nested arrays within the size cap
        raise InvalidPrefixError("adapter_config", "a JSON object", "JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal over Python's 4300-digit conversion limit
        raise InvalidPrefixError("adapter_config", "a JSON object", f"invalid JSON ({str(exc)[:100]})") from None
    if not isinstance(config, dict):
        raise InvalidPrefixError("adapter_config", "a JSON object", f"a JSON {json_type(config)}")
    return config


def _check_config(config: dict[str, Any], geometry: PrefixGeometry, *, max_virtual_tokens: int) -> _AdapterShape:
    """Validate the fields that decide the prefix's shape."""
    seq2seq = geometry.is_encoder_decoder
    task_type = SEQ2SEQ_TASK_TYPE if seq2seq else CAUSAL_TASK_TYPE
    for field, expected in (("peft_type", EXPECTED_PEFT_TYPE), ("task_type", task_type)):
        value = config.get(field)
        if value != expected:
            message = f"{field}: expected \"{expected}\", got {_describe(config, field)}"
            if field == "task_type" and value in (CAUSAL_TASK_TYPE, SEQ2SEQ_TASK_TYPE):
                kinds = ("an encoder-decoder", "a decoder-only") if seq2seq else ("a decoder-only", "an encoder-decoder")
                message += f": this server runs {kinds[0]} model ({geometry.model_type}); the adapter is for {kinds[1]} one"
            raise InvalidPrefixError(field, expected, _show(value), message=message)

    # The prefix occupies V cache slots; at least one position must remain for a real token.
    cap = min(max_virtual_tokens, geometry.max_positions - 1)
    num_virtual_tokens = _int_field(config, "num_virtual_tokens", f"an integer in [1, {cap}]")
    if not 1 <= num_virtual_tokens <= cap:
        raise InvalidPrefixError("num_virtual_tokens", f"an integer in [1, {cap}]", num_virtual_tokens)

    if seq2seq:
        # PEFT maps decoder layer i to rows 4i and 4i+1 (mod 2L) of its 2L: any L covering the decoder works.
        least = f"an integer >= {geometry.num_layers} (the decoder's depth)"
        num_layers = _int_field(config, "num_layers", least)
        if num_layers < geometry.num_layers:
            raise InvalidPrefixError(
                "num_layers",
                least,
                num_layers,
                message=(
                    f"num_layers: expected at least {geometry.num_layers} (the served model's decoder layers; PEFT's "
                    f"default is the encoder's depth, set num_layers={geometry.num_layers} when the decoder is "
                    f"deeper), got {num_layers}"
                ),
            )
    else:
        num_layers = _int_field(config, "num_layers", geometry.num_layers)
        if num_layers != geometry.num_layers:
            raise InvalidPrefixError("num_layers", geometry.num_layers, num_layers)
    # Under GQA PEFT stores the KV-head count here, not the query-head count.
    num_heads = _int_field(config, "num_attention_heads", geometry.num_kv_heads)
    if num_heads != geometry.num_kv_heads:
        raise InvalidPrefixError(
            "num_attention_heads",
            geometry.num_kv_heads,
            num_heads,
            message=(
                f"num_attention_heads: expected {geometry.num_kv_heads} (the served model's key/value heads), "
                f"got {num_heads}"
            ),
        )
    token_dim = _int_field(config, "token_dim", geometry.token_dim)
    if token_dim != geometry.token_dim:
        raise InvalidPrefixError(
            "token_dim",
            geometry.token_dim,
            token_dim,
            message=(
                f"token_dim: expected {geometry.token_dim} (= {geometry.num_kv_heads} kv heads x "
                f"{geometry.head_dim} head_dim), got {token_dim}"
            ),
        )
    # Implied by the two checks above; kept so a geometry that is itself inconsistent cannot slip through.
    if token_dim % num_heads or token_dim // num_heads != geometry.head_dim:
        raise InvalidPrefixError("token_dim", f"{geometry.head_dim} x num_attention_heads", token_dim)

    submodules = config.get("num_transformer_submodules")
    expected_submodules, meaning = (2, "encoder-decoder") if seq2seq else (1, "decoder-only")
    if submodules is not None and (not _is_int(submodules) or submodules != expected_submodules):
        raise InvalidPrefixError(
            "num_transformer_submodules", f"{expected_submodules} ({meaning}) or null", _show(submodules)
        )

    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise InvalidPrefixError("base_model_name_or_path", "a string or null", json_type(base))
    return _AdapterShape(num_virtual_tokens, num_layers, _encoder_length(config, geometry, cap))


def _encoder_length(config: dict[str, Any], geometry: PrefixGeometry, cap: int) -> int:
    """The full prefix's encoder length Ve, or 0 when the adapter has no encoder prefix (PEFT's kind)."""
    if config.get(ENCODER_LENGTH_FIELD) is None:
        return 0
    if not geometry.is_encoder_decoder:
        raise InvalidPrefixError(
            ENCODER_LENGTH_FIELD,
            "null (no encoder prefix)",
            _show(config[ENCODER_LENGTH_FIELD]),
            message=(
                f"{ENCODER_LENGTH_FIELD}: this adapter has an encoder prefix, which needs an encoder-decoder model; "
                f"this server runs a decoder-only model ({geometry.model_type})"
            ),
        )
    length = _int_field(config, ENCODER_LENGTH_FIELD, f"an integer in [1, {cap}] or null")
    if not 1 <= length <= cap:
        raise InvalidPrefixError(ENCODER_LENGTH_FIELD, f"an integer in [1, {cap}] or null", length)
    return length


def _parse_weights(
    weights_bytes: bytes, geometry: PrefixGeometry, shape: _AdapterShape, *, check_values: bool = True
) -> dict[str, torch.Tensor]:
    if not weights_bytes:
        raise InvalidPrefixError("adapter_model", "a non-empty safetensors file", "0 bytes")
    _check_header_size(weights_bytes)
    try:
        # safetensors validates the header length, offsets and buffer size itself; it never unpickles.
        tensors = load_safetensors(weights_bytes)
    except Exception as exc:  # noqa: BLE001 - untrusted input: any parser failure is the client's 4xx
        got = _describe_unparseable(weights_bytes, exc)
        raise InvalidPrefixError("adapter_model", "a safetensors file", got) from None

    names = sorted(tensors)
    expected_shapes = shape.expected(geometry)
    if names != sorted(expected_shapes):
        expected = " and ".join(f"'{n}'" for n in sorted(expected_shapes))
        expected = f"exactly the tensor{'s' if len(expected_shapes) > 1 else ''} {expected}"
        got = f"tensors {[n[:100] for n in names[:10]]}" + (f" (+{len(names) - 10} more)" if len(names) > 10 else "")
        message = None
        if ENCODER_WEIGHTS_TENSOR_NAME in tensors and not shape.encoder_num_virtual_tokens:
            message = (
                f"adapter_model: expected {expected}, got {got}; '{ENCODER_WEIGHTS_TENSOR_NAME}' is a full "
                f"(encoder + decoder) prefix's encoder half: its adapter_config.json must set {ENCODER_LENGTH_FIELD}"
            )
        elif WEIGHTS_TENSOR_NAME in tensors and not set(names) <= set(expected_shapes):
            # PEFT adds e.g. base_model.model.embed_tokens.weight / base_model.lm_head.weight when the vocabulary was
            # resized during training (or save_embedding_layers=True). The served model's weights are fixed.
            message = (
                f"adapter_model: expected {expected}, got {got}; the extra tensors (saved by PEFT when the "
                "vocabulary was resized or save_embedding_layers=True) would change the base model, which this "
                "server cannot do per task"
            )
        raise InvalidPrefixError("adapter_model", expected, got, message=message)
    return {
        name: _checked_tensor(name, tensors[name], expected_shapes[name], shape, geometry, check_values=check_values)
        for name in names
    }


def _checked_tensor(
    name: str, tensor: torch.Tensor, expected_shape: list[int], shape: _AdapterShape, geometry: PrefixGeometry,
    *, check_values: bool = True,
) -> torch.Tensor:
    if tensor.dtype not in _ACCEPTED_DTYPES:
        raise InvalidPrefixError(f"{name}.dtype", "one of " + "/".join(_ACCEPTED_DTYPES.values()), str(tensor.dtype))
    if list(tensor.shape) != expected_shape:
        if name == WEIGHTS_TENSOR_NAME:
            meaning = (
                f"num_virtual_tokens x num_layers*2*token_dim = {shape.num_virtual_tokens} x "
                f"{shape.num_layers}*2*{geometry.token_dim}"
            )
        else:
            meaning = (
                f"{ENCODER_LENGTH_FIELD} x encoder layers*2*token_dim = {shape.encoder_num_virtual_tokens} x "
                f"{geometry.encoder_num_layers}*2*{geometry.token_dim}"
            )
        raise InvalidPrefixError(
            f"{name}.shape",
            expected_shape,
            list(tensor.shape),
            message=f"{name}.shape: expected {expected_shape} ({meaning}), got {list(tensor.shape)}",
        )

    # Check after the cast: a float64 value beyond float32's range becomes inf here and is caught too.
    tensor = tensor.to(device="cpu", dtype=torch.float32).contiguous()
    if not check_values:
        return tensor
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InvalidPrefixError(name, "finite values", f"{bad} NaN/inf value(s) (as float32)")
    return tensor


def _check_header_size(data: bytes) -> None:
    """Refuse an oversized safetensors header before parsing it (the file is stored verbatim once accepted)."""
    if len(data) < 8:
        return  # too short to be safetensors: the parser names that
    (header_bytes,) = struct.unpack("<Q", data[:8])
    if header_bytes <= MAX_SAFETENSORS_HEADER_BYTES or header_bytes > len(data) - 8:
        return  # normal, or a lying length that the parser rejects with its own message
    metadata = ""
    try:
        header = json.loads(data[8 : 8 + header_bytes])
        if isinstance(header, dict) and "__metadata__" in header:
            metadata = f", {len(json.dumps(header['__metadata__']))} of them in __metadata__"
    except (ValueError, RecursionError):
        pass
    raise InvalidPrefixError(
        "adapter_model",
        f"a safetensors header of at most {MAX_SAFETENSORS_HEADER_BYTES} bytes",
        f"{header_bytes} bytes",
        message=(
            f"adapter_model: the safetensors header is {header_bytes} bytes{metadata}; at most "
            f"{MAX_SAFETENSORS_HEADER_BYTES} are accepted (PEFT writes about 130: one tensor entry and "
            '{"format": "pt"}); save the adapter without extra metadata'
        ),
    )


def _describe_unparseable(data: bytes, exc: Exception) -> str:
    # Name the common mistake (adapter_model.bin renamed) from its magic bytes; nothing is deserialised.
    if data.startswith(b"PK\x03\x04"):
        return "a zip archive, likely a torch.save checkpoint (adapter_model.bin); only safetensors is accepted"
    if data[:1] == b"\x80" and data[1:2] in {bytes([n]) for n in range(2, 6)}:
        return "a Python pickle (torch.save legacy format); only safetensors is accepted"
    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return f"unparseable data ({reason})"


def _base_model_warnings(config: dict[str, Any], served_model_name: str) -> list[str]:
    base = config.get("base_model_name_or_path")
    if not base:
        return []  # PEFT writes null for models built from a config; the geometry checks are the real guard
    if _model_key(base) == _model_key(served_model_name):
        return []
    return [
        f"adapter was trained for base model '{base}' but this server runs '{served_model_name}'; "
        "the shapes fit, but the prefix may not behave as trained"
    ]


def _model_key(name: str) -> str:
    """Loose model identity: last path component (Hub id or local path), case-insensitive."""
    stripped = name.strip().replace("\\", "/").rstrip("/")
    return stripped.rsplit("/", 1)[-1].lower()


def _int_field(config: dict[str, Any], field: str, expected: Any) -> int:
    value = config.get(field)
    if not _is_int(value):
        raise InvalidPrefixError(
            field, expected, _show(value), message=f"{field}: expected {expected}, got {_describe(config, field)}"
        )
    return int(value)


def _describe(config: dict[str, Any], field: str) -> str:
    """A config value as the user would recognise it: `"20"` is "the string \"20\"", not 20; an absent field is
    missing, not None."""
    if field not in config:
        return "nothing (the field is missing)"
    value = config[field]
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if isinstance(value, str):
        shown = value if len(value) <= 100 else value[:100] + "..."
        return f"the string {json.dumps(shown)}"
    if isinstance(value, float):
        return f"the number {value}" if math.isfinite(value) else f"the number {value} (not finite)"
    if isinstance(value, int):
        return f"{_show(value)}"
    return f"a JSON {json_type(value)}"


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python; JSON true must not pass as 1. 5.0 is not accepted either: PEFT writes ints.
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> Any:
    """A client-supplied value, safe to echo in an error: short scalars as they are, anything else described.

    Non-finite floats (JSON NaN/Infinity, which Python's json accepts) become strings: a JSON response cannot
    carry them.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 10**18 else "a very large integer"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value if len(value) <= 100 else value[:100] + "..."
    return f"a JSON {json_type(value)}"


def json_type(value: Any) -> str:
    """The JSON type name of a parsed value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
