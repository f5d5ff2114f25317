"""Encoder-decoder models' attention plumbing: the per-forward plan (encoder prefix, per-row decoder positions), the
attention function that prepends the encoder prefix and the hook that sets BART's decoder positions.

Apart from `service.seq2seq` (the batch) because `service.runner.ModelRunner` installs it on every encoder-decoder
model it wraps, while the batch needs the runner: the three modules then import one another in one direction only.
See `service.seq2seq`'s docstring for the layout the plan describes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from service.errors import UnsupportedModelError
from service.prefix import TaskPrefix, left_padded_kv
from service.thread_plan import ThreadPlan

ATTN_IMPLEMENTATION = "prefix_serve_seq2seq"


# -- the plan: per-forward state the attention function and the position hook read --------------------------------


@dataclass
class EncoderPrefix:
    """Encoder prefix K/V of a batch: per encoder layer (B, H, Ve_max, D), left-padded; `mask` (B, Ve_max) bool."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    relative_bias: torch.Tensor | None = None  # T5: the prefix columns' bias, computed by the first layer that can

    @classmethod
    def of(cls, prefixes: Sequence[TaskPrefix | None], *, device: torch.device, dtype: torch.dtype) -> EncoderPrefix | None:
        kvs = [p.encoder_kv if p is not None else None for p in prefixes]
        template = next((kv for kv in kvs if kv is not None), None)
        if template is None:
            return None
        layers, _, heads, _, head_dim = template.shape
        return cls(*left_padded_kv(kvs, (layers, heads, head_dim), device=device, dtype=dtype))


@dataclass
class Seq2SeqPlan:
    encoder_prefix: EncoderPrefix | None = None
    decoder_positions: torch.Tensor | None = None  # (B, q): each row's own decoder positions (V_i + t)


_plans: ThreadPlan[Seq2SeqPlan] = ThreadPlan()
# Make a plan visible to the attention function and position hook of forwards run by this thread.
active_plan = _plans.active
_current_plan = _plans.current


def seq2seq_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """sdpa, with the active plan's encoder prefix prepended to every encoder self-attention."""
    plan = _current_plan()
    prefix = plan.encoder_prefix if plan is not None else None
    if prefix is None or getattr(module, "is_decoder", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # type: ignore[arg-type]
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    batch, _, q_len, _ = query.shape
    key = torch.cat([prefix.keys[layer].to(key.dtype), key], dim=2)
    value = torch.cat([prefix.values[layer].to(value.dtype), value], dim=2)
    own = attention_mask if attention_mask is not None else torch.ones(
        (batch, 1, q_len, key.shape[2] - prefix.mask.shape[1]), dtype=torch.bool, device=query.device
    )
    if own.dtype != torch.bool:  # an additive float mask (eager-style): 0 where attended
        own = own == 0
    prefix_mask = prefix.mask[:, None, None, :].expand(batch, 1, q_len, prefix.mask.shape[1])
    attention_mask = torch.cat([prefix_mask, own.expand(batch, 1, q_len, own.shape[-1])], dim=-1)
    position_bias = kwargs.get("position_bias")
    if isinstance(position_bias, torch.Tensor):
        kwargs["position_bias"] = torch.cat([_prefix_bias(module, prefix, q_len, position_bias), position_bias], dim=-1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # type: ignore[arg-type]


def _prefix_bias(module: torch.nn.Module, prefix: EncoderPrefix, q_len: int, own_bias: torch.Tensor) -> torch.Tensor:
    """T5's relative bias from x's queries to the prefix columns, the prefix sitting just before x: with the
    prefix left-padded to Ve_max, column j of every row is at distance j - Ve_max - i from query i."""
    longest = prefix.mask.shape[1]
    if getattr(module, "has_relative_attention_bias", False):
        full = module.compute_bias(q_len, longest + q_len, device=own_bias.device, past_seen_tokens=longest)  # type: ignore[operator]
        prefix.relative_bias = full[..., :longest]
    if prefix.relative_bias is None:  # a model whose first layer has no bias of its own: no positions at all
        prefix.relative_bias = torch.zeros((1, own_bias.shape[1], q_len, longest), dtype=own_bias.dtype, device=own_bias.device)
    return prefix.relative_bias.to(own_bias.dtype).expand(own_bias.shape[0], -1, -1, -1)


def _decoder_position_hook(module: torch.nn.Module, args: tuple[object, ...], output: torch.Tensor) -> torch.Tensor:
    """BART's learned decoder positions, per row, while a plan says where each row's tokens are."""
    plan = _current_plan()
    if plan is None or plan.decoder_positions is None:
        return output
    offset = int(getattr(module, "offset", 0))
    return F.embedding(plan.decoder_positions + offset, module.weight)  # type: ignore[arg-type]


def install(model: PreTrainedModel) -> None:
    """Route the model's attention through `seq2seq_attention` and hook its learned decoder positions. Idempotent;
    without an active plan the model computes exactly what sdpa computes."""
    if getattr(model, "_prefix_serve_seq2seq", False):
        return
    AttentionInterface.register(ATTN_IMPLEMENTATION, seq2seq_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    positions = getattr(model.get_decoder(), "embed_positions", None)
    if positions is not None:
        if not hasattr(positions, "weight") or not hasattr(positions, "offset"):
            raise UnsupportedModelError(f"{model.config.model_type}: decoder positions of an unknown kind")
        positions.register_forward_hook(_decoder_position_hook)
    model._prefix_serve_seq2seq = True
