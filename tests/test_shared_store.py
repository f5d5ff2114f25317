"""PrefixRegistry in shared-store mode: several registries (standing for processes or Ray replicas) on one folder."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from service.errors import PrefixLimitError, PrefixVersionError, TaskExistsError, TaskNotFoundError
from service.geometry import PrefixGeometry, geometry_from_config
from service.registry import GENERATION_FILE, LOCK_FILE, SHARED_TMP_STALE_S, PrefixRegistry
from tests.helpers import make_peft_prefix_adapter, read_adapter, tiny_llama

Adapter = tuple[bytes, bytes]


@pytest.fixture(scope="module")
def geometry() -> PrefixGeometry:
    return geometry_from_config(tiny_llama(seed=0).config)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Adapter]:
    model = tiny_llama(seed=0)
    return {
        name: read_adapter(make_peft_prefix_adapter(model, tmp_path_factory.mktemp(name), v, seed))
        for name, v, seed in [("v5", 5, 1), ("v7", 7, 2)]
    }


def shared(root: Path, geometry: PrefixGeometry, **overrides: Any) -> PrefixRegistry:
    kwargs: dict[str, Any] = dict(
        device=torch.device("cpu"), dtype=torch.float32, served_model_name="tiny", max_virtual_tokens=64,
        max_prefix_bytes=1 << 20, max_config_bytes=1 << 14, shared=True,
    )
    kwargs.update(overrides)
    registry = PrefixRegistry(root, geometry, **kwargs)
    registry.load_all()
    return registry


def test_changes_through_one_registry_are_seen_by_another(
    tmp_path: Path, geometry: PrefixGeometry, adapters: dict[str, Adapter]
) -> None:
    a, b = shared(tmp_path, geometry), shared(tmp_path, geometry)
    record, created, _ = a.put("t", *adapters["v5"])
    assert created and "t" in b and [r.task_id for r in b.list()] == ["t"]
    assert b.get("t").sha256 == record.sha256 and b.get("t").num_virtual_tokens == 5

    replaced, created, _ = a.put("t", *adapters["v7"], replace=True)
    assert not created and b.record("t").sha256 == replaced.sha256
    assert b.get("t").num_virtual_tokens == 7  # the new version, without a restart

    b.delete("t")
    assert "t" not in a and len(a) == 0
    with pytest.raises(TaskNotFoundError):
        a.get("t")


def test_existence_and_capacity_are_decided_on_disk(
    tmp_path: Path, geometry: PrefixGeometry, adapters: dict[str, Adapter]
) -> None:
    a, b = shared(tmp_path, geometry, max_prefixes=1), shared(tmp_path, geometry, max_prefixes=1)
    a.put("t", *adapters["v5"])
    with pytest.raises(TaskExistsError):
        b.put("t", *adapters["v7"])
    with pytest.raises(PrefixLimitError):
        b.put("u", *adapters["v7"])
    a.delete("t")
    with pytest.raises(TaskNotFoundError):
        b.delete("t")


def test_concurrent_writers_in_different_registries_respect_the_limit(
    tmp_path: Path, geometry: PrefixGeometry, adapters: dict[str, Adapter]
) -> None:
    """Separate registries share no thread lock: only the store's flock keeps the capacity check and commit atomic."""
    registries = [shared(tmp_path, geometry, max_prefixes=3) for _ in range(4)]
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def put(i: int) -> None:
        barrier.wait()
        try:
            registries[i % 4].put(f"task{i}", *adapters["v5"])
            outcomes.append("stored")
        except PrefixLimitError:
            outcomes.append("full")

    threads = [threading.Thread(target=put, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["full"] * 5 + ["stored"] * 3
    on_disk = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert len(on_disk) == 3 and len(registries[0]) == 3


def test_start_up_does_not_sweep_another_writers_live_temp_folder(tmp_path: Path, geometry: PrefixGeometry) -> None:
    live = tmp_path / f".tmp-up-{uuid.uuid4().hex}"
    stale = tmp_path / f".tmp-old-{uuid.uuid4().hex}"
    for folder in (live, stale):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
    old = time.time() - SHARED_TMP_STALE_S - 60
    os.utime(stale, (old, old))
    half_written = tmp_path / f"{GENERATION_FILE}.{uuid.uuid4().hex}"  # a writer crashed while bumping it
    half_written.write_text("")
    shared(tmp_path, geometry)
    assert live.exists() and not stale.exists() and not half_written.exists()


def test_load_task_loads_one_version(tmp_path: Path, geometry: PrefixGeometry, adapters: dict[str, Adapter]) -> None:
    writer = shared(tmp_path, geometry)
    first, _, _ = writer.put("t", *adapters["v5"])
    replica = PrefixRegistry(
        tmp_path, geometry, device=torch.device("cpu"), dtype=torch.float32, served_model_name="tiny",
        max_virtual_tokens=64, max_prefix_bytes=1 << 20, max_config_bytes=1 << 14, shared=True,
    )  # never load_all: a serving replica reads single tasks
    prefix = replica.load_task("t", first.sha256)
    assert torch.equal(prefix.kv, writer.get("t").kv) and prefix.sha256 == first.sha256

    writer.put("t", *adapters["v7"], replace=True)
    with pytest.raises(PrefixVersionError) as raised:
        replica.load_task("t", first.sha256)
    assert raised.value.status_code == 409 and raised.value.code == "prefix_version_changed"
    assert replica.load_task("t").num_virtual_tokens == 7
    with pytest.raises(TaskNotFoundError):
        replica.load_task("absent")


def test_single_process_mode_writes_no_lock_files(
    tmp_path: Path, geometry: PrefixGeometry, adapters: dict[str, Adapter]
) -> None:
    registry = shared(tmp_path, geometry, shared=False)
    registry.put("t", *adapters["v5"])
    registry.delete("t")
    assert not (tmp_path / LOCK_FILE).exists() and not (tmp_path / GENERATION_FILE).exists()


def test_templates_and_text_tasks_are_seen_by_other_processes(
    tmp_path: Path, geometry: PrefixGeometry, adapters: dict[str, Adapter]
) -> None:
    """task.json (issue 12) travels through the shared store: another process sees a task's template, description and
    source, a replace that changes only the template (same weights), and a replica's load_task reads it too."""
    from service.registry import TaskInfo

    a, b = shared(tmp_path, geometry), shared(tmp_path, geometry)
    info = TaskInfo(prompt_template="Q: {inputs} A:", description="first", source="text", text="some text")
    a.put("t", *adapters["v5"], info=info)
    assert b.record("t").prompt_template == "Q: {inputs} A:" and b.record("t").source == "text"
    prefix, record = b.lookup("t")
    assert record.description == "first" and prefix.sha256 == record.sha256

    # Same weights, another template: a new commit the other process must see (not skipped as "same sha256").
    a.put("t", *adapters["v5"], replace=True, info=TaskInfo(prompt_template="R: {inputs} S:"))
    assert b.lookup("t")[1].prompt_template == "R: {inputs} S:" and b.record("t").source == "adapter"
    assert b.adapter_files("t")["task.json"] == a.adapter_files("t")["task.json"]

    replica = shared(tmp_path, geometry)
    assert replica.load_task("t", a.record("t").sha256).num_virtual_tokens == 5


def test_a_text_task_longer_than_max_virtual_tokens_loads_in_another_process(
    tmp_path: Path, geometry: PrefixGeometry, adapters: dict[str, Adapter]
) -> None:
    """A task made from text may have V up to max_text_tokens (> max_virtual_tokens): every process of a shared store
    must accept it, not only the one that made it."""
    from service.registry import TaskInfo

    a = shared(tmp_path, geometry, max_virtual_tokens=4, max_text_tokens=16)
    b = shared(tmp_path, geometry, max_virtual_tokens=4, max_text_tokens=16)
    a.put("long", *adapters["v7"], info=TaskInfo(source="text", text="x"))  # V=7 > 4: allowed as a text task
    assert b.get("long").num_virtual_tokens == 7
    replica = shared(tmp_path, geometry, max_virtual_tokens=4, max_text_tokens=16)
    assert replica.load_task("long").num_virtual_tokens == 7
