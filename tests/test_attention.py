"""Slot attention (`service.attention`): without a step plan it is sdpa itself; with one, `SlotCache` writes each
token's K/V where the plan says and a decode token attends to exactly [its task's prefix in the bank ; its own
columns]. (The whole slot layout against the padded one and PEFT: test_slots.py, test_parity.py.)"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from service import attention
from service.attention import SlotCache, StepPlan, active_plan, register, slot_attention
from service.kv_store import KVGeometry, PrefixBank, SlotStore
from service.prefix import TaskPrefix
from tests.helpers import tiny_llama

LAYERS, KV_HEADS, QUERY_HEADS, HEAD_DIM = 2, 2, 4, 8
GEOMETRY = KVGeometry(LAYERS, KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu"))


def test_without_a_plan_the_model_computes_what_sdpa_computes(monkeypatch: pytest.MonkeyPatch) -> None:
    model, reference = tiny_llama(seed=0), tiny_llama(seed=0)
    model.config._attn_implementation = register()  # as the slot layout's start-up check switches a model
    calls = []
    sdpa = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    ids = torch.tensor([[5, 9, 12, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert len(calls) == model.config.num_hidden_layers, "every layer went through slot_attention"


def _plan(store: SlotStore, bank: PrefixBank, **fields: object) -> StepPlan:
    defaults: dict[str, object] = dict(
        num_decode=1, decode_slots=torch.tensor([0]), decode_dense=True, span=1, own_width=0, prefix_start=0,
        prefix_end=0, prefix_index=None, decode_hidden=None, chunk_batch=None, write_slots=torch.tensor([0]),
        write_columns=torch.tensor([0]), store=store, bank=bank,
    )  # fmt: skip
    return StepPlan(**{**defaults, **fields})  # type: ignore[arg-type]


def test_the_cache_writes_each_tokens_kv_into_its_slot_and_column() -> None:
    store, bank = SlotStore(GEOMETRY, num_slots=4, max_width=16), PrefixBank(GEOMETRY, initial_capacity=8)
    store.allocate(8), store.allocate(8), store.allocate(8)
    plan = _plan(store, bank, write_slots=torch.tensor([2, 0, 2]), write_columns=torch.tensor([0, 5, 1]))
    keys = torch.randn(1, KV_HEADS, 3, HEAD_DIM)  # (batch 1, H, N flat tokens, D), as the model hands them over
    values = torch.randn(1, KV_HEADS, 3, HEAD_DIM)
    returned_keys, returned_values = SlotCache(plan).update(keys, values, layer_idx=1)
    assert returned_keys.data_ptr() == store.keys[1].data_ptr(), "the store's own buffer, not a copy"
    for token, (slot, column) in enumerate([(2, 0), (0, 5), (2, 1)]):
        torch.testing.assert_close(store.keys[1, slot, :, column], keys[0, :, token])
        torch.testing.assert_close(store.values[1, slot, :, column], values[0, :, token])
    assert store.keys[0].abs().sum() == 0, "other layers are untouched"
    assert SlotCache(plan).get_seq_length() == 0


def test_a_decode_token_attends_to_its_prefix_and_its_own_visible_columns_only() -> None:
    generator = torch.Generator().manual_seed(0)
    store, bank = SlotStore(GEOMETRY, num_slots=2, max_width=8), PrefixBank(GEOMETRY, initial_capacity=8)
    store.allocate(8), store.allocate(8)
    store.keys.copy_(torch.randn(store.keys.shape, generator=generator))
    store.values.copy_(torch.randn(store.values.shape, generator=generator))
    other = TaskPrefix("other", torch.randn((LAYERS, 2, KV_HEADS, 2, HEAD_DIM), generator=generator), "o")
    mine = TaskPrefix("mine", torch.randn((LAYERS, 2, KV_HEADS, 3, HEAD_DIM), generator=generator), "m")
    bank.acquire(other)
    entry = bank.acquire(mine)
    own_width, visible = 4, 3  # the row's 4th own column is not written yet: hidden
    hidden = torch.zeros((2, 1, 1, 5 + own_width), dtype=torch.bool)
    hidden[:, :, :, :2] = True  # another task's prefix
    hidden[:, :, :, 5 + visible :] = True
    hidden[0] = True  # slot 0 is not decoding this step
    hidden[0, ..., 0] = False  # (an idle slot sees one column: no all-masked softmax row)
    plan = _plan(
        store, bank, decode_slots=torch.tensor([1]), decode_dense=False, span=2, own_width=own_width,
        prefix_start=0, prefix_end=5, decode_hidden=hidden,
    )  # fmt: skip
    query = torch.randn((1, QUERY_HEADS, 1, HEAD_DIM), generator=generator)
    layer = 1
    with active_plan(plan):
        out, _ = slot_attention(
            types.SimpleNamespace(layer_idx=layer), query, store.keys[layer], store.values[layer], None
        )
    columns = slice(entry.offset, entry.offset + entry.length)
    keys = torch.cat([bank.keys[layer][:, columns], store.keys[layer, 1, :, :visible]], dim=1)  # (H_kv, 3 + 3, D)
    values = torch.cat([bank.values[layer][:, columns], store.values[layer, 1, :, :visible]], dim=1)
    expected = F.scaled_dot_product_attention(query, keys[None], values[None], enable_gqa=True)  # (1, Hq, 1, D)
    torch.testing.assert_close(out[0, 0], expected[0, :, 0])
    assert plan.calls == 1


def test_features_slot_attention_cannot_reproduce_are_refused_not_ignored() -> None:
    store, bank = SlotStore(GEOMETRY, num_slots=1, max_width=8), PrefixBank(GEOMETRY, initial_capacity=8)
    query = torch.zeros((1, QUERY_HEADS, 1, HEAD_DIM))
    with active_plan(_plan(store, bank)), pytest.raises(NotImplementedError, match="softcapping"):
        slot_attention(types.SimpleNamespace(layer_idx=0), query, query, query, None, softcap=30.0)
