"""A model replica's core, free of Ray: today's engine on this replica's device, and the shared prefix store read one
task version at a time. The Ray deployment (`service.scaleout.app.ModelReplica`) wraps it with Serve's multiplexed
LRU and the stats reports.

Every answer is plain data (see `protocol`): a `StreamStart` with the status first, then the engine's events, or a
`StreamError` when generation fails after it began. Closing the stream (the client went away) closes the engine's
event iterator, which retires the row at the next step.
"""

from __future__ import annotations

import logging
import platform
import time
import weakref
from typing import Any, AsyncIterator, Awaitable, Callable

import torch

from service.api.app import make_registry
from service.engine import ContinuousBatchingEngine, EngineLimits, Event
from service.errors import ServiceError
from service.model_loader import LoadedModel, load_base_model
from service.prefix import TaskPrefix
from service.prefix_cache import DeviceTier
from service.registry import validate_task_id
from service.requests import GenerationRequest
from service.runner import ModelRunner
from service.startup import check_model
from service.scaleout.protocol import RemoteRequest, StreamError, StreamStart, error_body, parse_multiplexed_id
from service.settings import Settings

logger = logging.getLogger(__name__)

PrefixLoader = Callable[[str], Awaitable[TaskPrefix]]  # multiplexed id -> prefix, through the replica's LRU


class ReplicaCore:
    def __init__(self, settings: Settings, replica_id: str, loaded: LoadedModel | None = None) -> None:
        """Loads the configured model (or uses `loaded`, e.g. a test's) and starts the engine."""
        started = time.perf_counter()
        self.replica_id = replica_id
        loaded = loaded or load_base_model(settings)
        self.loaded = loaded
        runner = ModelRunner(loaded.model, loaded.tokenizer)
        layout = check_model(runner, loaded.geometry, settings.batching)  # every start-up check; forwards run here
        # Reads one task version at a time (load_task), task.json included; the same limits as the ingress's store.
        # In the slot layout the engine's prefix bank is the only device copy of a prefix: the registry hands out
        # host prefixes (float32 views of the file), Serve's LRU keeps those, and the bank copies a prefix into its
        # columns when a row of the task is admitted. The padded layout computes on the prefix's own device tensors.
        self.layout = layout
        self.registry = make_registry(settings, loaded, None, shared=True, device_tier=layout != "slots")
        self.engine = ContinuousBatchingEngine(
            runner, policy=settings.batching, limits=EngineLimits.from_settings(settings), layout=layout
        )
        self._bank: DeviceTier | None = None  # the slot layout's prefix bank, once the engine's thread made it
        self.engine.on_prefix_bank = self._attach_bank
        # The prefixes this replica loaded and something still holds (Serve's LRU, a running request): what they
        # take is reported per tier, next to the bank's share, without asking Serve what its LRU holds.
        self._loaded: weakref.WeakValueDictionary[str, TaskPrefix] = weakref.WeakValueDictionary()
        self.engine.start()
        self.accepted = 0
        self.rejected = 0
        self.prefix_loads = 0
        self.prefix_load_s = 0.0
        self.node = platform.node()
        self.load_s = time.perf_counter() - started
        logger.info(
            "replica %s: %s on %s (%s) ready in %.1f s, torch threads %d",
            replica_id, loaded.name, loaded.device, loaded.dtype, self.load_s, torch.get_num_threads(),
        )

    def stop(self) -> None:
        self.engine.stop()

    def load_prefix(self, model_id: str) -> TaskPrefix:
        """Blocking: one task version from the shared store onto this replica's device (the LRU's loader)."""
        started = time.perf_counter()
        task_id, sha256 = parse_multiplexed_id(model_id)
        prefix = self.registry.load_task(validate_task_id(task_id), sha256)
        self._loaded[model_id] = prefix
        self.prefix_loads += 1
        self.prefix_load_s += time.perf_counter() - started
        return prefix

    def _attach_bank(self, bank: DeviceTier) -> None:
        self._bank = bank

    def prefix_bytes(self) -> dict[str, int]:
        """Bytes of prefixes this replica holds, by tier: in the slot layout the loaded prefixes are host copies and
        the bank holds the one device copy of each; in the padded layout the loaded prefixes are the device copies."""
        loaded = sum(prefix.nbytes for prefix in list(self._loaded.values()))
        if self.layout != "slots":
            return {"device": loaded, "host": 0}
        bank = self._bank
        return {"device": bank.held_bytes if bank is not None else 0, "host": loaded}

    async def _prefix(self, request: RemoteRequest, cached: PrefixLoader) -> TaskPrefix | None:
        if request.task_id is None or request.sha256 is None:
            return None
        if request.kv is not None:  # the version left the store after the ingress accepted the request
            on_host = TaskPrefix(request.task_id, request.kv, request.sha256, request.encoder_kv)
            return on_host if self.layout == "slots" else on_host.to(self.loaded.device, self.loaded.dtype)
        return await cached(request.model_id)

    async def stream(
        self, request: RemoteRequest, cached: PrefixLoader
    ) -> AsyncIterator[StreamStart | StreamError | Event]:
        try:
            prefix = await self._prefix(request, cached)
            engine_request = GenerationRequest(
                prompt_ids=list(request.prompt_ids), prefix=prefix, params=request.params, request_id=request.request_id
            )
            events = self.engine.stream(engine_request, with_text=request.with_text)  # raises at once when full
        except Exception as exc:  # noqa: BLE001 - becomes the status the client sees
            self.rejected += 1
            if not isinstance(exc, ServiceError):
                logger.exception("replica %s: request %s failed before it started", self.replica_id, request.request_id)
            status, body = error_body(exc)
            yield StreamStart(status=status, replica=self.replica_id, body=body)
            return
        self.accepted += 1
        yield StreamStart(status=200, replica=self.replica_id)
        try:
            async for event in events:
                yield event
        except Exception as exc:  # noqa: BLE001 - the status line is already sent: report it in-band
            if not isinstance(exc, ServiceError):
                logger.exception("replica %s: request %s failed", self.replica_id, request.request_id)
            status, body = error_body(exc)
            yield StreamError(status=status, body=body)
        finally:
            await events.aclose()  # also on cancellation (the client went away): the row is retired

    def snapshot(self) -> dict[str, Any]:
        """What /health and /metrics of the deployment show about this replica."""
        stats = self.engine.stats
        return {
            "replica": self.replica_id,
            "node": self.node,
            "model": self.loaded.name,
            "device": str(self.loaded.device),
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "running_rows": stats.running_rows,
            "waiting": stats.waiting,
            "steps": stats.steps,
            "prefills": stats.prefills,
            "rows_stepped": stats.rows_stepped,
            "finished": stats.finished,
            "cancelled": stats.cancelled,
            "max_batch_rows_seen": stats.max_batch_rows_seen,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "prefix_loads": self.prefix_loads,
            "prefix_load_seconds": round(self.prefix_load_s, 6),
            "prefix_bytes": self.prefix_bytes(),
            "torch_threads": torch.get_num_threads(),
            "start_seconds": round(self.load_s, 3),
        }
