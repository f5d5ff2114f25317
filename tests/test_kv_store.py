"""The slot layout's KV memory (`service.kv_store`): the slot store grows and shrinks without moving anyone's KV, the
prefix bank holds each task's prefix once, keeps idle ones cached and evicts or grows only when it must."""

from __future__ import annotations

import pytest
import torch

from service.kv_store import KVGeometry, PrefixBank, SlotStore
from service.prefix import TaskPrefix

GEOMETRY = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))


def prefix(task_id: str, length: int, seed: int = 0) -> TaskPrefix:
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn((GEOMETRY.num_layers, 2, GEOMETRY.num_kv_heads, length, GEOMETRY.head_dim), generator=generator)
    return TaskPrefix(task_id, kv, f"sha-{task_id}-{seed}")


def stored(bank: PrefixBank, task: TaskPrefix) -> torch.Tensor:
    """The task's K/V as the bank holds it now, in the prefix's (L, 2, H, V, D) layout."""
    entry = bank.entries[(task.task_id, task.sha256)]
    columns = slice(entry.offset, entry.offset + entry.length)
    return torch.stack([bank.keys[:, :, columns], bank.values[:, :, columns]], dim=1)


def test_bytes_per_token_counts_keys_and_values_of_every_layer() -> None:
    assert GEOMETRY.bytes_per_token == 2 * 2 * 2 * 4 * 4
    assert KVGeometry(2, 2, 4, torch.bfloat16, torch.device("cpu")).bytes_per_token == 2 * 2 * 2 * 4 * 2


# -- the prefix bank -------------------------------------------------------------------------------------------------


def test_a_prefix_is_written_once_and_shared_by_reference() -> None:
    bank = PrefixBank(GEOMETRY, initial_capacity=16)
    task = prefix("a", 5)
    first = bank.acquire(task)
    second = bank.acquire(task)
    assert first is second and first.refs == 2
    assert len(bank.entries) == 1 and bank.referenced_tokens == 5
    torch.testing.assert_close(stored(bank, task), task.kv)
    assert bank.columns_needed(task) == 0, "a running task's prefix costs a new row no bank columns"


def test_a_released_prefix_stays_cached_until_its_room_is_needed() -> None:
    bank = PrefixBank(GEOMETRY, initial_capacity=8)
    a, b, c = prefix("a", 4, seed=1), prefix("b", 4, seed=2), prefix("c", 4, seed=3)
    entry_a = bank.acquire(a)
    bank.acquire(b)
    bank.release(entry_a)
    assert entry_a.refs == 0 and bank.referenced_tokens == 4
    assert bank.columns_needed(a) == 4, "an idle cached copy is not referenced: admitting its task counts it again"
    assert bank.acquire(a) is entry_a, "an idle cached prefix is reused, not written again"
    bank.release(entry_a)
    bank.acquire(c)  # the bank is full: the idle prefix makes room, the referenced one stays
    assert set(bank.entries) == {("b", b.sha256), ("c", c.sha256)} and bank.capacity == 8
    torch.testing.assert_close(stored(bank, b), b.kv)
    torch.testing.assert_close(stored(bank, c), c.kv)


def test_the_least_recently_used_idle_prefix_is_evicted_first() -> None:
    bank = PrefixBank(GEOMETRY, initial_capacity=8)
    older, newer = bank.acquire(prefix("older", 4)), bank.acquire(prefix("newer", 4))
    bank.release(older)
    bank.release(newer)
    bank.acquire(prefix("third", 4))
    assert ("older", prefix("older", 4).sha256) not in bank.entries
    assert ("newer", prefix("newer", 4).sha256) in bank.entries


def test_idle_prefixes_beyond_the_idle_budget_are_forgotten_referenced_ones_never() -> None:
    per_prefix = 4 * GEOMETRY.bytes_per_token
    bank = PrefixBank(GEOMETRY, initial_capacity=64, idle_budget_bytes=per_prefix)
    tasks = [prefix(f"t{i}", 4, seed=i) for i in range(4)]
    entries = [bank.acquire(task) for task in tasks]
    assert bank.held_bytes == 4 * per_prefix, "referenced prefixes stay whatever the budget"
    for entry in entries[:3]:
        bank.release(entry)
    # Three idle, room for one: the two least recently used go, though the bank has room for all.
    assert [bank.holds(t.task_id, t.sha256) for t in tasks] == [False, False, True, True]
    assert bank.held_bytes == 2 * per_prefix and bank.capacity == 64
    torch.testing.assert_close(stored(bank, tasks[2]), tasks[2].kv)
    assert not bank.holds("t2", "another version")
    bank.set_idle_budget(0)  # 0: idle prefixes are kept until their room is needed
    bank.release(entries[3])
    assert bank.held_bytes == 2 * per_prefix


def test_a_bank_of_referenced_prefixes_grows_and_keeps_their_values() -> None:
    bank = PrefixBank(GEOMETRY, initial_capacity=8)
    tasks = [prefix(f"t{i}", 5, seed=i) for i in range(3)]
    for task in tasks:
        bank.acquire(task)  # all referenced: nothing may be evicted
    assert bank.capacity >= 15 and len(bank.entries) == 3
    for task in tasks:
        torch.testing.assert_close(stored(bank, task), task.kv)


def test_a_replaced_task_is_a_new_entry_beside_the_one_running_rows_hold() -> None:
    bank = PrefixBank(GEOMETRY, initial_capacity=16)
    old, new = prefix("task", 3, seed=1), prefix("task", 3, seed=2)
    old_entry, new_entry = bank.acquire(old), bank.acquire(new)
    assert old_entry is not new_entry and len(bank.entries) == 2
    torch.testing.assert_close(stored(bank, old), old.kv)
    torch.testing.assert_close(stored(bank, new), new.kv)


# -- the slot store --------------------------------------------------------------------------------------------------


def test_slots_are_taken_lowest_first_and_the_store_grows_to_fit() -> None:
    store = SlotStore(GEOMETRY, num_slots=8, max_width=100)
    assert (store.rows, store.width) == (0, 0)
    assert store.allocate(10) == 0 and store.allocate(3) == 1
    assert store.rows == 2 and store.width == 16, "rows double, width rounds up to 8 columns"
    store.free(0, written=0)
    assert store.allocate(4) == 0, "a freed low slot is taken before a new one"
    assert store.keys.shape == (GEOMETRY.num_layers, store.rows, GEOMETRY.num_kv_heads, store.width, GEOMETRY.head_dim)


def test_the_store_refuses_what_it_can_never_hold() -> None:
    store = SlotStore(GEOMETRY, num_slots=1, max_width=32)
    with pytest.raises(ValueError, match="exceeds the store's maximum 32"):
        store.allocate(33)
    store.allocate(32)
    with pytest.raises(RuntimeError, match="no free KV slot"):
        store.allocate(1)


def test_growing_and_shrinking_keeps_the_kv_of_slots_in_use() -> None:
    store = SlotStore(GEOMETRY, num_slots=16, max_width=1024)
    small, large = store.allocate(8), store.allocate(500)
    store.keys[:, small, :, :8] = 1.5
    store.values[:, small, :, :8] = -2.5
    for _ in range(6):
        store.allocate(8)  # more rows: the store reallocates and copies
    store.free(large, written=0)
    for slot in range(2, 8):
        store.free(slot, written=0)
    width_before = store.width
    store.shrink_if_oversized()
    assert store.width < width_before, "the long request left: its columns are given back"
    assert (store.keys[:, small, :, :8] == 1.5).all() and (store.values[:, small, :, :8] == -2.5).all()
