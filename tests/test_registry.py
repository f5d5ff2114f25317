"""PrefixRegistry: storage, replace semantics, persistence, crash leftovers, task-id safety, PEFT layout parity."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors

import service.registry as registry_module
from service.errors import (
    InvalidPrefixError,
    InvalidTaskIdError,
    StoredTaskUnreadableError,
    TaskExistsError,
    TaskNotFoundError,
)
from service.geometry import PrefixGeometry
from service.kv_store import KVGeometry, PrefixBank
from service.prefix import TaskPrefix
from service.registry import TASK_ID_PATTERN, PrefixRecord, PrefixRegistry, validate_task_id
from tests.helpers import (
    STORE_LIMITS,
    edit_config,
    make_peft_prefix_adapter,
    make_peft_prefix_model,
    read_adapter,
    safetensors_bytes,
)

SERVED = "SmolLM2-135M-Instruct"
Adapter = tuple[bytes, bytes]


@pytest.fixture(scope="module")
def adapters(tiny_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Adapter]:
    """Three real PEFT adapters: two with V=5 (different seeds), one with V=9 made through the MLP path."""
    made = {}
    for name, v, seed, projection in [("a5", 5, 1, False), ("b5", 5, 2, False), ("c9", 9, 3, True)]:
        adapter_dir = make_peft_prefix_adapter(tiny_model, tmp_path_factory.mktemp(name), v, seed, projection)
        made[name] = read_adapter(adapter_dir)
    return made


def make_registry(root: Path, geometry: PrefixGeometry, **overrides: Any) -> PrefixRegistry:
    kwargs: dict[str, Any] = dict(
        device=torch.device("cpu"), dtype=torch.float32, served_model_name=SERVED, **STORE_LIMITS
    )
    kwargs.update(overrides)
    return PrefixRegistry(root, geometry, **kwargs)


def disk_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# ----------------------------------------------------------------------------- basic operations


def test_put_get_list_delete(tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter]) -> None:
    reg = make_registry(tmp_path, tiny_geometry)
    config_bytes, weights = adapters["a5"]
    record, created, warnings = reg.put("sentiment", config_bytes, weights)
    assert created is True and warnings == []
    assert record == PrefixRecord(
        task_id="sentiment",
        num_virtual_tokens=5,
        bytes=len(weights),
        sha256=hashlib.sha256(weights).hexdigest(),
        created_at=record.created_at,
        base_model_name_or_path=None,
    )
    created_at = datetime.fromisoformat(record.created_at.replace("Z", "+00:00"))
    assert created_at.tzinfo is not None and created_at.utcoffset() == timezone.utc.utcoffset(None)
    assert abs((datetime.now(timezone.utc) - created_at).total_seconds()) < 60

    prefix = reg.get("sentiment")
    assert isinstance(prefix, TaskPrefix) and prefix.task_id == "sentiment" and prefix.sha256 == record.sha256
    assert prefix.kv.shape == (2, 2, 2, 5, 8) and prefix.kv.dtype == torch.float32 and prefix.kv.device.type == "cpu"
    assert prefix.num_virtual_tokens == 5
    assert reg.record("sentiment") == record
    assert "sentiment" in reg and len(reg) == 1 and "other" not in reg

    # On disk: exactly the three files, the uploads verbatim.
    task_dir = tmp_path / "sentiment"
    assert disk_entries(tmp_path) == ["sentiment"]
    assert disk_entries(task_dir) == ["adapter_config.json", "adapter_model.safetensors", "metadata.json"]
    assert (task_dir / "adapter_config.json").read_bytes() == config_bytes
    assert (task_dir / "adapter_model.safetensors").read_bytes() == weights
    metadata = json.loads((task_dir / "metadata.json").read_text())
    assert metadata["sha256"] == record.sha256 and metadata["bytes"] == len(weights)
    assert metadata["created_at"] == record.created_at and metadata["num_virtual_tokens"] == 5

    reg.put("b-task", *adapters["b5"])
    reg.put("A.task_2", *adapters["c9"])
    assert [r.task_id for r in reg.list()] == ["A.task_2", "b-task", "sentiment"]
    assert reg.record("A.task_2").num_virtual_tokens == 9

    reg.delete("sentiment")
    assert "sentiment" not in reg and len(reg) == 2
    assert disk_entries(tmp_path) == ["A.task_2", "b-task"]
    with pytest.raises(TaskNotFoundError):
        reg.get("sentiment")
    with pytest.raises(TaskNotFoundError):
        reg.record("sentiment")
    with pytest.raises(TaskNotFoundError) as info:
        reg.delete("sentiment")
    assert info.value.status_code == 404
    # The deleted TaskPrefix is still usable by whoever holds it (a running batch).
    assert prefix.kv.shape == (2, 2, 2, 5, 8)


def test_put_replace_true_on_new_task_creates(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter]
) -> None:
    reg = make_registry(tmp_path, tiny_geometry)
    _, created, _ = reg.put("t", *adapters["a5"], replace=True)
    assert created is True and "t" in reg


def test_warning_for_other_base_model(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter]
) -> None:
    reg = make_registry(tmp_path, tiny_geometry)
    config_bytes, weights = adapters["a5"]
    record, _, warnings = reg.put("t", edit_config(config_bytes, base_model_name_or_path="gpt2"), weights)
    assert len(warnings) == 1 and "gpt2" in warnings[0]
    assert record.base_model_name_or_path == "gpt2"
    _, _, warnings = reg.put(
        "u", edit_config(config_bytes, base_model_name_or_path="HuggingFaceTB/smollm2-135m-instruct"), weights
    )
    assert warnings == []


# ----------------------------------------------------------------------------- parity with PEFT's own layout


@pytest.mark.parametrize("prefix_projection", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_equals_peft_get_prompt(
    tmp_path: Path, tiny_model: torch.nn.Module, tiny_geometry: PrefixGeometry, prefix_projection: bool,
    dtype: torch.dtype,
) -> None:
    peft_model = make_peft_prefix_model(tiny_model, 6, seed=11, prefix_projection=prefix_projection)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    reg = make_registry(tmp_path / "store", tiny_geometry, dtype=dtype)
    reg.put("task", *read_adapter(adapter_dir))
    kv = reg.get("task").kv
    g = tiny_geometry
    assert kv.dtype == dtype and kv.shape == (g.num_layers, 2, g.num_kv_heads, 6, g.head_dim)
    with torch.no_grad():
        cache = peft_model.get_prompt(batch_size=1)  # a DynamicCache on this PEFT/transformers version
    assert len(cache.layers) == tiny_geometry.num_layers
    for layer in range(tiny_geometry.num_layers):
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # (kv_heads, V, head_dim)
        torch.testing.assert_close(kv[layer, 0], keys.to(dtype), rtol=0, atol=1e-6)
        torch.testing.assert_close(kv[layer, 1], values.to(dtype), rtol=0, atol=1e-6)


def test_value_overflowing_model_dtype_rejected(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter]
) -> None:
    config_bytes, weights = adapters["a5"]
    from safetensors.torch import load

    tensor = load(weights)["prompt_embeddings"].clone()
    tensor[1, 3] = 1e5  # finite in float32, inf in float16
    big = safetensors_bytes({"prompt_embeddings": tensor})
    reg = make_registry(tmp_path, tiny_geometry, dtype=torch.float16)
    with pytest.raises(InvalidPrefixError) as info:
        reg.put("t", config_bytes, big)
    assert info.value.details["field"] == "prompt_embeddings"
    assert disk_entries(tmp_path) == []
    make_registry(tmp_path / "f32", tiny_geometry).put("t", config_bytes, big)  # fine for a float32 model


# ----------------------------------------------------------------------------- replace semantics


def test_replace_semantics(tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter]) -> None:
    reg = make_registry(tmp_path, tiny_geometry)
    first_record, _, _ = reg.put("t", *adapters["a5"])
    old = reg.get("t")
    old_kv = old.kv.clone()

    with pytest.raises(TaskExistsError) as info:
        reg.put("t", *adapters["b5"])
    assert info.value.status_code == 409
    assert reg.get("t") is old and reg.record("t") == first_record
    assert (tmp_path / "t" / "adapter_model.safetensors").read_bytes() == adapters["a5"][1]

    record, created, _ = reg.put("t", *adapters["c9"], replace=True)
    assert created is False and record.num_virtual_tokens == 9 and record.sha256 != first_record.sha256
    new = reg.get("t")
    assert new is not old and new.num_virtual_tokens == 9 and new.sha256 == record.sha256
    # The TaskPrefix a running batch holds is untouched by the replace.
    assert torch.equal(old.kv, old_kv) and old.num_virtual_tokens == 5 and old.sha256 == first_record.sha256
    assert len(reg) == 1 and [r.task_id for r in reg.list()] == ["t"]
    assert disk_entries(tmp_path) == ["t"]  # no .old-/.tmp- leftovers
    assert (tmp_path / "t" / "adapter_model.safetensors").read_bytes() == adapters["c9"][1]
    assert (tmp_path / "t" / "adapter_config.json").read_bytes() == adapters["c9"][0]


def test_failed_replace_keeps_old(tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter]) -> None:
    reg = make_registry(tmp_path, tiny_geometry)
    reg.put("t", *adapters["a5"])
    old = reg.get("t")
    config_bytes, _ = adapters["a5"]
    with pytest.raises(InvalidPrefixError):
        reg.put("t", config_bytes, b"not safetensors", replace=True)
    assert reg.get("t") is old and disk_entries(tmp_path) == ["t"]
    assert (tmp_path / "t" / "adapter_model.safetensors").read_bytes() == adapters["a5"][1]


def test_rename_failure_during_replace_rolls_back(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = make_registry(tmp_path, tiny_geometry)
    reg.put("t", *adapters["a5"])
    old = reg.get("t")
    real_rename = registry_module.os.rename

    def failing_rename(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(".tmp-"):
            raise OSError("disk full")
        real_rename(src, dst)

    monkeypatch.setattr(registry_module.os, "rename", failing_rename)
    with pytest.raises(OSError):
        reg.put("t", *adapters["b5"], replace=True)
    monkeypatch.undo()
    assert reg.get("t") is old and disk_entries(tmp_path) == ["t"]
    assert (tmp_path / "t" / "adapter_model.safetensors").read_bytes() == adapters["a5"][1]


# ----------------------------------------------------------------------------- persistence and recovery


def test_persistence_across_instances(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter]
) -> None:
    reg = make_registry(tmp_path, tiny_geometry)
    reg.put("one", *adapters["a5"])
    reg.put("two", *adapters["c9"])
    reg.put("one", *adapters["b5"], replace=True)
    reg.put("gone", *adapters["a5"])
    reg.delete("gone")

    fresh = make_registry(tmp_path, tiny_geometry)
    assert len(fresh) == 0  # nothing is loaded until load_all
    fresh.load_all()
    assert fresh.list() == reg.list()
    for task_id in ("one", "two"):
        assert torch.equal(fresh.get(task_id).kv, reg.get(task_id).kv)
        assert fresh.get(task_id).sha256 == reg.get(task_id).sha256
    assert "gone" not in fresh


def test_load_all_skips_corrupt_prefixes(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter], caplog: pytest.LogCaptureFixture
) -> None:
    reg = make_registry(tmp_path, tiny_geometry)
    for task_id in ("good", "bitrot", "no-metadata", "bad-config", "truncated", "bad-json"):
        reg.put(task_id, *adapters["a5"])
    weights_path = tmp_path / "bitrot" / "adapter_model.safetensors"
    data = bytearray(weights_path.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the tensor data: still parses, caught by the sha256 check
    weights_path.write_bytes(bytes(data))
    (tmp_path / "no-metadata" / "metadata.json").unlink()
    (tmp_path / "bad-config" / "adapter_config.json").write_bytes(edit_config(adapters["a5"][0], num_layers=7))
    truncated = tmp_path / "truncated" / "adapter_model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:50])
    (tmp_path / "bad-json" / "metadata.json").write_text("{not json")
    (tmp_path / "stray-file.txt").write_text("not a task")
    (tmp_path / "bad name").mkdir()

    fresh = make_registry(tmp_path, tiny_geometry)
    with caplog.at_level(logging.WARNING, logger="service.registry"):
        fresh.load_all()
        # Start-up reads no weights: a flipped bit (same size) is only found when the prefix is first read.
        assert [r.task_id for r in fresh.list()] == ["bitrot", "good"]
        with pytest.raises(StoredTaskUnreadableError, match="'bitrot'.*sha256"):
            fresh.get("bitrot")
    assert [r.task_id for r in fresh.list()] == ["good"]
    with pytest.raises(TaskNotFoundError):  # taken out of the store: no second read, no error loop
        fresh.get("bitrot")
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    for name in ("bitrot", "no-metadata", "bad-config", "truncated", "bad-json", "bad name"):
        assert name in logged
    assert "num_layers" in logged
    # Skipped tasks stay on disk for inspection.
    assert (tmp_path / "bitrot").is_dir() and (tmp_path / "bad-config").is_dir()


def test_start_up_reads_no_weights(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = make_registry(tmp_path, tiny_geometry)
    for i in range(20):
        reg.put(f"task-{i}", *adapters["a5" if i % 2 else "c9"], info=registry_module.TaskInfo(description=f"n{i}"))
    weights_opened: list[str] = []
    real_open = open

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file).endswith("adapter_model.safetensors"):
            weights_opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    fresh = make_registry(tmp_path, tiny_geometry)
    fresh.load_all()
    assert weights_opened == []
    assert fresh.list() == reg.list()  # ids, V, sizes, sha256, templates: all from the small files
    assert {fresh.tier(f"task-{i}") for i in range(20)} == {"disk"}
    assert torch.equal(fresh.get("task-3").kv, reg.get("task-3").kv)  # read on first use only
    assert len(weights_opened) == 1 and fresh.tier("task-3") == "device"


def test_weights_damaged_after_start_up_give_a_clear_error(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter]
) -> None:
    make_registry(tmp_path, tiny_geometry).put("t", *adapters["a5"])
    make_registry(tmp_path, tiny_geometry).put("other", *adapters["b5"])
    fresh = make_registry(tmp_path, tiny_geometry)
    fresh.load_all()
    weights = tmp_path / "t" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(StoredTaskUnreadableError) as caught:
        fresh.lookup("t")
    assert caught.value.status_code == 503 and caught.value.details["task_id"] == "t"
    assert "sha256" in caught.value.message
    assert "t" not in fresh and fresh.get("other").sha256 == hashlib.sha256(adapters["b5"][1]).hexdigest()
    # The damaged folder stays for inspection; a new upload takes its place.
    assert weights.is_file()
    _, created, _ = fresh.put("t", *adapters["a5"])
    assert created and torch.equal(fresh.get("t").kv, make_registry(tmp_path, tiny_geometry)._load_task("t", tmp_path / "t")[0].kv)


def test_a_cold_reload_of_unchanged_weights_is_not_hashed_again(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_registry(tmp_path, tiny_geometry).put("t", *adapters["a5"])
    one_prefix = make_registry(tmp_path, tiny_geometry)._load_task("t", tmp_path / "t")[0].nbytes
    # Host budget of one prefix, no device tier: a second task pushes the first back to disk.
    reg = make_registry(tmp_path, tiny_geometry, host_budget_bytes=one_prefix, device_tier=False)
    reg.load_all()
    reg.put("u", *adapters["b5"])
    hashed: list[int] = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(registry_module.hashlib, "sha256", lambda data=b"": hashed.append(len(data)) or real_sha256(data))
    reg.get("t")  # first read in this process: checked
    assert hashed == [len(adapters["a5"][1])] and reg.tier("u") == "disk"
    reg.get("u")  # written by this process: known good
    reg.get("t")  # read back from disk: same file, already checked
    assert hashed == [len(adapters["a5"][1])] and reg.tier("t") == "host"
    # Without a device tier the prefix is a view of the file's values (the bank converts it as it copies it in).
    assert torch.equal(reg.get("t").kv, make_registry(tmp_path, tiny_geometry)._load_task("t", tmp_path / "t")[0].kv)


def test_a_stored_prefix_that_overflows_a_narrower_serving_dtype_is_refused_on_use(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter]
) -> None:
    config, weights = adapters["a5"]
    tensor = load_safetensors(weights)["prompt_embeddings"].clone()
    tensor[0, 0] = 1e5  # finite in float32, inf in float16
    make_registry(tmp_path, tiny_geometry).put("big", config, safetensors_bytes({"prompt_embeddings": tensor}))
    for device_tier in (True, False):
        half = make_registry(tmp_path, tiny_geometry, dtype=torch.float16, device_tier=device_tier)
        half.load_all()
        with pytest.raises(StoredTaskUnreadableError, match="overflow"):
            half.get("big")


def test_with_the_bank_as_device_tier_a_hot_prefix_is_held_and_counted_once(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter]
) -> None:
    reg = make_registry(tmp_path, tiny_geometry, device_tier=False)
    reg.put("t", *adapters["a5"])
    reg.put("u", *adapters["b5"])
    g = tiny_geometry
    bank = PrefixBank(KVGeometry(g.num_layers, g.num_kv_heads, g.head_dim, torch.float32, torch.device("cpu")))
    reg.attach_device_tier(bank)
    prefix = reg.get("t")
    assert reg.tier("t") == "host" and reg.bytes_by_tier() == {"device": 0, "host": 2 * prefix.nbytes}
    entry = bank.acquire(prefix)  # a row of the task is admitted: its prefix's one device copy
    assert reg.tier("t") == "device" and reg.tier("u") == "host"
    assert reg.count_by_tier() == {"device": 1, "host": 1, "disk": 0}
    assert reg.bytes_by_tier() == {"device": prefix.nbytes, "host": 2 * prefix.nbytes}
    bank.release(entry)
    reg.put("t", *adapters["b5"], replace=True)  # the bank's copy is of the old version: not this task's now
    assert reg.tier("t") == "host"


def test_load_all_applies_current_limits(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter]
) -> None:
    reg = make_registry(tmp_path, tiny_geometry)
    reg.put("small", *adapters["a5"])
    reg.put("large", *adapters["c9"])
    stricter = make_registry(tmp_path, tiny_geometry, max_virtual_tokens=8)
    stricter.load_all()
    assert [r.task_id for r in stricter.list()] == ["small"]
    # A put over a stored-but-unloadable folder takes its place.
    _, created, _ = stricter.put("large", *adapters["b5"])
    assert created is True and stricter.record("large").num_virtual_tokens == 5
    assert disk_entries(tmp_path) == ["large", "small"]


def test_load_all_cleans_leftover_dot_dirs(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter]
) -> None:
    reg = make_registry(tmp_path, tiny_geometry)
    reg.put("kept", *adapters["a5"])
    reg.put("orphaned", *adapters["b5"])
    hex_id = uuid.uuid4().hex
    # A write that crashed half-way, a delete that crashed before rmtree, a replace that crashed after committing.
    (tmp_path / f".tmp-new-{hex_id}").mkdir()
    (tmp_path / f".tmp-new-{hex_id}" / "adapter_model.safetensors").write_bytes(b"partial")
    (tmp_path / f".del-gone-{hex_id}").mkdir()
    (tmp_path / f".old-kept-{hex_id}").mkdir()
    (tmp_path / f".old-kept-{hex_id}" / "adapter_config.json").write_text("{}")
    (tmp_path / ".something-else").mkdir()
    # A replace that crashed between "old aside" and "new in": the old version must come back.
    (tmp_path / "orphaned").rename(tmp_path / f".old-orphaned-{hex_id}")
    (tmp_path / ".hidden-file").write_text("left alone")  # plain files are not ours to delete

    fresh = make_registry(tmp_path, tiny_geometry)
    fresh.load_all()
    assert disk_entries(tmp_path) == [".hidden-file", "kept", "orphaned"]
    assert [r.task_id for r in fresh.list()] == ["kept", "orphaned"]
    assert fresh.record("orphaned").sha256 == hashlib.sha256(adapters["b5"][1]).hexdigest()
    assert fresh.record("kept").sha256 == hashlib.sha256(adapters["a5"][1]).hexdigest()


# ----------------------------------------------------------------------------- task ids and failed puts

INVALID_IDS = [
    *["../x", "..", ".", ".hidden", "a/b", "a\\b", "/abs", "a\x00b", "é", "café", "a b", "abc\n", "-a", "_a", ""],
    "a" * 65,
]


@pytest.mark.parametrize("task_id", INVALID_IDS, ids=[repr(t)[:20] for t in INVALID_IDS])
def test_invalid_task_ids(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter], task_id: str
) -> None:
    reg = make_registry(tmp_path / "store", tiny_geometry)
    with pytest.raises(InvalidTaskIdError) as info:
        validate_task_id(task_id)
    assert info.value.status_code == 422 and info.value.details["pattern"] == TASK_ID_PATTERN
    assert TASK_ID_PATTERN in info.value.message
    json.dumps(info.value.to_json())
    for call in (
        lambda: reg.put(task_id, *adapters["a5"]),
        lambda: reg.put(task_id, *adapters["a5"], replace=True),
        lambda: reg.get(task_id),
        lambda: reg.record(task_id),
        lambda: reg.delete(task_id),
    ):
        with pytest.raises(InvalidTaskIdError):
            call()
    assert task_id not in reg
    assert disk_entries(tmp_path) == ["store"] and disk_entries(tmp_path / "store") == []


@pytest.mark.parametrize("task_id", ["a", "A", "0", "a" * 64, "task.v2_final-3", "9-lives"])
def test_valid_task_ids(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter], task_id: str
) -> None:
    assert validate_task_id(task_id) == task_id
    reg = make_registry(tmp_path, tiny_geometry)
    reg.put(task_id, *adapters["a5"])
    assert task_id in reg and disk_entries(tmp_path) == [task_id]


def test_failed_put_leaves_nothing(tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter]) -> None:
    reg = make_registry(tmp_path, tiny_geometry)
    config_bytes, weights = adapters["a5"]
    for bad in [
        (edit_config(config_bytes, num_layers=3), weights),
        (config_bytes, b"garbage"),
        (config_bytes, weights[:-1]),
        (b"[]", weights),
    ]:
        with pytest.raises(InvalidPrefixError):
            reg.put("t", *bad)
    assert disk_entries(tmp_path) == [] and len(reg) == 0


def test_failed_write_leaves_nothing(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = make_registry(tmp_path, tiny_geometry)
    real_write = registry_module._write_durably

    def failing_write(path: Path, data: bytes) -> None:
        if path.name == "adapter_model.safetensors":
            raise OSError("no space left on device")
        real_write(path, data)

    monkeypatch.setattr(registry_module, "_write_durably", failing_write)
    with pytest.raises(OSError):
        reg.put("t", *adapters["a5"])
    assert disk_entries(tmp_path) == [] and "t" not in reg


# ----------------------------------------------------------------------------- threads


def test_concurrent_puts(tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter]) -> None:
    reg = make_registry(tmp_path, tiny_geometry)
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        # Every thread adds its own task and races the others for "shared" (no replace): exactly one may win.
        reg.put(f"task-{index}", *adapters["a5"])
        try:
            reg.put("shared", *adapters["b5"])
            result = "created"
        except TaskExistsError:
            result = "exists"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["created"] + ["exists"] * 7
    assert len(reg) == 9
    assert disk_entries(tmp_path) == sorted(["shared"] + [f"task-{i}" for i in range(8)])


def test_load_all_during_a_put_spares_its_temp_dir(
    tmp_path: Path, tiny_geometry: PrefixGeometry, adapters: dict[str, Adapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = make_registry(tmp_path, tiny_geometry)
    real_write = registry_module._write_durably

    def write_then_reload(path: Path, data: bytes) -> None:
        real_write(path, data)
        if path.name == "adapter_model.safetensors":
            reg.load_all()  # e.g. an admin reload racing an upload

    monkeypatch.setattr(registry_module, "_write_durably", write_then_reload)
    reg.put("t", *adapters["a5"])
    assert "t" in reg and disk_entries(tmp_path) == ["t"]
