"""Slot attention (`service.attention`): without a step plan it is sdpa itself; with one, `SlotCache` writes each
token's K/V where the plan says and a decode token attends to exactly its slot's visible columns (its task's prefix,
copied there at admission, then its own tokens). (The whole slot layout against the padded one and PEFT: test_slots.py, test_parity.py.)"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from service import attention
from service.attention import SlotCache, StepPlan, active_plan, register, slot_attention
from service.kv_store import KVGeometry, SlotStore
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


def _plan(store: SlotStore, **fields: object) -> StepPlan:
    defaults: dict[str, object] = dict(
        num_decode=1, decode_slots=torch.tensor([0]), decode_dense=True, decode_width=0, decode_visible=None,
        chunk_batch=None, write_slots=torch.tensor([0]), write_columns=torch.tensor([0]), store=store,
    )  # fmt: skip
    return StepPlan(**{**defaults, **fields})  # type: ignore[arg-type]


def test_the_cache_writes_each_tokens_kv_into_its_slot_and_column() -> None:
    store = SlotStore(GEOMETRY, num_slots=4, max_width=16)
    store.allocate(8), store.allocate(8), store.allocate(8)
    plan = _plan(store, write_slots=torch.tensor([2, 0, 2]), write_columns=torch.tensor([0, 5, 1]))
    keys = torch.randn(1, KV_HEADS, 3, HEAD_DIM)  # (batch 1, H, N flat tokens, D), as the model hands them over
    values = torch.randn(1, KV_HEADS, 3, HEAD_DIM)
    returned_keys, returned_values = SlotCache(plan).update(keys, values, layer_idx=1)
    assert returned_keys.data_ptr() == store.keys[1].data_ptr(), "the store's own buffer, not a copy"
    for token, (slot, column) in enumerate([(2, 0), (0, 5), (2, 1)]):
        torch.testing.assert_close(store.keys[1, slot, :, column], keys[0, :, token])
        torch.testing.assert_close(store.values[1, slot, :, column], values[0, :, token])
    assert store.keys[0].abs().sum() == 0, "other layers are untouched"
    assert SlotCache(plan).get_seq_length() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_decode_token_attends_to_its_own_slots_visible_columns_only(dtype: torch.dtype) -> None:
    """Two decoding rows in slots 2 and 0 (not the store's first rows in order), one seeing 4 columns and one 2:
    each gets exactly sdpa over its slot's visible columns, whatever the hidden columns and the other slots hold."""
    generator = torch.Generator().manual_seed(0)
    geometry = KVGeometry(LAYERS, KV_HEADS, HEAD_DIM, dtype, torch.device("cpu"))
    store = SlotStore(geometry, num_slots=3, max_width=8)
    store.allocate(8), store.allocate(8), store.allocate(8)
    store.keys.copy_(torch.randn(store.keys.shape, generator=generator))
    store.values.copy_(torch.randn(store.values.shape, generator=generator))
    width, seen = 4, [4, 2]  # the second row's columns 2 and 3 are not written yet: hidden
    visible = (torch.arange(width) < torch.tensor(seen)[:, None])[:, None, None, :]
    plan = _plan(
        store, num_decode=2, decode_slots=torch.tensor([2, 0]), decode_dense=False, decode_width=width,
        decode_visible=visible,
    )  # fmt: skip
    query = torch.randn((1, QUERY_HEADS, 2, HEAD_DIM), generator=generator).to(dtype)
    layer = 1
    with active_plan(plan):
        out, _ = slot_attention(
            types.SimpleNamespace(layer_idx=layer), query, store.keys[layer], store.values[layer], None
        )
    for token, (slot, n) in enumerate(zip([2, 0], seen)):
        keys, values = store.keys[layer, slot, :, :n].float(), store.values[layer, slot, :, :n].float()
        expected = F.scaled_dot_product_attention(
            query[:, :, token : token + 1].float(), keys[None], values[None], enable_gqa=True
        )  # (1, Hq, 1, D), computed in float32
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: the output's own rounding
        torch.testing.assert_close(out[0, token].float(), expected[0, :, 0], rtol=tolerance, atol=tolerance)
    assert plan.calls == 1


def test_features_slot_attention_cannot_reproduce_are_refused_not_ignored() -> None:
    store = SlotStore(GEOMETRY, num_slots=1, max_width=8)
    query = torch.zeros((1, QUERY_HEADS, 1, HEAD_DIM))
    with active_plan(_plan(store)), pytest.raises(NotImplementedError, match="softcapping"):
        slot_attention(types.SimpleNamespace(layer_idx=0), query, query, query, None, softcap=30.0)
