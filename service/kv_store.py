"""The engine's KV memory: per-layer slot buffers written in place, and a bank holding each task's prefix once.

Two pools, both allocated by the engine and never handed to transformers' own cache classes:

- `SlotStore`: keys/values of shape (layers, slots, kv_heads, width, head_dim). A running request owns one slot
  (a batch row) for its whole life: its task's prefix is copied into columns [0, V) when it is admitted, and its own
  tokens (prompt, then generated) are written at columns V, V + 1, ... (a token's column is its position). A new
  request takes the lowest free slot without moving anyone else's KV; a finished one frees its slot by zeroing the
  columns it wrote. `width` grows (and shrinks when idle) with the longest reservation, so memory held is
  slots x width, which is what the budget counts.
- `PrefixBank`: keys/values of shape (layers, kv_heads, capacity, head_dim). A task's prefix occupies one range of
  columns, written once when its first row is admitted and copied from there into each of its rows' slots
  (refcounted while they run).
  Unreferenced prefixes stay cached until their columns are needed, or until they exceed the idle budget (the
  prefix device budget, `idle_budget_bytes`). In the slot layout the bank is the registry's device tier
  (`service.prefix_cache.DeviceTier`): a hot prefix is on the device once, here.

Attention reads a row's slot alone (see `service.attention`); nothing is gathered or concatenated per decode step.
A row's prefix copy costs V columns of its slot (a 20-token prefix next to a row's prompt and generated tokens),
and saves every step a per-row gather of prefix columns from the bank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from service.prefix import TaskPrefix

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        """Keys + values of one token over all layers."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


class SlotStore:
    def __init__(self, geometry: KVGeometry, num_slots: int, max_width: int) -> None:
        self.geometry = geometry
        self.num_slots = num_slots
        self.max_width = max_width  # the model's context: no row ever needs more columns
        self.rows = 0  # slots allocated (a prefix of [0, num_slots)): grows by doubling as slots are taken
        self.width = 0
        self.keys = self._empty(0, 0)
        self.values = self._empty(0, 0)
        self._free = list(range(num_slots))  # kept sorted: the lowest free slot is taken first (dense low slots)
        self.reserved = [0] * num_slots  # columns each slot's request may reach (prompt + max_new_tokens)

    def _empty(self, rows: int, width: int) -> torch.Tensor:
        g = self.geometry
        return torch.zeros((g.num_layers, rows, g.num_kv_heads, width, g.head_dim), dtype=g.dtype, device=g.device)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def shape_after(self, reservation: int) -> tuple[int, int]:
        """(rows, width) the store will have once a request reserving `reservation` columns takes a slot."""
        slot = self._free[0]
        rows = self.rows if slot < self.rows else min(self.num_slots, max(slot + 1, 2 * self.rows))
        # Grow by a quarter at least (rounded to 8 columns), not by doubling: memory held is rows x width, and the
        # longest reservation is rarely far past the last one.
        grown = -(-max(reservation, self.width + self.width // 4) // 8) * 8
        width = self.width if reservation <= self.width else min(self.max_width, grown)
        return rows, width

    def allocate(self, reservation: int) -> int:
        if not self._free:
            raise RuntimeError("no free KV slot")
        if reservation > self.max_width:
            raise ValueError(f"a reservation of {reservation} columns exceeds the store's maximum {self.max_width}")
        rows, width = self.shape_after(reservation)
        slot = self._free.pop(0)
        self.reserved[slot] = reservation
        if (rows, width) != (self.rows, self.width):
            self._resize(rows, width)
        return slot

    def write_prefix(self, slot: int, bank: PrefixBank, entry: BankEntry) -> None:
        """Copy a task's prefix from the bank into columns [0, entry.length) of `slot`, every layer."""
        source = slice(entry.offset, entry.offset + entry.length)
        self.keys[:, slot, :, : entry.length] = bank.keys[:, :, source]
        self.values[:, slot, :, : entry.length] = bank.values[:, :, source]

    def free(self, slot: int, written: int) -> None:
        """Give `slot` back, zeroing the `written` columns its request filled. A free slot is therefore all zeros, so
        a later row never sees another request's values under its attention mask: a huge stale key would score inf,
        and sdpa turns inf under a -inf mask into NaN."""
        self.keys[:, slot, :, :written] = 0
        self.values[:, slot, :, :written] = 0
        self.reserved[slot] = 0
        self._free.append(slot)
        self._free.sort()

    def shrink_if_oversized(self) -> None:
        """Give memory back after long requests leave: reallocate when 4x more columns or rows are held than the
        running requests need. Rows are only cut above the highest slot in use, so nobody's KV moves."""
        needed_width = max(self.reserved, default=0)
        used = [s for s in range(self.num_slots) if self.reserved[s]]
        needed_rows = used[-1] + 1 if used else 0
        width, rows = self.width, self.rows
        if width > 64 and needed_width * 4 <= width:
            width = max(needed_width * 2, 64)
        if rows > 4 and needed_rows * 4 <= rows:
            rows = max(needed_rows * 2, 4)
        if (rows, width) != (self.rows, self.width):
            self._resize(rows, width)

    def _resize(self, rows: int, width: int) -> None:
        keep_rows, keep_width = min(self.rows, rows), min(self.width, width)
        keys, values = self._empty(rows, width), self._empty(rows, width)
        if keep_rows and keep_width:
            keys[:, :keep_rows, :, :keep_width] = self.keys[:, :keep_rows, :, :keep_width]
            values[:, :keep_rows, :, :keep_width] = self.values[:, :keep_rows, :, :keep_width]
        self.keys, self.values, self.rows, self.width = keys, values, rows, width
        logger.debug("KV slot store resized to %d slots x %d columns (%.1f MB)", rows, width, self.nbytes / 1e6)


@dataclass
class BankEntry:
    key: tuple[str, str]  # (task id, sha256): a replaced task is a new entry; running rows keep the old one
    offset: int
    length: int
    refs: int = 0
    last_used: int = 0


class PrefixBank:
    """Each task's prefix K/V stored once, in a column range every row of the task attends to.

    Changed only by the engine's thread; `holds` and `held_bytes` may be read from any thread (the registry's)."""

    def __init__(self, geometry: KVGeometry, initial_capacity: int = 256, idle_budget_bytes: int = 0) -> None:
        self.geometry = geometry
        self.capacity = 0
        self.keys = self._empty(0)
        self.values = self._empty(0)
        self.entries: dict[tuple[str, str], BankEntry] = {}
        self.idle_budget_bytes = idle_budget_bytes  # bytes of unreferenced prefixes kept (0 = until room is needed)
        self._held_tokens = 0  # columns of all entries, referenced or idle
        self._clock = 0
        self._grow_to(initial_capacity)

    def holds(self, task_id: str, sha256: str) -> bool:
        """Whether this version of the task's prefix is in the bank now (referenced or idle)."""
        return (task_id, sha256) in self.entries

    @property
    def held_bytes(self) -> int:
        """Bytes of the prefixes held (each once); `nbytes` is the capacity reserved for them."""
        return self._held_tokens * self.geometry.bytes_per_token

    def set_idle_budget(self, nbytes: int) -> None:
        self.idle_budget_bytes = nbytes
        self._trim_idle()

    def _empty(self, capacity: int) -> torch.Tensor:
        g = self.geometry
        return torch.zeros((g.num_layers, g.num_kv_heads, capacity, g.head_dim), dtype=g.dtype, device=g.device)

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    @property
    def referenced_tokens(self) -> int:
        return sum(e.length for e in self.entries.values() if e.refs)

    def columns_needed(self, prefix: TaskPrefix) -> int:
        """Referenced bank columns admitting a row of this task would add: 0 when running rows already hold its
        prefix (an idle cached copy is not counted in `referenced_tokens`, so it counts here)."""
        entry = self.entries.get((prefix.task_id, prefix.sha256))
        return 0 if entry is not None and entry.refs else prefix.num_virtual_tokens

    def acquire(self, prefix: TaskPrefix) -> BankEntry:
        key = (prefix.task_id, prefix.sha256)
        self._clock += 1
        entry = self.entries.get(key)
        if entry is None:
            length = prefix.num_virtual_tokens
            offset = self._find_room(length)
            kv = prefix.kv.to(device=self.geometry.device, dtype=self.geometry.dtype)  # (L, 2, H, V, D)
            self.keys[:, :, offset : offset + length] = kv[:, 0]
            self.values[:, :, offset : offset + length] = kv[:, 1]
            entry = BankEntry(key, offset, length)
            self.entries[key] = entry
            self._held_tokens += length
        entry.refs += 1
        entry.last_used = self._clock
        return entry

    def release(self, entry: BankEntry) -> None:
        entry.refs -= 1
        if not entry.refs:
            self._trim_idle()

    def _forget(self, entry: BankEntry) -> None:
        del self.entries[entry.key]
        self._held_tokens -= entry.length

    def _trim_idle(self) -> None:
        """Forget least recently used unreferenced prefixes while they hold more than the idle budget."""
        if not self.idle_budget_bytes:
            return
        idle = sorted((e for e in self.entries.values() if not e.refs), key=lambda e: e.last_used)
        idle_bytes = sum(e.length for e in idle) * self.geometry.bytes_per_token
        for entry in idle:
            if idle_bytes <= self.idle_budget_bytes:
                break
            self._forget(entry)
            idle_bytes -= entry.length * self.geometry.bytes_per_token

    def _find_room(self, length: int) -> int:
        offset = self._first_fit(length)
        while offset is None:
            idle = [e for e in self.entries.values() if not e.refs]
            if idle:  # forget the least recently used unreferenced prefix and look again
                self._forget(min(idle, key=lambda e: e.last_used))
            else:
                self._compact_and_grow(length)
            offset = self._first_fit(length)
        return offset

    def _first_fit(self, length: int) -> int | None:
        cursor = 0
        for entry in sorted(self.entries.values(), key=lambda e: e.offset):
            if entry.offset - cursor >= length:
                return cursor
            cursor = max(cursor, entry.offset + entry.length)
        return cursor if self.capacity - cursor >= length else None

    def _compact_and_grow(self, extra: int) -> None:
        used = sum(e.length for e in self.entries.values())
        self._grow_to(max(2 * self.capacity, used + extra))

    def _grow_to(self, capacity: int) -> None:
        """Reallocate, packing live entries at the front (offsets change; callers read them per step)."""
        keys, values = self._empty(capacity), self._empty(capacity)
        cursor = 0
        for entry in sorted(self.entries.values(), key=lambda e: e.offset):
            keys[:, :, cursor : cursor + entry.length] = self.keys[:, :, entry.offset : entry.offset + entry.length]
            values[:, :, cursor : cursor + entry.length] = self.values[:, :, entry.offset : entry.offset + entry.length]
            entry.offset = cursor
            cursor += entry.length
        self.keys, self.values, self.capacity = keys, values, capacity
