"""The KV geometry a prefix must have to fit the served model, derived the way PEFT derives it.

PEFT (`_prepare_prompt_learning_config`) sizes a prefix as `num_layers` x 2 x `token_dim`, where under grouped-query
attention `num_attention_heads` is the model's KV-head count and `token_dim = kv_heads * head_dim`. Models whose
layers have different KV shapes, share KV between layers or use non-attention layers cannot take one such prefix
faithfully; they are rejected here with a clear message rather than served wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from service.errors import UnsupportedModelError

_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}


@dataclass(frozen=True)
class PrefixGeometry:
    """Shape of one task prefix for the served model."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int  # tokens the model attends over at most: prefix + prompt + generated

    @property
    def token_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def numbers_per_virtual_token(self) -> int:
        """Width of one row of PEFT's `prompt_embeddings` tensor."""
        return self.num_layers * 2 * self.token_dim


def _first_set(config: PretrainedConfig, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def geometry_from_config(config: PretrainedConfig) -> PrefixGeometry:
    """Derive the prefix geometry of a decoder-only model, or raise UnsupportedModelError saying why not."""
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{config.model_type}: encoder-decoder models are not supported (decoder-only only)")
    text = config.get_text_config(decoder=True)
    model_type = str(getattr(text, "model_type", config.model_type))

    # Read the serialised dict: on transformers 5.x `per_layer_config` is a view object on every config.
    raw = text.to_dict()
    if raw.get("per_layer_config") or raw.get("global_head_dim"):
        raise UnsupportedModelError(
            f"{model_type}: layers have different KV shapes; one PEFT prefix cannot fit every layer"
        )
    if getattr(text, "num_kv_shared_layers", 0):
        raise UnsupportedModelError(f"{model_type}: layers share KV caches; prefixes are not supported")
    layer_types = getattr(text, "layer_types", None) or []
    unknown = sorted(set(layer_types) - _ATTENTION_LAYER_TYPES)
    if unknown:
        raise UnsupportedModelError(f"{model_type}: layer types {unknown} hold no key/value cache for a prefix")

    num_layers = _first_set(text, "num_hidden_layers", "n_layer", "num_layers")
    num_heads = _first_set(text, "num_attention_heads", "n_head", "num_heads")
    hidden = _first_set(text, "hidden_size", "n_embd", "d_model")
    if num_layers is None or num_heads is None or hidden is None:
        raise UnsupportedModelError(f"{model_type}: config lacks layer count, head count or hidden size")
    num_kv_heads = _first_set(text, "num_key_value_heads") or num_heads
    head_dim = _first_set(text, "head_dim") or hidden // num_heads

    max_positions = _first_set(text, "max_position_embeddings", "n_positions", "n_ctx", "seq_length") or 2048
    # A sliding window would silently evict prefix slots once the sequence outgrows it: cap the context instead.
    sliding_window = _first_set(text, "sliding_window")
    uses_sliding = "sliding_attention" in layer_types or (
        sliding_window is not None and getattr(text, "use_sliding_window", True) and not layer_types
    )
    if uses_sliding and sliding_window is not None:
        max_positions = min(max_positions, sliding_window)

    return PrefixGeometry(
        model_type=model_type,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_positions=max_positions,
    )
