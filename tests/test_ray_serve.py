"""`prefix-serve serve --replicas 2` for real: one private Ray cluster (2 CPUs, one torch thread per replica) for
the whole module, always shut down (and any process of that cluster killed) at the end.

Checked through HTTP: parity with the single-process server (solo and concurrent), a hot task spread over both
replicas, upload / replace / delete reaching every replica, bad uploads, stream disconnect, auth, health and metrics.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from service.api.app import create_app
from service.model_loader import LoadedModel
from service.settings import Settings
from tests.helpers import (
    ThreadedServer,
    edit_config,
    free_port,
    pickle_bytes,
    pids_mentioning,
    prefix_serve_command,
    prometheus_values,
    read_adapter,
    sse_events,
)

pytest.importorskip("ray.serve", reason="needs the ray extra: pip install -e '.[ray]'")

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SHIPPED = Path(__file__).resolve().parent.parent / "prefixes"
GENERATE_KEY = "gen-key-for-ray-tests"
ADMIN_KEY = "admin-key-for-ray-tests"
START_TIMEOUT_S = 420  # Ray + two replicas loading SmolLM2 on a busy 2-core machine
NEW_TOKENS = 8

REQUESTS: list[dict[str, Any]] = [
    {"task_id": "sentiment", "inputs": "Review : a warm, funny and moving film Sentiment :"},
    {"task_id": "sentiment", "inputs": "Review : dull, far too long and badly acted Sentiment :"},
    {"task_id": "complaints", "inputs": "Tweet text : @airline lost my bag again, third time this year Label :"},
    {"task_id": "complaints", "inputs": "Tweet text : what a lovely sunny morning in Paris Label :"},
    {"task_id": "date-iso", "inputs": "the third of May 2021"},
    {"task_id": "date-iso", "inputs": "Christmas day 1999"},
]


def body(request: dict[str, Any], max_new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    return {**request, "parameters": {"max_new_tokens": max_new_tokens}}


def upload_files(config: bytes, weights: bytes) -> dict[str, tuple[str, bytes, str]]:
    return {
        "adapter_config": ("adapter_config.json", config, "application/json"),
        "adapter_model": ("adapter_model.safetensors", weights, "application/octet-stream"),
    }


class RayServer:
    def __init__(self, url: str, store: Path, process: subprocess.Popen[bytes], log: Path, started_s: float) -> None:
        self.url = url
        self.store = store
        self.process = process
        self.log = log
        self.started_s = started_s
        self.admin = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    def metric(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return prometheus_values(self.admin.get("/metrics").text, name)

    def routed(self, task: str) -> dict[str, float]:
        """Requests of `task` each replica accepted so far."""
        per_replica: dict[str, float] = {}
        for labels, value in self.metric("prefix_serve_routed_requests_total").items():
            label = dict(labels)
            if label["task"] == task:
                per_replica[label["replica"]] = per_replica.get(label["replica"], 0.0) + value
        return per_replica

    def burst(self, requests: list[dict[str, Any]]) -> list[httpx.Response]:
        async def run() -> list[httpx.Response]:
            headers = {"Authorization": f"Bearer {GENERATE_KEY}"}
            limits = httpx.Limits(max_connections=len(requests))
            async with httpx.AsyncClient(base_url=self.url, timeout=240, headers=headers, limits=limits) as client:
                return list(await asyncio.gather(*(client.post("/generate", json=r) for r in requests)))

        return asyncio.run(run())


@pytest.fixture(scope="module")
def reference(embedded_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Greedy texts of REQUESTS from the single-process server on the same shipped prefixes."""
    store = tmp_path_factory.mktemp("reference-store")
    shutil.copytree(SHIPPED, store, dirs_exist_ok=True)
    settings = Settings(prefix_dir=store, device="cpu", dtype="float32")
    texts = {}
    with ThreadedServer(create_app(settings, loaded=embedded_model)) as server, httpx.Client(timeout=120) as client:
        for request in REQUESTS:
            response = client.post(server.url + "/generate", json=body(request))
            assert response.status_code == 200, response.text
            texts[request["inputs"]] = response.json()["generated_text"]
    return texts


@pytest.fixture(scope="module")
def ray_server(reference: dict[str, str], embedded_cache_dir: Path) -> Iterator[RayServer]:
    # A short private folder: Ray's socket paths must stay under the 107-byte limit, and only this cluster's
    # processes mention it (teardown kills exactly those).
    ray_dir = Path(tempfile.mkdtemp(prefix="ps-ray-", dir="/tmp"))
    store = ray_dir / "store"
    shutil.copytree(SHIPPED, store)
    port = free_port()
    env = {
        **os.environ,
        "PREFIX_SERVE_RAY_NUM_CPUS": "2",
        "PREFIX_SERVE_RAY_TEMP_DIR": str(ray_dir / "ray"),
        "PREFIX_SERVE_CACHE_DIR": str(embedded_cache_dir),
        "PREFIX_SERVE_API_KEYS": GENERATE_KEY,
        "PREFIX_SERVE_ADMIN_API_KEYS": ADMIN_KEY,
        "PREFIX_SERVE_LOG_FORMAT": "text",
        "PREFIX_SERVE_LOG_LEVEL": "warning",
    }
    command = prefix_serve_command() + [
        "serve", "--replicas", "2", "--port", str(port), "--prefix-dir", str(store), "--device", "cpu",
        "--dtype", "float32",
    ]
    log = ray_dir / "serve.log"
    started = time.monotonic()
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    server = RayServer(url, store, process, log, 0.0)
    try:
        deadline = started + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"prefix-serve exited early:\n{log.read_text(errors='replace')[-4000:]}"
            assert time.monotonic() < deadline, f"not healthy in time:\n{log.read_text(errors='replace')[-4000:]}"
            try:
                health = httpx.get(url + "/health", timeout=5)
                if health.status_code == 200 and health.json()["replicas"] == 2:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        server.started_s = time.monotonic() - started
        yield server
    finally:
        server.admin.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while pids_mentioning(str(ray_dir)) and time.monotonic() < deadline:
            time.sleep(1)
        for pid in pids_mentioning(str(ray_dir)):  # only this cluster's processes
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_health_and_metrics_describe_the_whole_deployment(ray_server: RayServer) -> None:
    print(f"\nray-serve start-up (2 replicas, until /health shows both): {ray_server.started_s:.1f} s")
    health = httpx.get(ray_server.url + "/health").json()  # no key needed, as in the single-process server
    assert health["status"] == "ok" and health["replicas"] == 2 and health["prefixes"] == 3
    assert {r["device"] for r in health["replica_details"]} == {"cpu"}
    assert ray_server.metric("prefix_serve_replicas") == {frozenset(): 2.0}
    assert len(ray_server.metric("prefix_serve_replica_running_rows")) == 2
    assert httpx.get(ray_server.url + "/docs").status_code == 200
    paths = httpx.get(ray_server.url + "/openapi.json").json()["paths"]
    assert {"/generate", "/generate_stream", "/prefixes", "/v1/completions", "/v1/chat/completions"} <= set(paths)


def test_auth_is_enforced_by_the_ingress(ray_server: RayServer) -> None:
    anonymous = httpx.post(ray_server.url + "/generate", json=body(REQUESTS[0]))
    assert anonymous.status_code == 401 and anonymous.json()["type"] == "unauthorized"
    generate_only = httpx.Client(base_url=ray_server.url, headers={"Authorization": f"Bearer {GENERATE_KEY}"})
    with generate_only:
        assert generate_only.post("/generate", json=body(REQUESTS[0])).status_code == 200
        refused = generate_only.delete("/prefixes/sentiment")
        assert refused.status_code == 403
    assert (ray_server.store / "sentiment").is_dir()


def test_greedy_output_matches_the_single_process_server(ray_server: RayServer, reference: dict[str, str]) -> None:
    for request in REQUESTS:  # solo
        response = ray_server.admin.post("/generate", json=body(request))
        assert response.status_code == 200, response.text
        assert response.json()["generated_text"] == reference[request["inputs"]], request
    concurrent = ray_server.burst([body(r) for r in REQUESTS * 2])
    assert [r.json()["generated_text"] for r in concurrent] == [reference[r["inputs"]] for r in REQUESTS * 2]


def test_a_hot_task_spreads_over_both_replicas(ray_server: RayServer, reference: dict[str, str]) -> None:
    for task in ("date-iso", "sentiment"):
        before = ray_server.routed(task)
        requests = [body(r) for r in REQUESTS if r["task_id"] == task] * 8  # 16 at once
        responses = ray_server.burst(requests)
        assert all(r.status_code == 200 for r in responses)
        assert [r.json()["generated_text"] for r in responses] == [reference[r["inputs"]] for r in requests]
        after = ray_server.routed(task)
        served = {replica: after[replica] - before.get(replica, 0.0) for replica in after}
        print(f"\n{task}: 16 concurrent requests per replica: {sorted(served.values())}")
        assert sum(served.values()) == 16
        assert min(served.values()) >= 5, served  # the router balances (8/8 when arrivals are simultaneous)


def test_upload_replace_delete_reach_every_replica(ray_server: RayServer, reference: dict[str, str]) -> None:
    admin = ray_server.admin
    sentiment = read_adapter(SHIPPED / "sentiment")
    complaints = read_adapter(SHIPPED / "complaints")
    created = admin.post("/prefixes", data={"task_id": "fresh"}, files=upload_files(*sentiment))
    assert created.status_code == 201, created.text
    for _ in range(3):  # one at a time: affinity keeps them on the replica that loaded the prefix
        assert admin.post("/generate", json=body({**REQUESTS[0], "task_id": "fresh"})).status_code == 200
    assert sorted(ray_server.routed("fresh").values()) == [3.0]

    def burst_as(task: str, source: dict[str, Any]) -> None:
        before = ray_server.routed(task)
        responses = ray_server.burst([body({**source, "task_id": task})] * 12)
        assert [r.status_code for r in responses] == [200] * 12, responses[0].text
        assert {r.json()["generated_text"] for r in responses} == {reference[source["inputs"]]}
        after = ray_server.routed(task)
        assert len([r for r in after if after[r] > before.get(r, 0.0)]) == 2, (before, after)

    burst_as("fresh", REQUESTS[0])  # served by both replicas with the uploaded prefix
    replaced = admin.post("/prefixes", data={"task_id": "fresh", "replace": "true"}, files=upload_files(*complaints))
    assert replaced.status_code == 200, replaced.text
    burst_as("fresh", REQUESTS[2])  # the new version everywhere: the complaints prefix's answer

    assert admin.delete("/prefixes/fresh").status_code == 204
    for _ in range(4):
        gone = admin.post("/generate", json=body({**REQUESTS[0], "task_id": "fresh"}))
        assert gone.status_code == 404 and gone.json()["type"] == "task_not_found"
    openai = admin.post("/v1/completions", json={"model": "fresh", "prompt": "x", "max_tokens": 2})
    assert openai.status_code == 404
    assert not (ray_server.store / "fresh").exists()


def test_bad_uploads_are_4xx_and_store_nothing(ray_server: RayServer) -> None:
    config, weights = read_adapter(SHIPPED / "sentiment")
    before = sorted(p.name for p in ray_server.store.iterdir())
    cases: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("not json", {"task_id": "bad"}, upload_files(b"{not json", weights)),
        ("lora", {"task_id": "bad"}, upload_files(edit_config(config, peft_type="LORA"), weights)),
        ("layers", {"task_id": "bad"}, upload_files(edit_config(config, num_layers=3), weights)),
        ("virtual tokens", {"task_id": "bad"}, upload_files(edit_config(config, num_virtual_tokens=7), weights)),
        ("pickle", {"task_id": "bad"}, upload_files(config, pickle_bytes({"prompt_embeddings": [1.0]}))),
        ("empty weights", {"task_id": "bad"}, upload_files(config, b"")),
        ("truncated", {"task_id": "bad"}, upload_files(config, weights[: len(weights) // 2])),
        ("task id", {"task_id": "../escape"}, upload_files(config, weights)),
        ("exists", {"task_id": "sentiment"}, upload_files(config, weights)),
        ("huge config", {"task_id": "bad"}, upload_files(b" " * (64 * 1024 + 1), weights)),
    ]
    for name, data, files in cases:
        response = ray_server.admin.post("/prefixes", data=data, files=files)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
        assert "error" in response.json(), name
    assert sorted(p.name for p in ray_server.store.iterdir()) == before


def test_stream_disconnect_cancels_the_replicas_row(ray_server: RayServer) -> None:
    def cancelled() -> float:
        return sum(ray_server.metric("prefix_serve_replica_cancelled_total").values())

    before = cancelled()
    streamed = ray_server.admin.post("/generate_stream", json=body(REQUESTS[4], 4))
    events = sse_events(streamed.text)
    assert len(events) == 4 and events[-1]["details"]["generated_tokens"] == 4

    with ray_server.admin.stream("POST", "/generate_stream", json=body(REQUESTS[4], 1000)) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data:")
            if seen == 3:
                break  # leave mid-generation
    deadline = time.monotonic() + 30
    while cancelled() <= before:
        assert time.monotonic() < deadline, "the replica's row was not cancelled"
        time.sleep(0.5)
    while sum(ray_server.metric("prefix_serve_replica_running_rows").values()) > 0:
        assert time.monotonic() < deadline, "a row is still running"
        time.sleep(0.5)
