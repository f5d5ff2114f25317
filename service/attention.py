"""Ragged attention over the engine's KV store, plugged in through transformers' own extension points.

One forward pass carries every running row's next token *and* new rows' prompt chunks as one flat sequence
(batch 1, N tokens). transformers still runs the model's own projections, rotary embeddings and MLPs; only two
things are ours:

- `SlotCache`, a `Cache` whose `update` writes each token's K/V into its row's slot at its column, in place;
- `slot_attention`, registered in `AttentionInterface` (with sdpa's mask function), which computes each token's
  attention over [its task's prefix in the bank ; its row's own KV up to itself].

The step's layout (`StepPlan`) is set for the duration of one forward on the engine thread. Any other forward of the
same model (a reference run, the start-up check, another thread) sees no plan and runs plain sdpa, so switching a
model to this implementation changes nothing else about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Cache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from service.kv_store import PrefixBank, SlotStore
from service.thread_plan import ThreadPlan

ATTN_IMPLEMENTATION = "prefix_serve_slots"


@dataclass(frozen=True)
class PrefillChunk:
    """`length` prompt tokens of the row in `slot`, at flat positions [start, start + length), own columns
    [first_column, first_column + length); its prefix is bank columns [prefix_offset, prefix_offset + prefix_length)."""

    slot: int
    start: int
    length: int
    first_column: int
    prefix_offset: int
    prefix_length: int


@dataclass
class StepPlan:
    """Where every token of one flat forward pass lives and what it attends to. Built once per step, read per layer.

    Flat tokens [0, num_decode) are decode tokens (one per decoding row); prefill chunks follow.
    """

    num_decode: int
    decode_slots: torch.Tensor  # (num_decode,) long: the slot of each decode token
    decode_dense: bool  # decode_slots == arange(num_decode): the rows' own KV is one slice of the store
    own_width: int  # decode rows read own columns [0, own_width) of their slots
    # (num_decode, P) long: each decode row's prefix columns in the bank (P: the step's longest prefix; a shorter
    # or absent prefix repeats a column of a prefix in use, hidden). Gathered per row, so a row's attention costs
    # its own prefix, not every prefix of the step (32 tasks at once would make each row score 32 prefixes).
    decode_prefix_columns: torch.Tensor | None
    # (num_decode, 1, 1, P + own_width) bool: True where a row may not look (prefix padding, columns not written
    # yet). Applied with masked_fill, not as an additive -inf: a score a huge prefix overflowed to inf (or NaN)
    # must become -inf, where inf + -inf would be NaN.
    decode_hidden: torch.Tensor | None
    chunk_batch: "ChunkBatch | None"  # the step's prompt chunks, attended in one padded call per layer
    write_slots: torch.Tensor  # (N,) long: where each token's K/V is written
    write_columns: torch.Tensor  # (N,) long
    store: SlotStore
    bank: PrefixBank
    calls: int = 0  # attention calls made under this plan (the start-up check counts them)


@dataclass
class ChunkBatch:
    """Index tensors that gather the step's prompt chunks into one padded attention call (C chunks, n queries):
    queries from the flat sequence, keys from the bank ([prefix]) and from each chunk's slot ([own columns])."""

    query_index: torch.Tensor  # (C, n) flat token of each query (padding: 0, masked out)
    query_valid: torch.Tensor  # (C, n) bool
    prefix_columns: torch.Tensor  # (C, P) bank column of each prefix key (padding: 0, masked)
    prefix_padding: torch.Tensor  # (C, 1, P, 1) bool: the padding prefix columns, whose keys are zeroed
    own_slots: torch.Tensor  # (C, 1) slot of each chunk
    own_columns: torch.Tensor  # (C, O) own column of each own key (padding: 0, masked)
    mask: torch.Tensor  # (C, 1, n, P + O) bool


_plans: ThreadPlan[StepPlan] = ThreadPlan()
active_plan = _plans.active  # the step's layout, for the one forward run inside the block on this thread
_current_plan = _plans.current


class SlotCache(Cache):
    """The transformers-facing view of the slot store for one forward: `update` writes in place and returns the
    store's layer buffers, which `slot_attention` reads through the active plan."""

    def __init__(self, plan: StepPlan) -> None:
        super().__init__(layers=[])
        self.plan = plan

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        store = self.plan.store
        keys, values = store.keys[layer_idx], store.values[layer_idx]  # (slots, H, width, D) views
        slots, columns = self.plan.write_slots, self.plan.write_columns
        keys[slots, :, columns] = key_states[0].transpose(0, 1).to(keys.dtype)  # (N, H, D) into (slot, col)
        values[slots, :, columns] = value_states[0].transpose(0, 1).to(values.dtype)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly; nothing may derive them from the cache

    @property
    def is_compileable(self) -> bool:
        return False


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    plan = _current_plan()
    if plan is None:  # not an engine step: behave exactly as sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("slot attention supports neither logit softcapping nor attention sinks")
    plan.calls += 1
    layer = module.layer_idx
    bank_keys, bank_values = plan.bank.keys[layer], plan.bank.values[layer]  # (H_kv, capacity, D)
    num_heads, num_tokens, head_dim = query.shape[1], query.shape[2], query.shape[3]
    num_kv_heads = key.shape[1]
    groups = num_heads // num_kv_heads
    scale = scaling if scaling is not None else head_dim**-0.5
    if plan.num_decode == num_tokens:  # a pure decode step: no output to assemble
        decoded = _decode_attention(plan, query[0], key, value, bank_keys, bank_values, groups, scale)
        return decoded.unsqueeze(0), None
    output = query.new_empty((num_tokens, num_heads, head_dim))
    if plan.num_decode:
        output[: plan.num_decode] = _decode_attention(
            plan, query[0, :, : plan.num_decode], key, value, bank_keys, bank_values, groups, scale
        )
    if plan.chunk_batch is not None:
        batch = plan.chunk_batch
        q = query[0][:, batch.query_index].transpose(0, 1)  # (C, Hq, n, D)
        own_k = key[batch.own_slots, :, batch.own_columns].permute(0, 2, 1, 3)  # (C, H_kv, O, D)
        own_v = value[batch.own_slots, :, batch.own_columns].permute(0, 2, 1, 3)
        prefix_k = bank_keys[:, batch.prefix_columns].transpose(0, 1)  # (C, H_kv, P, D)
        # Padding columns read bank column 0, another task's prefix. sdpa adds its mask as -inf, and a score that
        # prefix's huge keys overflowed to inf would become NaN for this chunk: zero those keys instead.
        prefix_k = prefix_k.masked_fill(batch.prefix_padding, 0.0)
        prefix_v = bank_values[:, batch.prefix_columns].transpose(0, 1)
        k = torch.cat([prefix_k, own_k], dim=2)
        v = torch.cat([prefix_v, own_v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, scale=scale, enable_gqa=groups > 1)
        output[batch.query_index[batch.query_valid]] = out.transpose(1, 2)[batch.query_valid]
    return output.unsqueeze(0), None


def _decode_attention(
    plan: StepPlan,
    query: torch.Tensor,  # (Hq, num_decode, D)
    key: torch.Tensor,  # (slots, H_kv, width, D)
    value: torch.Tensor,
    bank_keys: torch.Tensor,  # (H_kv, capacity, D)
    bank_values: torch.Tensor,
    groups: int,
    scale: float,
) -> torch.Tensor:
    """One query per decoding row against [its task's prefix columns of the bank ; its own columns], all rows in
    one batched matmul over a (rows, H_kv, P + own_width, D) copy of just those keys and values. Half-precision KV is
    widened to float32 in that copy: scores rounded to 8 bits of mantissa move softmax weights by several percent
    (sdpa's kernels accumulate in float32 too)."""
    rows, width = plan.num_decode, plan.own_width
    num_kv_heads, head_dim = key.shape[1], key.shape[3]
    out_dtype = query.dtype
    compute = torch.float32 if query.dtype in (torch.bfloat16, torch.float16) else query.dtype
    columns = plan.decode_prefix_columns
    prefix_width = 0 if columns is None else columns.shape[1]
    shape = (rows, num_kv_heads, prefix_width + width, head_dim)
    keys, values = key.new_empty(shape, dtype=compute), value.new_empty(shape, dtype=compute)
    if columns is not None:
        flat = columns.reshape(-1)
        gathered = (rows, prefix_width, num_kv_heads, head_dim)
        keys[:, :, :prefix_width] = bank_keys.index_select(1, flat).transpose(0, 1).reshape(gathered).transpose(1, 2)
        values[:, :, :prefix_width] = (
            bank_values.index_select(1, flat).transpose(0, 1).reshape(gathered).transpose(1, 2)
        )
    if plan.decode_dense:  # rows are slots [0, rows): a slice of the store
        keys[:, :, prefix_width:] = key[:rows, :, :width]
        values[:, :, prefix_width:] = value[:rows, :, :width]
    else:
        keys[:, :, prefix_width:] = key[plan.decode_slots, :, :width]
        values[:, :, prefix_width:] = value[plan.decode_slots, :, :width]
    # The scale is applied to the few queries rather than to every score.
    q = (query.transpose(0, 1).to(compute) * scale).reshape(rows, num_kv_heads, groups, head_dim)
    scores = torch.matmul(q, keys.transpose(-1, -2))  # (rows, H_kv, G, P + width)
    probs = torch.softmax(scores.masked_fill_(plan.decode_hidden, float("-inf")), dim=-1)
    out = torch.matmul(probs, values)  # (rows, H_kv, G, D)
    return out.reshape(rows, num_kv_heads * groups, head_dim).to(out_dtype)


def register() -> str:
    """Make the implementation known to transformers (idempotent); returns its name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, slot_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
