"""Where each stored prefix's KV lives: the device (an LRU within a byte budget), host memory (an LRU within its own
budget) or only on disk. A prefix evicted from the device comes back on its next use, transparently.

Not thread-safe on its own: the registry calls it under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from service.metrics import Metrics
from service.prefix import TaskPrefix

Tier = Literal["device", "host", "disk"]


@dataclass
class CacheStats:
    hits: int = 0
    misses_from_host: int = 0
    misses_from_disk: int = 0
    evictions_to_host: int = 0
    evictions_to_disk: int = 0


class TieredPrefixCache:
    def __init__(
        self, device: torch.device, *, device_budget_bytes: int = 0, host_budget_bytes: int = 0,
        metrics: Metrics | None = None,
    ) -> None:
        self.device = device
        # On a GPU the host tier is pinned memory and the way back an asynchronous copy (no stall of the engine
        # thread); pinning means nothing to a CPU device (and CPU-only torch builds cannot pin).
        self.pinned_host = device.type == "cuda"
        self.device_budget = device_budget_bytes  # 0 = unlimited
        self.host_budget = host_budget_bytes
        self.metrics = metrics
        self.stats = CacheStats()
        self._on_device: OrderedDict[str, TaskPrefix] = OrderedDict()  # least recently used first
        self._on_host: OrderedDict[str, TaskPrefix] = OrderedDict()

    def tier(self, task_id: str) -> Tier:
        if task_id in self._on_device:
            return "device"
        return "host" if task_id in self._on_host else "disk"

    def bytes_by_tier(self) -> dict[str, int]:
        return {
            "device": sum(p.nbytes for p in self._on_device.values()),
            "host": sum(p.nbytes for p in self._on_host.values()),
        }

    def put(self, prefix: TaskPrefix) -> None:
        """A new or replaced prefix (already on the device) becomes the most recently used."""
        self.drop(prefix.task_id)
        self._on_device[prefix.task_id] = prefix
        self._enforce_budgets(keep=prefix.task_id)

    def drop(self, task_id: str) -> None:
        self._on_device.pop(task_id, None)
        self._on_host.pop(task_id, None)

    def get(self, task_id: str, load_from_disk: Callable[[], TaskPrefix]) -> TaskPrefix:
        prefix = self._on_device.get(task_id)
        if prefix is not None:
            self._on_device.move_to_end(task_id)
            self.stats.hits += 1
            if self.metrics:
                self.metrics.prefix_cache_hits.inc()
            return prefix
        on_host = self._on_host.pop(task_id, None)
        if on_host is not None:
            self.stats.misses_from_host += 1
            source = "host"
            prefix = on_host.to(self.device, non_blocking=self.pinned_host)
        else:
            self.stats.misses_from_disk += 1
            source = "disk"
            prefix = load_from_disk()
        if self.metrics:
            self.metrics.prefix_cache_misses.labels(source).inc()
        self._on_device[task_id] = prefix
        self._enforce_budgets(keep=task_id)
        return prefix

    def _enforce_budgets(self, keep: str) -> None:
        """Evict least recently used prefixes down a tier until both budgets hold; `keep` (in use now) stays."""
        if self.device_budget:
            while self._bytes(self._on_device) > self.device_budget and len(self._on_device) > 1:
                task_id, prefix = next((t, p) for t, p in self._on_device.items() if t != keep)
                del self._on_device[task_id]
                # Running batches hold their own reference, so moving the registry's copy never disturbs them.
                self._on_host[task_id] = prefix.to_host(pinned=self.pinned_host)
                self.stats.evictions_to_host += 1
                if self.metrics:
                    self.metrics.prefix_cache_evictions.labels("host").inc()
        if self.host_budget:
            while self._bytes(self._on_host) > self.host_budget and self._on_host:
                self._on_host.popitem(last=False)
                self.stats.evictions_to_disk += 1
                if self.metrics:
                    self.metrics.prefix_cache_evictions.labels("disk").inc()
        if self.metrics:
            for tier, nbytes in self.bytes_by_tier().items():
                self.metrics.prefix_bytes.labels(tier).set(nbytes)

    @staticmethod
    def _bytes(prefixes: OrderedDict[str, TaskPrefix]) -> int:
        return sum(p.nbytes for p in prefixes.values())
