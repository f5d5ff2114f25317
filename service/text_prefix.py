"""Tasks made from text: the frozen model's own per-layer keys/values of a text, stored as a PEFT prefix.

A prefix is per-layer K/V. Running a text T through the model once and keeping what its cache holds gives a prefix
of V = len(tokens(T)) virtual tokens that makes the model behave exactly as if T stood in front of every prompt:
the serving convention puts real tokens at positions V, V+1, ... (PEFT's), which is where they sit after T in the
concatenated prompt, and the cache holds keys after the rotary embedding (or, for ALiBi/absolute-position models,
keys that already carry what the position contributed). So greedy(task from T, x) == greedy(T + x), token for token,
when T ends on a token boundary (tokens(T + x) == tokens(T) + tokens(x)).

The result is written in PEFT's own format (`prefix_projection=False`, `prompt_embeddings` of shape
(V, L*2*token_dim), rows viewed as (V, 2L, H_kv, D): row 2l = keys of layer l, 2l+1 = values), so it is stored,
listed, tiered, batched and downloaded like any uploaded prefix, and PEFT itself loads it.

The forward runs on the caller's thread under `_LOCK` (shared with nothing else): one text task is computed at a
time, beside the engine's own thread.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import save as save_safetensors
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from service.errors import InvalidPrefixError, PayloadTooLargeError
from service.geometry import PrefixGeometry
from service.inputs import longest_token_chars
from service.templates import refuse_nul

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()


@dataclass(frozen=True)
class TextAdapter:
    """A PEFT adapter made from a text: the two files an upload would carry."""

    config_bytes: bytes
    weights_bytes: bytes
    num_tokens: int


def check_text(text: str) -> None:
    """A 422 for a text no task can be made from: blank (empty or only whitespace), or holding a NUL (the rule of
    every stored text, `service.templates.refuse_nul`)."""
    if not text.strip():
        raise InvalidPrefixError(
            "text", "a non-blank text", "an empty or blank text",
            message="text: the text is blank (empty or only whitespace); send the text the task is made from",
        )  # fmt: skip
    refuse_nul(text, "text")


def text_token_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, *, max_tokens: int, chars_per_token: int | None = None
) -> list[int]:
    """The ids of `text` as a prompt would be tokenised (the tokenizer's special tokens, e.g. a BOS, included).

    Texts are capped by characters before they are tokenised (cheap), then by tokens. The character bound is the
    prompts' (`service.inputs`): one token stands for at most `chars_per_token` characters (default: the tokenizer's
    longest vocabulary entry), so only a text that certainly cannot fit is refused untokenised.

    PayloadTooLargeError (413) over `max_tokens`; InvalidPrefixError (422) for a text that is blank or encodes to
    nothing."""
    check_text(text)
    per_token = chars_per_token if chars_per_token is not None else longest_token_chars(tokenizer)
    max_chars = max_tokens * per_token
    if len(text) > max_chars:
        raise PayloadTooLargeError(
            f"text: {len(text)} characters cannot fit the limit of {max_tokens} tokens for a task made from text "
            f"(one token stands for at most {per_token} characters, so at most {max_chars} characters are accepted)",
            field="text",
            limit=max_tokens,
        )
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if not ids:
        raise InvalidPrefixError("text", "a text of at least one token", "0 tokens")
    if len(ids) > max_tokens:
        raise PayloadTooLargeError(
            f"text: {len(ids)} tokens, more than the limit of {max_tokens} for a task made from text",
            field="text",
            limit=max_tokens,
            got=len(ids),
        )
    return ids


@torch.inference_mode()
def text_kv(model: PreTrainedModel, input_ids: Sequence[int], geometry: PrefixGeometry) -> torch.Tensor:
    """The model's cache after reading `input_ids` from position 0: (L, 2, H_kv, V, D) in the model's dtype."""
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=model.device)
    cache = DynamicCache()
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, object] = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        ("cache" if "cache" in params else "past_key_values"): cache,
        "use_cache": True,
    }
    if "position_ids" in params:
        kwargs["position_ids"] = torch.arange(ids.shape[1], device=model.device).unsqueeze(0)
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1  # a 4k-token text would otherwise build a (4k x vocab) logits tensor
    model(**kwargs)  # fills `cache` in place
    layers = []
    for layer in range(geometry.num_layers):
        keys, values = _layer_kv(cache, layer)
        layers.append(torch.stack([keys[0], values[0]]))  # (2, H, V, D)
    kv = torch.stack(layers)
    expected = (geometry.num_layers, 2, geometry.num_kv_heads, len(input_ids), geometry.head_dim)
    if tuple(kv.shape) != expected:
        raise RuntimeError(f"the model's cache has shape {tuple(kv.shape)}, expected {expected}")
    return kv


def _layer_kv(cache: object, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers 5.x Cache
        return layers[layer].keys, layers[layer].values
    keys, values = cache[layer]  # legacy tuple-of-tuples
    return keys, values


def kv_to_prompt_embeddings(kv: torch.Tensor) -> torch.Tensor:
    """(L, 2, H_kv, V, D) -> PEFT's (V, L*2*H_kv*D): the inverse of `service.prefix.prompt_embeddings_to_kv`."""
    num_layers, _, heads, num_tokens, head_dim = kv.shape
    rows = kv.reshape(2 * num_layers, heads, num_tokens, head_dim)  # row 2l = keys of layer l, 2l+1 = values
    return rows.permute(2, 0, 1, 3).reshape(num_tokens, 2 * num_layers * heads * head_dim).contiguous()


def text_prompt_embeddings(model: PreTrainedModel, input_ids: Sequence[int], geometry: PrefixGeometry) -> torch.Tensor:
    """PEFT-layout `prompt_embeddings` (V, L*2*token_dim), float32 on CPU, of the model's K/V of `input_ids`.

    Serialised by a module lock: one text task is computed at a time."""
    with _LOCK:
        kv = text_kv(model, input_ids, geometry)
    return kv_to_prompt_embeddings(kv.to(device="cpu", dtype=torch.float32))


def adapter_config(geometry: PrefixGeometry, num_virtual_tokens: int, base_model_name_or_path: str) -> dict:
    """The adapter_config.json PEFT 0.21 writes for a `prefix_projection=False` prefix of this geometry."""
    # The installed PEFT's version, as PEFT writes it, read without importing PEFT. A serving install has no peft (it
    # is the train/bench extra): then null, which PEFT itself fills in when it loads the config.
    try:
        peft_version: str | None = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        peft_version = None
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "encoder_hidden_size": geometry.token_dim,
        "inference_mode": True,
        "num_attention_heads": geometry.num_kv_heads,
        "num_layers": geometry.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": num_virtual_tokens,
        "peft_type": "PREFIX_TUNING",
        "peft_version": peft_version,
        "prefix_projection": False,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": geometry.token_dim,
    }


def make_text_adapter(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    geometry: PrefixGeometry,
    text: str,
    *,
    base_model_name_or_path: str,
    max_tokens: int,
    chars_per_token: int | None = None,
) -> TextAdapter:
    """Tokenise `text`, run it through the model once and return the PEFT adapter files of its K/V.
    `chars_per_token`: the character bound checked before tokenizing (see `text_token_ids`)."""
    cap = min(max_tokens, geometry.max_positions - 1)  # at least one position must stay free for a real token
    ids = text_token_ids(tokenizer, text, max_tokens=cap, chars_per_token=chars_per_token)
    embeddings = text_prompt_embeddings(model, ids, geometry)
    config = adapter_config(geometry, len(ids), base_model_name_or_path)
    weights = save_safetensors({"prompt_embeddings": embeddings}, metadata={"format": "pt"})
    logger.info("text task: %d tokens -> prefix of %d bytes", len(ids), len(weights))
    return TextAdapter(
        config_bytes=json.dumps(config, indent=2).encode("utf-8"), weights_bytes=weights, num_tokens=len(ids)
    )
