"""Concurrency (fast, real uvicorn in a thread): upload / replace / delete / generate / stream / read of one task from
many threads at once; every status is documented, no 5xx, and every generation equals one uploaded version's
greedy output (no torn prefix). Duration: RELIABILITY_CONCURRENCY_S (default 3 s). Also: the deadline's 504.

Measured figures are printed (run with -s to see them)."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.model_loader import LoadedModel
from service.settings import Settings
from tests.helpers import (
    ThreadedServer,
    assert_json_error,
    generate_body,
    make_version,
    sse_events,
    upload_files,
    upload_form,
    slowed_forward,
)

CONCURRENCY_S = float(os.environ.get("RELIABILITY_CONCURRENCY_S", "3"))

@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, op: str, status: int, allowed: set[int], problem: str | None = None) -> None:
        with self.lock:
            self.statuses[(op, status)] += 1
            if status not in allowed:
                self.problems.append(f"{op}: status {status} not in {sorted(allowed)}")
            if problem:
                self.problems.append(f"{op}: {problem}")


@pytest.mark.parametrize("tiers", ["unbounded", "disk_reload"])
def test_concurrent_upload_replace_delete_generate_on_one_task(loaded: LoadedModel, tmp_path: Path, tiers: str) -> None:
    """`disk_reload`: 1-byte device and host budgets, and a second task generated alongside, so nearly every
    generate evicts the other task and reloads its own prefix from disk while replaces and deletes rename folders."""
    versions = [
        make_version(loaded.model, tmp_path, f"v{v}", v, seed, loaded.tokenizer)
        for v, seed in ((3, 21), (5, 22), (7, 23))
    ]
    other = make_version(loaded.model, tmp_path, "other", 6, 24, loaded.tokenizer)
    texts = {v.expected_text for v in versions}
    assert len(texts | {other.expected_text}) == len(versions) + 1, "versions must be distinguishable by output"
    records = {(v.sha256, v.num_virtual_tokens) for v in versions}
    budgets = {"prefix_device_budget_bytes": 1, "prefix_host_budget_bytes": 1} if tiers == "disk_reload" else {}
    settings = Settings(prefix_dir=tmp_path / "store", max_running_rows=8, request_timeout_s=60, **budgets)
    task = "shared"
    tally = Tally()
    stop = threading.Event()
    rng_lock = threading.Lock()
    rng = random.Random(7)

    def pick(seq):
        with rng_lock:
            return rng.choice(seq)

    def uploader() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                version, replace = pick(versions), pick([True, True, False])
                r = c.post("/prefixes", data=upload_form(task, replace), files=upload_files(version.config, version.weights))
                problem = None
                if r.status_code in (200, 201) and r.json()["sha256"] != version.sha256:
                    problem = "acknowledged another version's sha256"
                tally.record("upload", r.status_code, {200, 201} if replace else {201, 409}, problem)

    def deleter() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                tally.record("delete", c.delete(f"/prefixes/{task}").status_code, {204, 404})
                time.sleep(0.03)  # let the task exist most of the time

    def generator() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/generate", json=generate_body(task))
                problem = None
                if r.status_code == 200 and r.json()["generated_text"] not in texts:
                    problem = f"torn prefix? generated {r.json()['generated_text']!r}"
                tally.record("generate", r.status_code, {200, 404}, problem)

    def other_generator() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/prefixes", data=upload_form("other", None), files=upload_files(other.config, other.weights))
            tally.record("upload_other", r.status_code, {201})
            while not stop.is_set():
                r = c.post("/generate", json=generate_body("other"))
                problem = None
                if r.status_code == 200 and r.json()["generated_text"] != other.expected_text:
                    problem = f"other task generated {r.json()['generated_text']!r}"
                tally.record("generate_other", r.status_code, {200}, problem)

    def streamer() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/generate_stream", json=generate_body(task))
                problem = None
                if r.status_code == 200:
                    events = sse_events(r.text)
                    final = events[-1] if events else {}
                    if final.get("generated_text") not in texts:
                        problem = f"stream ended without a known text: {final!r}"
                tally.record("stream", r.status_code, {200, 404}, problem)

    def reader() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                r = c.get(f"/prefixes/{task}")
                problem = None
                if r.status_code == 200 and (r.json()["sha256"], r.json()["num_virtual_tokens"]) not in records:
                    problem = f"record mixes versions: {r.json()!r}"
                tally.record("read", r.status_code, {200, 404}, problem)
                listed = c.get("/prefixes")
                tally.record("list", listed.status_code, {200})
                time.sleep(0.01)

    def guarded(worker: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                worker()
            except Exception as exc:  # noqa: BLE001 - a client-side failure (bad JSON, transport) is a finding
                tally.record(worker.__name__, 0, {0}, f"{type(exc).__name__}: {exc}")

        return run

    app = create_app(settings, loaded)
    workers = [uploader, uploader, deleter, generator, generator, other_generator, streamer, reader]
    with ThreadedServer(app) as server:
        threads = [threading.Thread(target=guarded(w), daemon=True) for w in workers]
        for t in threads:
            t.start()
        time.sleep(CONCURRENCY_S)
        stop.set()
        for t in threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in threads), "a client hung"
        final = httpx.get(f"{server.url}/prefixes", timeout=30).json()["prefixes"]
    cache_stats = getattr(getattr(app.state.service.registry, "cache", None), "stats", None)
    if tiers == "disk_reload":
        print(f"\nprefix cache: {cache_stats}")
        assert cache_stats is None or cache_stats.misses_from_disk > 0, "the tiny budgets did not force disk reloads"

    print(f"\nconcurrency [{tiers}] ({CONCURRENCY_S:.0f} s, {len(workers)} threads): {dict(sorted(tally.statuses.items()))}")
    assert not tally.problems, tally.problems[:20]
    ok = Counter(op for (op, status), n in tally.statuses.items() for _ in range(n) if status in (200, 201, 204))
    assert ok["generate"] and ok["upload"] and ok["delete"], f"the storm did not exercise every path: {ok}"

    # The store on disk agrees with the last listing; no leftovers; a restart serves the same thing.
    store = settings.prefix_dir
    assert sorted(p.name for p in store.iterdir()) == [p["task_id"] for p in final]
    with TestClient(create_app(settings, loaded)) as client:
        after = client.get("/prefixes").json()["prefixes"]
        assert [(p["task_id"], p["sha256"]) for p in after] == [(p["task_id"], p["sha256"]) for p in final]
        for record in after:
            version = next(v for v in [*versions, other] if v.sha256 == record["sha256"])
            out = client.post("/generate", json=generate_body(record["task_id"]))
            assert out.status_code == 200 and out.json()["generated_text"] == version.expected_text


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_deadline_exceeded_is_a_documented_json_504(loaded: LoadedModel, tmp_path: Path, path: str) -> None:
    version = make_version(loaded.model, tmp_path, "v", 4, 1, loaded.tokenizer)
    app = create_app(Settings(prefix_dir=tmp_path / "store", request_timeout_s=0.2), loaded)
    with TestClient(app) as client:
        assert client.post("/prefixes", data=upload_form("t", None), files=upload_files(version.config, version.weights)).status_code == 201
        if path == "/generate":
            body: dict[str, Any] = {"task_id": "t", "inputs": "t5", "parameters": {"max_new_tokens": 50}}
        else:
            body = {"model": "t", "prompt": "t5", "max_tokens": 50}
        with slowed_forward(loaded.model, 0.05):  # 50 tokens x 50 ms: well past the 0.2 s deadline
            response = client.post(path, json=body)
        documented = client.get("/openapi.json").json()["paths"][path]["post"]["responses"]
    assert_json_error(response, 504)
    assert "504" in documented, sorted(documented)
