"""Where each stored prefix's KV lives: the device (an LRU within a byte budget), host memory (an LRU within its own
budget) or only on disk. A prefix evicted from the device comes back on its next use, transparently.

Two modes:
- with its own device tier (`device_tier=True`, the padded layout): `get` hands out device tensors, kept in a device
  LRU; evicted ones move to the host LRU, then to disk only.
- without (`device_tier=False`, the slot layout): the engine's `PrefixBank` is the device tier. The cache keeps
  prefixes in host memory only and hands those out; the bank copies a prefix into its columns once, when a row of the
  task is admitted. The registry learns what the bank holds through `DeviceTier` (`attach_device_tier`), so each
  prefix is held once on the device and counted once.

Not thread-safe on its own: the registry calls it under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import torch

from service.metrics import Metrics
from service.prefix import TaskPrefix

Tier = Literal["device", "host", "disk"]


class DeviceTier(Protocol):
    """The device tier when it lives elsewhere (the engine's prefix bank). Read from other threads than the one that
    changes it, so both answers must be safe to read at any time."""

    def holds(self, task_id: str, sha256: str) -> bool:
        """Whether this version of the task's prefix is on the device now."""
        ...

    @property
    def held_bytes(self) -> int:
        """Bytes of prefixes held (each once), not the capacity reserved for them."""
        ...


@dataclass
class CacheStats:
    hits: int = 0
    misses_from_host: int = 0
    misses_from_disk: int = 0
    evictions_to_host: int = 0
    evictions_to_disk: int = 0


class _Lru:
    """An LRU of prefixes with a running byte count (budgets are checked on every get: no sum over thousands)."""

    def __init__(self) -> None:
        self.items: OrderedDict[str, TaskPrefix] = OrderedDict()  # least recently used first
        self.nbytes = 0

    def __contains__(self, task_id: str) -> bool:
        return task_id in self.items

    def __len__(self) -> int:
        return len(self.items)

    def get(self, task_id: str) -> TaskPrefix | None:
        prefix = self.items.get(task_id)
        if prefix is not None:
            self.items.move_to_end(task_id)
        return prefix

    def put(self, prefix: TaskPrefix) -> None:
        self.pop(prefix.task_id)
        self.items[prefix.task_id] = prefix
        self.nbytes += prefix.nbytes

    def pop(self, task_id: str) -> TaskPrefix | None:
        prefix = self.items.pop(task_id, None)
        if prefix is not None:
            self.nbytes -= prefix.nbytes
        return prefix

    def oldest(self, keep: str) -> str | None:
        return next((task_id for task_id in self.items if task_id != keep), None)


class TieredPrefixCache:
    def __init__(
        self, device: torch.device, *, device_budget_bytes: int = 0, host_budget_bytes: int = 0,
        metrics: Metrics | None = None, device_tier: bool = True,
    ) -> None:
        self.device = device
        # On a GPU the host tier is pinned memory and the way back an asynchronous copy (no stall of the engine
        # thread); pinning means nothing to a CPU device (and CPU-only torch builds cannot pin).
        self.pinned_host = device.type == "cuda"
        self.has_device_tier = device_tier
        self.device_budget = device_budget_bytes  # 0 = unlimited
        self.host_budget = host_budget_bytes
        self.metrics = metrics
        self.stats = CacheStats()
        self._on_device = _Lru()
        self._on_host = _Lru()
        self._external: DeviceTier | None = None  # the bank, when the device tier lives there

    def attach_device_tier(self, tier: DeviceTier) -> None:
        if self.has_device_tier:
            raise RuntimeError("this cache keeps its own device tier; build it with device_tier=False to attach one")
        self._external = tier

    def tier(self, task_id: str, sha256: str | None = None) -> Tier:
        if task_id in self._on_device:
            return "device"
        if self._external is not None and sha256 is not None and self._external.holds(task_id, sha256):
            return "device"
        return "host" if task_id in self._on_host else "disk"

    def bytes_by_tier(self) -> dict[str, int]:
        device = self._external.held_bytes if self._external is not None else self._on_device.nbytes
        return {"device": device, "host": self._on_host.nbytes}

    def cached(self, task_id: str) -> bool:
        """Whether the prefix is in memory here (a `get` would not read the disk)."""
        return task_id in self._on_device or task_id in self._on_host

    def put(self, prefix: TaskPrefix) -> None:
        """A new or replaced prefix becomes the most recently used (on the device, or on the host without a device
        tier)."""
        self.drop(prefix.task_id)
        self._top().put(self._placed(prefix))
        self._enforce_budgets(keep=prefix.task_id)

    def drop(self, task_id: str) -> None:
        self._on_device.pop(task_id)
        self._on_host.pop(task_id)

    def get(self, task_id: str, load_from_disk: Callable[[], TaskPrefix]) -> TaskPrefix:
        prefix = self._top().get(task_id)
        if prefix is not None:
            self.stats.hits += 1
            if self.metrics:
                self.metrics.prefix_cache_hits.inc()
            return prefix
        on_host = self._on_host.pop(task_id) if self.has_device_tier else None
        if on_host is not None:
            self.stats.misses_from_host += 1
            source = "host"
            prefix = on_host.to(self.device, non_blocking=self.pinned_host)
        else:
            self.stats.misses_from_disk += 1
            source = "disk"
            prefix = self._placed(load_from_disk())
        if self.metrics:
            self.metrics.prefix_cache_misses.labels(source).inc()
        self._top().put(prefix)
        self._enforce_budgets(keep=task_id)
        return prefix

    def _top(self) -> _Lru:
        """The tier `get` serves from."""
        return self._on_device if self.has_device_tier else self._on_host

    def _placed(self, prefix: TaskPrefix) -> TaskPrefix:
        """Without a device tier a prefix lives in host memory (pinned on a GPU: the bank's copy in is then a DMA)."""
        if self.has_device_tier or (prefix.kv.device.type == "cpu" and not self.pinned_host):
            return prefix
        return prefix.to_host(pinned=self.pinned_host)

    def _enforce_budgets(self, keep: str) -> None:
        """Evict least recently used prefixes down a tier until both budgets hold; `keep` (in use now) stays."""
        if self.device_budget and self.has_device_tier:
            while self._on_device.nbytes > self.device_budget and len(self._on_device) > 1:
                task_id = self._on_device.oldest(keep)
                if task_id is None:
                    break
                prefix = self._on_device.pop(task_id)
                assert prefix is not None
                # Running batches hold their own reference, so moving the registry's copy never disturbs them.
                self._on_host.put(prefix.to_host(pinned=self.pinned_host))
                self.stats.evictions_to_host += 1
                if self.metrics:
                    self.metrics.prefix_cache_evictions.labels("host").inc()
        if self.host_budget:
            while self._on_host.nbytes > self.host_budget and self._on_host:
                task_id = self._on_host.oldest(keep)
                if task_id is None:
                    break
                self._on_host.pop(task_id)
                self.stats.evictions_to_disk += 1
                if self.metrics:
                    self.metrics.prefix_cache_evictions.labels("disk").inc()
