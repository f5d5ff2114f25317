"""Ragged attention over the engine's KV store, plugged in through transformers' own extension points.

One forward pass carries every running row's next token *and* new rows' prompt chunks as one flat sequence
(batch 1, N tokens). The model's own projections, rotary embeddings and MLPs run it (through transformers' forward,
or for llama models through `service.llama_forward`, which calls the same modules); only two things are ours:

- `SlotCache`, a `Cache` whose `update` writes each token's K/V into its row's slot at its column, in place;
- `slot_attention`, registered in `AttentionInterface` (with sdpa's mask function), which computes each token's
  attention over its row's slot up to itself: [its task's prefix (copied into the slot's first columns when the row
  was admitted) ; its own tokens]. A token's column in its slot is its position, so a row reads one range of one
  slot and no step gathers or concatenates keys for decoding.

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

from service.kv_store import SlotStore
from service.thread_plan import ThreadPlan

ATTN_IMPLEMENTATION = "prefix_serve_slots"


@dataclass(frozen=True)
class PrefillChunk:
    """`length` prompt tokens of the row in `slot`, at flat positions [start, start + length) of the step's sequence and
    slot columns [first_column, first_column + length); columns [0, first_column) (its prefix, then its earlier
    prompt tokens) are already in the slot."""

    slot: int
    start: int
    length: int
    first_column: int


@dataclass
class StepPlan:
    """Where every token of one flat forward pass lives and what it attends to. Built once per step, read per layer.

    Flat tokens [0, num_decode) are decode tokens (one per decoding row); prefill chunks follow.
    """

    num_decode: int
    decode_slots: torch.Tensor  # (num_decode,) long: the slot of each decode token
    decode_dense: bool  # decode_slots == arange(num_decode): the rows' KV is one slice of the store
    decode_width: int  # decode rows read columns [0, decode_width) of their slots
    # (num_decode, 1, 1, decode_width) bool: True where a row may look (its prefix and own tokens up to itself).
    # sdpa adds a hidden column's score as -inf, so a hidden column must hold finite keys: it is either another
    # row's stale column, zeroed when that row left (`SlotStore.free`), or never written (zero).
    decode_visible: torch.Tensor | None
    chunk_batch: "ChunkBatch | None"  # the step's prompt chunks, attended in one padded call per layer
    write_slots: torch.Tensor  # (N,) long: where each token's K/V is written
    write_columns: torch.Tensor  # (N,) long
    store: SlotStore
    calls: int = 0  # attention calls made under this plan (the start-up check counts them)


@dataclass
class ChunkBatch:
    """Index tensors that gather the step's prompt chunks into one padded attention call (C chunks, n queries):
    queries from the flat sequence, keys from columns [0, O) of each chunk's slot (prefix and prompt so far)."""

    query_index: torch.Tensor  # (C, n) flat token of each query (padding: 0, masked out)
    query_valid: torch.Tensor  # (C, n) bool
    slots: torch.Tensor  # (C,) slot of each chunk
    width: int  # O: the columns every chunk's keys are read from (beyond a chunk's own: masked)
    mask: torch.Tensor  # (C, 1, n, O) bool


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
    num_heads, num_tokens, head_dim = query.shape[1], query.shape[2], query.shape[3]
    groups = num_heads // key.shape[1]
    scale = scaling if scaling is not None else head_dim**-0.5
    if plan.num_decode == num_tokens:  # a pure decode step: no output to assemble
        return _decode_attention(plan, query[0], key, value, groups, scale).unsqueeze(0), None
    output = query.new_empty((num_tokens, num_heads, head_dim))
    if plan.num_decode:
        output[: plan.num_decode] = _decode_attention(plan, query[0, :, : plan.num_decode], key, value, groups, scale)
    if plan.chunk_batch is not None:
        batch = plan.chunk_batch
        q = query[0][:, batch.query_index].transpose(0, 1)  # (C, Hq, n, D)
        k = key[:, :, : batch.width].index_select(0, batch.slots)  # (C, H_kv, O, D)
        v = value[:, :, : batch.width].index_select(0, batch.slots)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, scale=scale, enable_gqa=groups > 1)
        output[batch.query_index[batch.query_valid]] = out.transpose(1, 2)[batch.query_valid]
    return output.unsqueeze(0), None


def _decode_attention(
    plan: StepPlan,
    query: torch.Tensor,  # (Hq, num_decode, D)
    key: torch.Tensor,  # (slots, H_kv, width, D)
    value: torch.Tensor,
    groups: int,
    scale: float,
) -> torch.Tensor:
    """One query per decoding row against columns [0, decode_width) of its slot, hidden columns masked: one sdpa call
    reading the store in place (a slice when the rows are slots 0.., else one gather of their slots). A kv head's
    `groups` query heads go in as that head's queries, so no `enable_gqa` is needed (not every sdpa backend takes it;
    on the CPU both cost the same). sdpa's CPU kernel accumulates half-precision scores in float32, as the float32
    copy of the keys this replaced did, in ~40% of its time at a 32-row SmolLM2 step
    (experiments/decode_attention.py)."""
    rows, width = plan.num_decode, plan.decode_width
    num_kv_heads, head_dim = key.shape[1], key.shape[3]
    if plan.decode_dense:
        keys, values = key[:rows, :, :width], value[:rows, :, :width]
    else:
        keys = key[:, :, :width].index_select(0, plan.decode_slots)
        values = value[:, :, :width].index_select(0, plan.decode_slots)
    q = query.transpose(0, 1).reshape(rows, num_kv_heads, groups, head_dim)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=plan.decode_visible, scale=scale)
    return out.reshape(rows, num_kv_heads * groups, head_dim)


def register() -> str:
    """Make the implementation known to transformers (idempotent); returns its name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, slot_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
