"""The task -> prefix registry: validated PEFT prefixes on disk, device-resident KV tensors in memory.

On-disk layout, one folder per task under `root`:

    root/<task_id>/adapter_config.json       the uploaded config, verbatim
    root/<task_id>/adapter_model.safetensors the uploaded weights, verbatim
    root/<task_id>/metadata.json             sha256 + size of the safetensors bytes, created_at, num_virtual_tokens
    root/<task_id>/task.json                 optional: prompt_template, description, source ("adapter" or "text") and,
                                             for a task made from text, the text (PEFT ignores the file)

Crash safety: an upload is validated completely before anything touches disk, written into a dot-named temp
folder (fsynced), then renamed into place. A replace renames the old folder aside (`.old-...`), renames the new one
in, fsyncs the parent, then deletes the old one. A delete renames aside (`.del-...`) before removing. Names starting
with "." are never tasks; `load_all` deletes them, except that an `.old-` folder whose task folder is missing (a
crash between the two renames of a replace) is renamed back, so a crash never loses the previous prefix.

Shared-store mode (`shared=True`, for several processes or machines on one store, e.g. Ray Serve replicas):
  - mutations also take an exclusive `flock` on `root/.lock` (readers of a whole task folder take it shared), so
    writers in different processes serialise and no reader sees a half-swapped folder;
  - existence (409) and capacity are decided on disk under that lock, not from this process's memory;
  - every committed mutation rewrites `root/.generation` (a random token); readers compare it before answering and
    rescan the store when it changed, so an upload, replace or delete through any process is seen by all;
  - start-up recovery never sweeps another writer's live temp folder (a `.tmp-` folder is only removed once it is
    older than SHARED_TMP_STALE_S);
  - `load_task(task_id, sha256)` loads one task's prefix (optionally a specific version) without touching the rest.

Concurrency: mutations are serialised by a lock. Listing readers take no lock: the records are an immutable
snapshot dict whose reference is swapped whole under the lock (copy-on-write). `get` takes the lock, since it may
move a prefix between memory tiers (`TieredPrefixCache`: device LRU within a byte budget, then host, then disk
only). Each TaskPrefix is immutable, so a batch that already holds a prefix keeps it after a replace, a delete or
an eviction.
"""

from __future__ import annotations

import bisect
import builtins
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Literal, Mapping

try:  # POSIX only; shared-store mode needs it
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

import numpy as np
import torch

from service.errors import (
    InvalidPrefixError,
    InvalidTaskIdError,
    PrefixLimitError,
    PrefixVersionError,
    ServiceError,
    StoredTaskUnreadableError,
    TaskExistsError,
    TaskNotFoundError,
)
from service.geometry import PrefixGeometry
from service.metrics import Metrics
from service.prefix import (
    TaskPrefix,
    encoder_prompt_embeddings_to_kv,
    prompt_embeddings_kv_view,
    prompt_embeddings_to_kv,
)
from service.prefix_cache import DeviceTier, TieredPrefixCache, Tier
from service.prefix_format import ValidatedAdapter, validate_adapter, validate_stored_config
from service.templates import validate_description, validate_template

logger = logging.getLogger(__name__)

TASK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_TASK_ID_RE = re.compile(TASK_ID_PATTERN)


def is_valid_task_id(task_id: str) -> bool:
    return _TASK_ID_RE.fullmatch(task_id) is not None

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "metadata.json"
METADATA_VERSION = 1
TASK_FILE = "task.json"

_TMP_PREFIX = ".tmp-"  # a write in progress
_OLD_PREFIX = ".old-"  # the previous version during a replace
_DEL_PREFIX = ".del-"  # a task being deleted
LOCK_FILE = ".lock"  # shared mode: the cross-process lock (flock)
GENERATION_FILE = ".generation"  # shared mode: rewritten on every committed mutation
SHARED_TMP_STALE_S = 3600.0  # shared mode: a `.tmp-` folder younger than this may be another writer's live upload


@dataclass(frozen=True)
class PrefixRecord:
    """What GET /prefixes shows about one task."""

    task_id: str
    num_virtual_tokens: int
    bytes: int  # size of the stored safetensors file
    sha256: str  # of the stored safetensors file
    created_at: str  # ISO-8601 UTC
    base_model_name_or_path: str | None
    prompt_template: str | None = None  # with one {inputs} slot; the routes fill it (service/templates.py)
    description: str | None = None
    source: Literal["adapter", "text"] = "adapter"  # "text": a task made from text (POST /prefixes with `text`)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TaskInfo:
    """What task.json holds beside the PEFT files: how to prompt the task, and where its prefix came from."""

    prompt_template: str | None = None
    description: str | None = None
    source: Literal["adapter", "text"] = "adapter"
    text: str | None = None  # the text a task made from text was computed from

    @property
    def is_empty(self) -> bool:
        return self == TaskInfo()

    def to_json(self) -> dict[str, Any]:
        return {"format_version": 1, **{k: v for k, v in asdict(self).items() if v is not None}}

    @classmethod
    def from_json(cls, data: object, *, max_template_chars: int, max_description_chars: int) -> TaskInfo:
        """Parse a stored task.json; ValueError (the task is then skipped at load) when it is malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"{TASK_FILE} is not a JSON object")
        source = data.get("source", "adapter")
        if source not in ("adapter", "text"):
            raise ValueError(f"{TASK_FILE}: source must be 'adapter' or 'text', got {source!r}")
        text = data.get("text")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{TASK_FILE}: text must be a string")
        for name in ("prompt_template", "description"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ValueError(f"{TASK_FILE}: {name} must be a string")
        try:
            template = validate_template(data.get("prompt_template"), max_chars=max_template_chars)
            description = validate_description(data.get("description"), max_chars=max_description_chars)
        except ServiceError as exc:
            raise ValueError(f"{TASK_FILE}: {exc.message}") from None
        return cls(prompt_template=template, description=description, source=source, text=text)


def validate_task_id(task_id: str) -> str:
    """Return task_id if it matches TASK_ID_PATTERN, else raise InvalidTaskIdError (422).

    The pattern is also what keeps task ids safe as folder names: no separators, no leading dot, ASCII only.
    """
    # fullmatch, not match: "$" alone would accept a trailing newline.
    if not isinstance(task_id, str) or _TASK_ID_RE.fullmatch(task_id) is None:
        shown = task_id if isinstance(task_id, str) and len(task_id) <= 100 else repr(task_id)[:100]
        raise InvalidTaskIdError(
            f"invalid task id {shown!r}: must match {TASK_ID_PATTERN} "
            "(1-64 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit)",
            task_id=shown,
            pattern=TASK_ID_PATTERN,
        )
    return task_id


class PrefixRegistry:
    def __init__(
        self,
        root: Path,
        geometry: PrefixGeometry,
        *,
        device: torch.device,
        dtype: torch.dtype,
        served_model_name: str,
        max_virtual_tokens: int,
        max_prefix_bytes: int,
        max_config_bytes: int,
        max_prefixes: int | None = None,
        max_text_tokens: int | None = None,
        max_template_chars: int = 4096,
        max_description_chars: int = 1000,
        device_budget_bytes: int = 0,
        host_budget_bytes: int = 0,
        metrics: Metrics | None = None,
        shared: bool = False,
        probe: Callable[[TaskPrefix], None] | None = None,
        device_tier: bool = True,
    ) -> None:
        if shared and fcntl is None:
            raise RuntimeError("a shared prefix store needs POSIX file locks (fcntl), not available on this platform")
        self.root = Path(root)
        self.shared = shared
        self.geometry = geometry
        self.device = torch.device(device)
        self.dtype = dtype
        self.served_model_name = served_model_name
        self.max_virtual_tokens = max_virtual_tokens
        self.max_prefix_bytes = max_prefix_bytes
        self.max_config_bytes = max_config_bytes
        self.max_prefixes = max_prefixes
        # A task made from text (source "text") may be longer than a trained prefix: V up to max_text_tokens.
        self.max_text_tokens = max_text_tokens if max_text_tokens is not None else max_virtual_tokens
        self.max_template_chars = max_template_chars
        self.max_description_chars = max_description_chars
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: Mapping[str, PrefixRecord] = MappingProxyType({})
        self._page_index: tuple[Mapping[str, PrefixRecord], builtins.list[str]] | None = None  # sorted ids per snapshot
        # device_tier=False (the slot layout): the engine's prefix bank is the device tier (`attach_device_tier`);
        # prefixes are made and kept in host memory, and the bank holds the one device copy.
        self._cache = TieredPrefixCache(
            self.device, device_budget_bytes=device_budget_bytes, host_budget_bytes=host_budget_bytes, metrics=metrics,
            device_tier=device_tier,
        )
        self._prefix_device = self.device if device_tier else torch.device("cpu")
        # task id -> (sha256, st_ino, st_size, st_mtime_ns) of a weights file this process has hashed: a later cold
        # load of the same, unchanged file skips the sha256 (the first load after start-up always checks it).
        self._verified: dict[str, tuple[str, int, int, int]] = {}
        self._writing: set[str] = set()  # temp folders of puts in progress: load_all must not sweep them
        self._metrics = metrics
        self._generation_seen: str | None = None  # shared mode: the store generation the snapshot reflects
        # Run on every new prefix before it is stored (a forward with it, `service.batch.probe_prefix`): raises a
        # 422 for values the model cannot compute with. None where no weights are held (the Ray ingress).
        self.probe = probe

    # ------------------------------------------------------------------ reading (lock-free snapshots)

    def get(self, task_id: str) -> TaskPrefix:
        """The task's prefix on the device (brought back from host memory or disk if it was evicted);
        TaskNotFoundError if there is none."""
        validate_task_id(task_id)
        self._sync()
        with self._lock:
            record = self._entries.get(task_id)
            if record is None:
                raise TaskNotFoundError(task_id)
            return self._cached_prefix(record)[0]

    def lookup(self, task_id: str) -> tuple[TaskPrefix, PrefixRecord]:
        """The task's prefix and its record, of the same version (taken together under the lock, so a replace
        cannot pair one version's template with another's prefix)."""
        validate_task_id(task_id)
        self._sync()
        with self._lock:
            record = self._entries.get(task_id)
            if record is None:
                raise TaskNotFoundError(task_id)
            return self._cached_prefix(record)

    def adapter_files(self, task_id: str) -> dict[str, bytes]:
        """The stored files of a task, as PEFT loads them (adapter_config.json, adapter_model.safetensors) plus
        task.json when there is one. Read under the lock (and the store's shared lock), so the files belong to one
        version."""
        validate_task_id(task_id)
        self._sync()
        with self._lock, self._store_lock(exclusive=False):
            record = self._entries.get(task_id)
            if record is None:
                raise TaskNotFoundError(task_id)
            path = self.root / task_id
            files = {name: (path / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
            if (path / TASK_FILE).is_file():
                files[TASK_FILE] = (path / TASK_FILE).read_bytes()
            # Shared store: another process may have committed a newer version since our snapshot; the files read
            # under the store lock are one version, whose metadata says which.
            expected = _stored_sha256(path) if self.shared else record.sha256
        if hashlib.sha256(files[WEIGHTS_FILE]).hexdigest() != expected:
            raise RuntimeError(f"stored weights of task {task_id!r} do not match their recorded sha256")
        return files

    def record(self, task_id: str) -> PrefixRecord:
        return self._entry(task_id)

    def tier(self, task_id: str) -> Tier:
        """Where the task's KV lives now: device, host or disk."""
        record = self._entry(task_id)
        return self._cache.tier(task_id, record.sha256)

    def count_by_tier(self) -> dict[Tier, int]:
        """How many stored tasks each tier holds now (each task counted once, in the fastest tier holding it)."""
        counts: dict[Tier, int] = {"device": 0, "host": 0, "disk": 0}
        self._sync()
        for task_id, record in self._entries.items():
            counts[self._cache.tier(task_id, record.sha256)] += 1
        return counts

    def bytes_by_tier(self) -> dict[str, int]:
        """Prefix KV bytes held per memory tier (device, host); each byte counted once, where it is."""
        return self._cache.bytes_by_tier()

    def attach_device_tier(self, tier: DeviceTier) -> None:
        """The slot layout: the engine's prefix bank is the device tier. Called by the engine's thread when it builds
        the bank; the registry then reports a task held there as on the device."""
        self._cache.attach_device_tier(tier)

    @property
    def cache(self) -> TieredPrefixCache:
        return self._cache

    def list(self) -> builtins.list[PrefixRecord]:
        self._sync()
        entries = self._entries
        return [entries[task_id] for task_id in sorted(entries)]

    def __len__(self) -> int:
        self._sync()
        return len(self._entries)

    def __contains__(self, task_id: object) -> bool:
        # An id that fails the pattern cannot be registered: answer False rather than raise from an `in` test.
        if not isinstance(task_id, str) or _TASK_ID_RE.fullmatch(task_id) is None:
            return False
        self._sync()
        return task_id in self._entries

    def _entry(self, task_id: str) -> PrefixRecord:
        validate_task_id(task_id)
        self._sync()
        entry = self._entries.get(task_id)
        if entry is None:
            raise TaskNotFoundError(task_id)
        return entry

    # ------------------------------------------------------------------ loading

    def load_all(self) -> None:
        """Index every stored task: its metadata, config and task.json, checked against the served model and
        today's limits, and its weights' size (a stat). No weights are read: each prefix is read, checked against its
        sha256 and converted on its first use (`get`), so start-up time and memory do not grow with the weights
        stored. Leftovers of interrupted writes are cleaned up; an unreadable or invalid task is logged and skipped
        (it stays on disk for inspection), never fatal."""
        with self._lock, self._store_lock(exclusive=True):
            self._recover_leftovers()
            if self.shared:  # generation files a crashed writer left half-written (we hold the lock: none is live)
                for stray in self.root.glob(f"{GENERATION_FILE}.*"):
                    stray.unlink(missing_ok=True)
            self._generation_seen = self._read_generation()
            entries: dict[str, PrefixRecord] = {}
            for path in sorted(self.root.iterdir()):
                name = path.name
                if name.startswith(".") or not path.is_dir():
                    continue
                if _TASK_ID_RE.fullmatch(name) is None:
                    logger.warning("prefix store: skipping %s: folder name is not a valid task id", path)
                    continue
                try:
                    entries[name] = self._scan_task(name, path)
                except Exception as exc:  # noqa: BLE001 - one bad task must not stop start-up
                    logger.warning("prefix store: skipping task %r at %s: %s", name, path, _describe(exc))
            self._entries = MappingProxyType(entries)
            for task_id in [t for t in list(self._verified) if t not in entries]:
                del self._verified[task_id]
        logger.info("prefix store: indexed %d task(s) from %s (weights load on first use)", len(entries), self.root)

    def load_task(self, task_id: str, sha256: str | None = None) -> TaskPrefix:
        """Load one stored task's prefix from disk onto this registry's device, bypassing the snapshot and the cache
        (a serving replica keeps its own LRU). With `sha256`, the stored version must be that one, else
        PrefixVersionError (the task was replaced since the caller resolved it). TaskNotFoundError if absent."""
        validate_task_id(task_id)
        path = self.root / task_id
        with self._store_lock(exclusive=False):
            if not (path / METADATA_FILE).is_file():
                raise TaskNotFoundError(task_id)
            if sha256 is not None:
                stored = _stored_sha256(path)
                if stored != sha256:
                    raise PrefixVersionError(task_id, sha256, stored)
            prefix, _ = self._load_task(task_id, path)
        return prefix

    def _load_task(self, task_id: str, path: Path) -> tuple[TaskPrefix, PrefixRecord]:
        """Read and check one stored task completely (record and prefix)."""
        record = self._scan_task(task_id, path)
        return self._load_prefix(record, path), record

    def _scan_task(self, task_id: str, path: Path) -> PrefixRecord:
        """A stored task's record from its small files and a stat of its weights (which are not read)."""
        metadata = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
        if not isinstance(metadata, dict):
            raise ValueError(f"{METADATA_FILE} is not a JSON object")
        digest, nbytes, created_at = metadata.get("sha256"), metadata.get("bytes"), metadata.get("created_at")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ValueError(f"{METADATA_FILE} lacks a sha256")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool):
            raise ValueError(f"{METADATA_FILE} lacks bytes")
        if not isinstance(created_at, str):
            raise ValueError(f"{METADATA_FILE} lacks created_at")
        size = (path / WEIGHTS_FILE).stat().st_size
        if size != nbytes:
            raise ValueError(
                f"{WEIGHTS_FILE} is {size} bytes, {METADATA_FILE} records {nbytes} (truncated or corrupt?)"
            )
        info = TaskInfo()
        if (path / TASK_FILE).is_file():
            info = TaskInfo.from_json(
                json.loads((path / TASK_FILE).read_text(encoding="utf-8")),
                max_template_chars=self.max_template_chars,
                max_description_chars=self.max_description_chars,
            )
        max_virtual_tokens, max_prefix_bytes = self._limits(info)
        config, num_virtual_tokens = validate_stored_config(
            (path / CONFIG_FILE).read_bytes(), size, self.geometry, max_virtual_tokens=max_virtual_tokens,
            max_prefix_bytes=max_prefix_bytes, max_config_bytes=self.max_config_bytes,
        )
        base_model = config.get("base_model_name_or_path")
        return PrefixRecord(
            task_id=task_id,
            num_virtual_tokens=num_virtual_tokens,
            bytes=nbytes,
            sha256=digest,
            created_at=created_at,
            base_model_name_or_path=base_model if isinstance(base_model, str) and base_model else None,
            prompt_template=info.prompt_template,
            description=info.description,
            source=info.source,
        )

    def _load_prefix(self, record: PrefixRecord, path: Path) -> TaskPrefix:
        """Read a stored task's weights and make its prefix. The weights must be the ones `record` names (sha256,
        checked unless this process already hashed this very file); ValueError otherwise."""
        with open(path / WEIGHTS_FILE, "rb") as f:
            stat = os.fstat(f.fileno())
            weights_bytes = f.read()
        identity = (record.sha256, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if len(weights_bytes) != record.bytes:
            raise ValueError(f"{WEIGHTS_FILE} is {len(weights_bytes)} bytes, its record says {record.bytes}")
        if self._verified.get(record.task_id) != identity:
            if hashlib.sha256(weights_bytes).hexdigest() != record.sha256:
                raise ValueError(f"{WEIGHTS_FILE} does not match the sha256 recorded in {METADATA_FILE} (corrupt?)")
        info = TaskInfo(source=record.source)
        # The bytes are the ones validated at upload (sha256): parse and shape-check them, but the values are checked
        # once, in the served dtype, by _make_entry.
        validated = self._validate((path / CONFIG_FILE).read_bytes(), weights_bytes, info, check_values=False)
        for text in validated.warnings:
            logger.debug("prefix store: task %r: %s", record.task_id, text)
        if not self._cache.has_device_tier and validated.encoder_prompt_embeddings is None:
            prefix = self._host_prefix(record, validated)
        else:
            # Finite float32 values stay finite in a dtype of float32's range: only a narrower serving dtype
            # (float16, bfloat16 rounding near its top) needs the values checked again.
            wide = self.dtype in (torch.float32, torch.float64)
            prefix = self._make_entry(
                record.task_id, validated, record.sha256, record.bytes, record.created_at, info, check_values=not wide
            )[0]
        self._verified[record.task_id] = identity
        return prefix

    def _host_prefix(self, record: PrefixRecord, validated: ValidatedAdapter) -> TaskPrefix:
        """The slot layout's cold load, on an input thread: the prefix as a float32 view of the file's bytes, made
        without running a torch kernel (a kernel would leave an OpenMP team on this long-lived thread and slow every
        engine step, see `service.compute_thread`). The bank converts it to the served dtype as it copies it in."""
        kv = prompt_embeddings_kv_view(validated.prompt_embeddings, self.geometry)
        if self.dtype not in (torch.float32, torch.float64):
            # numpy reductions are single-threaded; NaN fails the comparison too.
            largest = np.abs(validated.prompt_embeddings.numpy()).max()
            if not largest <= torch.finfo(self.dtype).max:
                raise InvalidPrefixError(
                    "prompt_embeddings",
                    f"values representable in the served model's dtype ({str(self.dtype).removeprefix('torch.')})",
                    "values that overflow to inf",
                )
        return TaskPrefix(task_id=record.task_id, kv=kv, sha256=record.sha256)

    def _cached_prefix(self, record: PrefixRecord) -> tuple[TaskPrefix, PrefixRecord]:
        """The prefix of `record`'s version, from memory or disk. Caller holds the lock. A stored task whose files
        no longer match its record is dropped from the store (logged; its folder stays for inspection) and the
        request gets StoredTaskUnreadableError naming it; the next request for it gets a 404."""
        task_id = record.task_id
        if self._cache.cached(task_id):
            return self._cache.get(task_id, _unreachable), record
        path = self.root / task_id
        try:
            with self._store_lock(exclusive=False):
                if self.shared:
                    # Another process may have replaced the task since our snapshot: load what is stored now.
                    record = self._scan_task(task_id, path)
                    self._entries = MappingProxyType({**self._entries, task_id: record})
                prefix = self._cache.get(task_id, lambda: self._load_prefix(record, path))
        except FileNotFoundError as exc:
            if self.shared and not path.exists():  # deleted through another process
                self._forget(task_id)
                raise TaskNotFoundError(task_id) from None
            self._refuse_unreadable(task_id, path, exc)
        except (OSError, ValueError, ServiceError) as exc:
            self._refuse_unreadable(task_id, path, exc)
        return prefix, record

    def _refuse_unreadable(self, task_id: str, path: Path, exc: BaseException) -> builtins.NoReturn:
        reason = _describe(exc)
        logger.error("prefix store: task %r at %s cannot be served and is dropped from the store: %s",
                     task_id, path, reason)
        self._forget(task_id)
        raise StoredTaskUnreadableError(task_id, reason) from None

    def _forget(self, task_id: str) -> None:
        """Drop a task from this process's view (not from disk). Caller holds the lock."""
        self._entries = MappingProxyType({k: v for k, v in self._entries.items() if k != task_id})
        self._cache.drop(task_id)
        self._verified.pop(task_id, None)

    def _recover_leftovers(self) -> None:
        """Undo or finish what a crash interrupted. Caller holds the lock."""
        for path in sorted(self.root.iterdir()):
            name = path.name
            if not name.startswith(".") or not path.is_dir() or name in self._writing:
                continue
            if self.shared and name.startswith(_TMP_PREFIX) and not _older_than(path, SHARED_TMP_STALE_S):
                continue  # possibly another process's upload in progress
            if name.startswith(_OLD_PREFIX):
                task_id = _task_id_from_aside_name(name[len(_OLD_PREFIX) :])
                target = self.root / task_id if task_id else None
                # Crash between "old aside" and "new in": the replace never committed, so the old version stands.
                if target is not None and not target.exists():
                    logger.warning("prefix store: restoring %s to %s (interrupted replace)", path, target)
                    try:
                        os.rename(path, target)
                        _fsync_dir(self.root)
                    except OSError as exc:
                        logger.warning("prefix store: could not restore %s: %s", path, exc)
                    continue
            logger.warning("prefix store: removing leftover %s from an interrupted write or delete", path)
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ writing

    def put(
        self,
        task_id: str,
        config_bytes: bytes,
        weights_bytes: bytes,
        *,
        replace: bool = False,
        info: TaskInfo | None = None,
    ) -> tuple[PrefixRecord, bool, builtins.list[str]]:
        """Validate and store a task's adapter (and its task.json when `info` says anything). Returns (record,
        created, warnings); created is False when an existing prefix was replaced. TaskExistsError (409) if the
        task exists and replace is False."""
        validate_task_id(task_id)
        self._sync()
        if not replace and task_id in self._entries:  # fail fast; re-checked under the lock
            raise TaskExistsError(task_id)
        self._check_capacity(task_id)

        # Everything that can reject the upload happens before the disk is touched.
        info = info or TaskInfo()
        validate_template(info.prompt_template, max_chars=self.max_template_chars)
        validate_description(info.description, max_chars=self.max_description_chars)
        validated = self._validate(config_bytes, weights_bytes, info)
        digest = hashlib.sha256(weights_bytes).hexdigest()
        created_at = _utc_now()
        prefix, record = self._make_entry(task_id, validated, digest, len(weights_bytes), created_at, info)
        if self.probe is not None:
            self.probe(prefix)
        metadata = {
            "format_version": METADATA_VERSION,
            "sha256": digest,
            "bytes": len(weights_bytes),
            "created_at": created_at,
            "num_virtual_tokens": validated.num_virtual_tokens,
        }

        tmp = self.root / f"{_TMP_PREFIX}{task_id}-{uuid.uuid4().hex}"
        aside: Path | None = None
        existed = False
        with self._lock:
            self._writing.add(tmp.name)
        try:
            tmp.mkdir()
            _write_durably(tmp / CONFIG_FILE, config_bytes)
            _write_durably(tmp / WEIGHTS_FILE, weights_bytes)
            _write_durably(tmp / METADATA_FILE, json.dumps(metadata, indent=2).encode("utf-8"))
            if not info.is_empty:
                _write_durably(tmp / TASK_FILE, json.dumps(info.to_json(), indent=2).encode("utf-8"))
            _fsync_dir(tmp)

            with self._lock, self._store_lock(exclusive=True):
                target = self.root / task_id
                # Shared store: another process may have added the task since our snapshot; the disk decides.
                existed = target.exists() if self.shared else task_id in self._entries
                if existed and not replace:
                    raise TaskExistsError(task_id)
                self._check_capacity(task_id, on_disk=self.shared)
                if target.exists():
                    if not existed:
                        # A folder load_all skipped as unreadable: the task is absent as far as clients can see.
                        logger.warning("prefix store: overwriting unloadable stored folder %s", target)
                    aside = self.root / f"{_OLD_PREFIX}{task_id}-{uuid.uuid4().hex}"
                    os.rename(target, aside)
                try:
                    os.rename(tmp, target)
                except BaseException:
                    if aside is not None:  # roll back: the old version stays current
                        os.rename(aside, target)
                        aside = None
                    raise
                _fsync_dir(self.root)  # the commit point
                if aside is not None:
                    # Still under the lock: once committed, the old version must not look like an interrupted
                    # replace (`.old-`), or a crash before its removal would restore it over a later delete.
                    retired = self.root / f"{_DEL_PREFIX}{task_id}-{uuid.uuid4().hex}"
                    os.rename(aside, retired)
                    aside = retired
                self._bump_generation()
                self._entries = MappingProxyType({**self._entries, task_id: record})
                self._cache.put(prefix)
                self._mark_verified(task_id, digest, target / WEIGHTS_FILE)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            with self._lock:
                self._writing.discard(tmp.name)
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)

        logger.info(
            "prefix store: %s task %r (V=%d, %d bytes, sha256 %s)",
            "replaced" if existed else "added",
            task_id,
            validated.num_virtual_tokens,
            len(weights_bytes),
            digest[:12],
        )
        return record, not existed, list(validated.warnings)

    def delete(self, task_id: str) -> None:
        """Remove a task's prefix from memory and disk. TaskNotFoundError if absent."""
        validate_task_id(task_id)
        self._sync()
        with self._lock, self._store_lock(exclusive=True):
            target = self.root / task_id
            # Shared store: the disk decides (another process may have deleted or added it).
            if not (target.exists() if self.shared else task_id in self._entries):
                if self.shared:
                    self._entries = MappingProxyType({k: v for k, v in self._entries.items() if k != task_id})
                    self._cache.drop(task_id)
                raise TaskNotFoundError(task_id)
            aside = self.root / f"{_DEL_PREFIX}{task_id}-{uuid.uuid4().hex}"
            if target.exists():
                os.rename(target, aside)  # the commit point; rmtree below may be slow or interrupted
                _fsync_dir(self.root)
            else:
                logger.warning("prefix store: task %r was already gone from %s", task_id, self.root)
            self._bump_generation()
            self._forget(task_id)
        if self._metrics is not None:
            # A deleted task's per-task series would otherwise stay forever (and keep naming it on /metrics).
            self._metrics.forget_task(task_id)
        shutil.rmtree(aside, ignore_errors=True)
        logger.info("prefix store: deleted task %r", task_id)

    # ------------------------------------------------------------------ helpers

    def _mark_verified(self, task_id: str, digest: str, weights: Path) -> None:
        """This process wrote (and hashed) these weights: a later cold load of the unchanged file needs no sha256."""
        try:
            stat = weights.stat()
        except OSError:
            self._verified.pop(task_id, None)
            return
        self._verified[task_id] = (digest, stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def _check_capacity(self, task_id: str, *, on_disk: bool = False) -> None:
        if self.max_prefixes is None:
            return
        stored = self._stored_task_ids() if on_disk else set(self._entries)
        if task_id not in stored and len(stored) >= self.max_prefixes:
            raise PrefixLimitError(
                f"the store already holds {len(stored)} prefixes, its limit; delete one first",
                limit=self.max_prefixes,
            )

    def _stored_task_ids(self) -> set[str]:
        """Task folders on disk (valid names, not dot-named); the caller holds the store lock."""
        return {
            p.name for p in self.root.iterdir()
            if not p.name.startswith(".") and _TASK_ID_RE.fullmatch(p.name) is not None and p.is_dir()
        }

    # ------------------------------------------------------------------ shared-store mode

    @contextlib.contextmanager
    def _store_lock(self, *, exclusive: bool) -> Iterator[None]:
        """The cross-process lock of a shared store (a no-op otherwise). Take it after `self._lock`, never before."""
        if not self.shared:
            yield
            return
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _read_generation(self) -> str | None:
        if not self.shared:
            return None
        try:
            return (self.root / GENERATION_FILE).read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return ""

    def _bump_generation(self) -> None:
        """Shared mode: tell every other process the store changed. Caller holds the exclusive store lock."""
        if not self.shared:
            return
        tmp = self.root / f"{GENERATION_FILE}.{uuid.uuid4().hex}"
        tmp.write_text(uuid.uuid4().hex + "\n", encoding="ascii")
        os.replace(tmp, self.root / GENERATION_FILE)

    def _sync(self) -> None:
        """Shared mode: when another process changed the store since our snapshot, rescan it. Tasks whose stored
        sha256 is unchanged keep their loaded prefix; new or replaced ones are loaded, removed ones dropped."""
        if not self.shared or self._read_generation() == self._generation_seen:
            return
        with self._lock, self._store_lock(exclusive=False):
            generation = self._read_generation()
            if generation == self._generation_seen:
                return
            entries: dict[str, PrefixRecord] = {}
            for task_id in sorted(self._stored_task_ids()):
                path = self.root / task_id
                known = self._entries.get(task_id)
                try:
                    # Same weights and same commit (created_at): unchanged. A replace with the same weights but
                    # another template or description is a new commit, and must be seen too.
                    if known is not None and _stored_version(path) == (known.sha256, known.created_at):
                        entries[task_id] = known
                        continue
                    entries[task_id] = self._scan_task(task_id, path)
                    self._cache.drop(task_id)  # another version: loaded on its first use
                    self._verified.pop(task_id, None)
                except Exception as exc:  # noqa: BLE001 - as in load_all: skip what cannot be read
                    logger.warning("prefix store: skipping task %r at %s: %s", task_id, path, _describe(exc))
            for task_id in set(self._entries) - set(entries):
                self._cache.drop(task_id)
                self._verified.pop(task_id, None)
                if self._metrics is not None:  # deleted through another process: as in delete()
                    self._metrics.forget_task(task_id)
            self._entries = MappingProxyType(entries)
            self._generation_seen = generation

    def _limits(self, info: TaskInfo | None) -> tuple[int, int]:
        """(max_virtual_tokens, max_prefix_bytes) a task of this kind may have."""
        if info is not None and info.source == "text":
            # Made by this server from a text: up to max_text_tokens, whatever size that takes in float32.
            text_bytes = self.max_text_tokens * self.geometry.numbers_per_virtual_token * 4 + (1 << 20)
            return self.max_text_tokens, max(self.max_prefix_bytes, text_bytes)
        return self.max_virtual_tokens, self.max_prefix_bytes

    def _validate(
        self, config_bytes: bytes, weights_bytes: bytes, info: TaskInfo | None = None, *, check_values: bool = True
    ) -> ValidatedAdapter:
        max_virtual_tokens, max_prefix_bytes = self._limits(info)
        return validate_adapter(
            config_bytes,
            weights_bytes,
            self.geometry,
            served_model_name=self.served_model_name,
            max_virtual_tokens=max_virtual_tokens,
            max_prefix_bytes=max_prefix_bytes,
            max_config_bytes=self.max_config_bytes,
            check_values=check_values,
        )

    def _make_entry(
        self,
        task_id: str,
        validated: ValidatedAdapter,
        digest: str,
        nbytes: int,
        created_at: str,
        info: TaskInfo | None = None,
        *,
        check_values: bool = True,
    ) -> tuple[TaskPrefix, PrefixRecord]:
        info = info or TaskInfo()
        device = self._prefix_device
        kv = prompt_embeddings_to_kv(validated.prompt_embeddings, self.geometry, dtype=self.dtype, device=device)
        encoder_kv = None
        if validated.encoder_prompt_embeddings is not None:
            encoder_kv = encoder_prompt_embeddings_to_kv(
                validated.encoder_prompt_embeddings, self.geometry, dtype=self.dtype, device=device
            )
        # Finite in float32 is not enough: a value beyond float16's range (65504) becomes inf in the model dtype.
        for name, tensor in (("prompt_embeddings", kv), ("encoder_prompt_embeddings", encoder_kv)):
            if check_values and tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise InvalidPrefixError(
                    name,
                    f"values representable in the served model's dtype ({str(self.dtype).removeprefix('torch.')})",
                    "values that overflow to inf",
                )
        prefix = TaskPrefix(task_id=task_id, kv=kv, sha256=digest, encoder_kv=encoder_kv)
        record = PrefixRecord(
            task_id=task_id,
            num_virtual_tokens=validated.num_virtual_tokens,
            bytes=nbytes,
            sha256=digest,
            created_at=created_at,
            base_model_name_or_path=validated.base_model_name_or_path,
            prompt_template=info.prompt_template,
            description=info.description,
            source=info.source,
        )
        return prefix, record

    # ------------------------------------------------------------------ paging (issue 19)

    def page(self, *, after: str | None, limit: int, prefix: str = "") -> tuple[builtins.list[PrefixRecord], bool]:
        """Up to `limit` records in task-id order, of ids greater than `after` (from the start when None) that begin
        with `prefix`, and whether more follow. Reads one snapshot: a task added or removed between two pages shifts
        nothing else, since the next page starts after the last id returned, not at an offset."""
        self._sync()
        entries = self._entries
        index = self._page_index
        if index is None or index[0] is not entries:  # one sort per snapshot, not per page
            index = (entries, sorted(entries))
            self._page_index = index
        ids: builtins.list[str] = index[1]
        start = bisect.bisect_right(ids, after) if after is not None else 0
        if prefix:
            start = max(start, bisect.bisect_left(ids, prefix))
        chosen: builtins.list[PrefixRecord] = []
        for task_id in ids[start:start + limit + 1]:
            if not task_id.startswith(prefix):
                break  # sorted: ids with the prefix are contiguous
            chosen.append(entries[task_id])
        has_more = len(chosen) > limit
        return chosen[:limit], has_more


def _unreachable() -> TaskPrefix:
    raise AssertionError("the prefix was in memory")


def _task_id_from_aside_name(rest: str) -> str | None:
    """`<task_id>-<32 hex>` -> task_id, or None when the name is not one this module wrote."""
    task_id, sep, suffix = rest.rpartition("-")
    if not sep or len(suffix) != 32 or _TASK_ID_RE.fullmatch(task_id) is None:
        return None
    return task_id


def _stored_version(path: Path) -> tuple[str | None, str | None]:
    """(sha256, created_at) a stored task folder's metadata records (None for what is unreadable)."""
    try:
        metadata = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(metadata, dict):
        return None, None
    sha256, created_at = metadata.get("sha256"), metadata.get("created_at")
    return (sha256 if isinstance(sha256, str) else None), (created_at if isinstance(created_at, str) else None)


def _stored_sha256(path: Path) -> str | None:
    """The sha256 a stored task folder's metadata records (None when unreadable)."""
    return _stored_version(path)[0]


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return True


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make renames/creations inside `path` durable. Not all platforms can open a directory; skip there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ServiceError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
