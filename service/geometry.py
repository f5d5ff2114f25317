"""The KV geometry a prefix must have to fit the served model, derived the way PEFT derives it.

PEFT (`_prepare_prompt_learning_config`) sizes a prefix as `num_layers` x 2 x `token_dim`, where under grouped-query
attention `num_attention_heads` is the model's KV-head count and `token_dim = kv_heads * head_dim`. Models whose
layers have different KV shapes, share KV between layers or use non-attention layers cannot take one such prefix
faithfully; they are rejected here with a clear message rather than served wrongly.

Encoder-decoder models (T5, BART, ...): a PEFT SEQ_2_SEQ_LM prefix reaches only the decoder's self-attention, so
`num_layers`, `num_kv_heads` and `head_dim` describe the decoder; the encoder's depth is kept for the full
(encoder + decoder) prefix, whose encoder part needs the encoder's heads and head size to match the decoder's.
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
    # Decoder-only: tokens the model attends over at most (prefix + prompt + generated). Encoder-decoder: the positions
    # of each side (BART: the encoder's and the decoder's tables have this size each; see `bounded_positions`).
    max_positions: int
    encoder_num_layers: int = 0  # encoder-decoder models: the encoder's depth; 0 for decoder-only models
    # False for relative positions (T5's bucketed bias: distances past `relative_attention_max_distance` share a bucket):
    # no table to run out of on either side, so they set no limit on a request; `max_positions` then only bounds V.
    bounded_positions: bool = True

    @property
    def is_encoder_decoder(self) -> bool:
        return self.encoder_num_layers > 0

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
    """Derive the prefix geometry of a model, or raise UnsupportedModelError saying why not."""
    if getattr(config, "is_encoder_decoder", False):
        return _encoder_decoder_geometry(config)
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
    # PEFT reads the serialised config: GQA (and an explicit head_dim) count only where `num_key_value_heads` is
    # in it; otherwise the prefix has one head per query head of hidden/heads. Whether the model's cache has that
    # shape is checked at start (service.batch.verify_prefix_support).
    if raw.get("num_key_value_heads") is not None:
        num_kv_heads = int(raw["num_key_value_heads"])
        head_dim = int(raw.get("head_dim") or hidden // num_heads)
    else:
        num_kv_heads, head_dim = num_heads, hidden // num_heads

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


# The encoder-decoder families whose attention the seq2seq batch serves exactly: T5's relative position bias is
# shift-invariant (left padding changes nothing) and BART's learned decoder positions are set per row
# (`service.seq2seq`). Others (e.g. sinusoidal positions, or encoders that take other inputs) are refused.
SEQ2SEQ_MODEL_TYPES = frozenset({"t5", "mt5", "bart", "mbart"})


def _encoder_decoder_geometry(config: PretrainedConfig) -> PrefixGeometry:
    model_type = str(config.model_type)
    if model_type not in SEQ2SEQ_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{model_type}: encoder-decoder models served are {', '.join(sorted(SEQ2SEQ_MODEL_TYPES))}; "
            f"{model_type}'s positions or inputs are not handled"
        )
    decoder_layers = _first_set(config, "num_decoder_layers", "decoder_layers")
    encoder_layers = _first_set(config, "encoder_layers", "num_layers")
    decoder_heads = _first_set(config, "decoder_attention_heads", "num_heads")
    encoder_heads = _first_set(config, "encoder_attention_heads", "num_heads")
    hidden = _first_set(config, "d_model", "hidden_size")
    if None in (decoder_layers, encoder_layers, decoder_heads, encoder_heads, hidden):
        raise UnsupportedModelError(f"{model_type}: config lacks layer counts, head counts or d_model")
    assert decoder_heads is not None and hidden is not None and encoder_layers is not None
    # T5 sizes heads by d_kv (heads x d_kv may differ from d_model); BART by d_model / heads.
    head_dim = _first_set(config, "d_kv") or hidden // decoder_heads
    if encoder_heads != decoder_heads:
        raise UnsupportedModelError(
            f"{model_type}: encoder ({encoder_heads}) and decoder ({decoder_heads}) head counts differ; "
            "one prefix token size cannot fit both"
        )
    # T5's `n_positions` (512 in Google's configs) is the length it was pre-trained at, not a limit of its relative
    # positions; it stays the cap on V, as before.
    max_positions = _first_set(config, "max_position_embeddings", "n_positions") or 2048
    return PrefixGeometry(
        model_type=model_type,
        num_layers=int(decoder_layers),  # type: ignore[arg-type]
        num_kv_heads=decoder_heads,
        head_dim=head_dim,
        max_positions=max_positions,
        encoder_num_layers=encoder_layers,
        bounded_positions=getattr(config, "relative_attention_num_buckets", None) is None,
    )
