"""The scale-out ingress without Ray: today's app over a RemoteEngine whose "replica" is an in-process ReplicaCore
(the replica's real code, minus Serve). Every route must answer exactly as the single-process server does."""

from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator, Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app, make_registry
from service.api.state import ServiceState
from service.engine import EngineLimits, TokenEvent
from service.metrics import Metrics
from service.model_loader import LoadedModel, wrap_model
from service.prefix import TaskPrefix
from service.requests import SamplingParams
from service.scaleout import ingress as ingress_module
from service.scaleout.ingress import DeploymentView, health_router, ingress_state, install_deployment_metrics
from service.scaleout.protocol import RemoteRequest, StreamStart, replica_unavailable
from service.scaleout.remote_engine import RemoteEngine
from service.scaleout.replica import ReplicaCore
from service.settings import Settings
from tests.helpers import (
    TINY_MAX_POSITIONS, collect_async, make_peft_prefix_adapter, prometheus_values, read_adapter, sse_events, tiny_llama,
    tiny_tokenizer,
)

TASKS = {"alpha": (4, 1), "beta": (6, 2)}  # task -> (V, seed)
PROMPTS = ["t5 t6 t7", "t9 t10 t11 t12 t13"]


class InProcessReplica:
    """The OpenCall of the Ray app, with ReplicaCore called directly and a dict as the multiplexed LRU."""

    def __init__(self, core: ReplicaCore) -> None:
        self.core = core
        self.loaded: dict[str, TaskPrefix] = {}
        self.calls: list[tuple[RemoteRequest, str | None]] = []

    async def cached(self, model_id: str) -> TaskPrefix:
        if model_id not in self.loaded:
            self.loaded[model_id] = await asyncio.to_thread(self.core.load_prefix, model_id)
        return self.loaded[model_id]

    def __call__(self, request: RemoteRequest, model_id: str | None, stream: bool) -> AsyncIterator[object]:
        self.calls.append((request, model_id))
        return self._items(request, stream)

    async def _items(self, request: RemoteRequest, stream: bool) -> AsyncIterator[object]:
        items = self.core.stream(request, self.cached)
        try:
            async for item in items:
                if stream or not isinstance(item, TokenEvent):
                    yield item
        finally:
            await items.aclose()


def upload(client: TestClient, task_id: str, files: tuple[bytes, bytes], replace: bool = False) -> Any:
    return client.post("/prefixes", data={"task_id": task_id, "replace": str(replace).lower()}, files={
        "adapter_config": ("adapter_config.json", files[0], "application/json"),
        "adapter_model": ("adapter_model.safetensors", files[1], "application/octet-stream"),
    })


@pytest.fixture(scope="module")
def adapters(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, bytes]]:
    return {
        task: read_adapter(make_peft_prefix_adapter(loaded.model, tmp_path_factory.mktemp(task), v, seed))
        for task, (v, seed) in TASKS.items()
    }


@pytest.fixture(scope="module")
def single(loaded: LoadedModel, adapters: dict[str, tuple[bytes, bytes]], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(prefix_dir=tmp_path_factory.mktemp("single")), loaded=loaded)) as client:
        for task, files in adapters.items():
            assert upload(client, task, files).status_code == 201
        yield client


@pytest.fixture(scope="module")
def scaled(loaded: LoadedModel, adapters: dict[str, tuple[bytes, bytes]], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[TestClient, InProcessReplica]]:
    settings = Settings(prefix_dir=tmp_path_factory.mktemp("shared"))
    core = ReplicaCore(settings, "replica-0", loaded=loaded)
    replica = InProcessReplica(core)
    view = DeploymentView(stale_after_s=3600)

    async def build(settings: Settings, metrics: Metrics) -> ServiceState:
        routed = install_deployment_metrics(metrics, view)
        engine = RemoteEngine(
            replica, limits=EngineLimits.from_settings(settings),
            on_routed=lambda replica, task: routed.inc(replica, task or "base"),
        )
        registry = make_registry(settings, loaded, metrics, shared=True, device=torch.device("cpu"))
        registry.load_all()
        return ingress_state(settings, loaded, registry, engine, metrics)  # the single input path, as in Ray

    try:
        with TestClient(create_app(settings, build=build, health_router=health_router(view))) as client:
            for task, files in adapters.items():
                assert upload(client, task, files).status_code == 201
            view.update({"replica-0": core.snapshot()})
            yield client, replica
    finally:
        core.stop()


def both(single: TestClient, scaled: TestClient, method: str, path: str, **kwargs: Any) -> tuple[Any, Any]:
    one, other = single.request(method, path, **kwargs), scaled.request(method, path, **kwargs)
    assert one.status_code == other.status_code, (path, one.text, other.text)
    return one, other


def test_generation_routes_answer_as_the_single_process_server(
    single: TestClient, scaled: tuple[TestClient, InProcessReplica]
) -> None:
    client, replica = scaled
    for task in TASKS:
        for prompt in PROMPTS:
            body = {"task_id": task, "inputs": prompt, "parameters": {"max_new_tokens": 6}}
            one, other = both(single, client, "POST", "/generate", json=body)
            assert one.json() == other.json()
            one, other = both(single, client, "POST", "/generate_stream", json=body)
            assert sse_events(one.text) == sse_events(other.text)
            completion = {"model": task, "prompt": prompt, "max_tokens": 5, "temperature": 0}
            one, other = both(single, client, "POST", "/v1/completions", json=completion)
            assert one.json()["choices"] == other.json()["choices"]
    sent, model_id = replica.calls[-1]
    assert sent.kv is None and model_id == f"{sent.task_id}@{sent.sha256}"  # a version, not a tensor


@pytest.mark.parametrize("body", [
    {"task_id": "missing", "inputs": "t5"},
    {"task_id": "alpha", "inputs": "t5 " * 200},
    {"task_id": "alpha", "inputs": "t5", "parameters": {"max_new_tokens": 5000}},
    {"task_id": "alpha", "inputs": "t5", "parameters": {"top_p": 2}},
])
def test_errors_are_the_same(single: TestClient, scaled: tuple[TestClient, InProcessReplica], body: dict) -> None:
    one, other = both(single, scaled[0], "POST", "/generate", json=body)
    assert 400 <= one.status_code < 500 and one.json() == other.json()


def test_replace_reaches_the_replica_by_version_and_delete_is_404(
    scaled: tuple[TestClient, InProcessReplica], adapters: dict[str, tuple[bytes, bytes]]
) -> None:
    client, replica = scaled
    body = {"task_id": "gamma", "inputs": PROMPTS[0], "parameters": {"max_new_tokens": 6}}
    assert upload(client, "gamma", adapters["alpha"]).status_code == 201
    as_alpha = client.post("/generate", json=body).json()
    assert upload(client, "gamma", adapters["beta"], replace=True).status_code == 200
    as_beta = client.post("/generate", json=body).json()
    expected = client.post("/generate", json={**body, "task_id": "beta"}).json()
    assert as_beta == expected and as_beta != as_alpha
    assert len([m for m in replica.loaded if m.startswith("gamma@")]) == 2  # each version loaded once
    assert client.delete("/prefixes/gamma").status_code == 204
    assert client.post("/generate", json=body).status_code == 404


def test_deployment_health_and_metrics(scaled: tuple[TestClient, InProcessReplica]) -> None:
    client, _ = scaled
    health = client.get("/health").json()
    assert health["replicas"] == 1 and health["replica_details"][0]["replica"] == "replica-0"
    metrics = client.get("/metrics").text
    assert prometheus_values(metrics, "prefix_serve_replicas") == {frozenset(): 1.0}
    routed = prometheus_values(metrics, "prefix_serve_routed_requests_total")
    assert sum(routed.values()) > 0 and all(dict(labels)["replica"] == "replica-0" for labels in routed)


def test_a_templated_task_answers_through_the_ingress_as_the_single_process_server(
    single: TestClient, scaled: tuple[TestClient, InProcessReplica], adapters: dict[str, tuple[bytes, bytes]]
) -> None:
    """Templates (issue 12) are filled by the ingress's InputProcessor, the one input path, with the template of the
    version the replica then runs."""
    client, _ = scaled
    for server in (single, client):
        form = {"task_id": "templated", "prompt_template": "t60 {inputs} t61"}
        response = server.post("/prefixes", data=form, files={
            "adapter_config": ("adapter_config.json", adapters["alpha"][0], "application/json"),
            "adapter_model": ("adapter_model.safetensors", adapters["alpha"][1], "application/octet-stream"),
        })
        assert response.status_code == 201, response.text
    body = {"task_id": "templated", "inputs": PROMPTS[0], "parameters": {"max_new_tokens": 6}}
    one, other = both(single, client, "POST", "/generate", json=body)
    assert one.json() == other.json() and one.json()["details"]["prompt_tokens"] > 3
    raw = client.post("/generate", json={**body, "inputs": f"t60 {PROMPTS[0]} t61", "raw_prompt": True})
    assert raw.json()["generated_text"] == other.json()["generated_text"]
    chat = {"model": "templated", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 6,
            "temperature": 0}
    one, other = both(single, client, "POST", "/v1/chat/completions", json=chat)
    assert one.json()["choices"] == other.json()["choices"]
    assert client.get("/v1/models/templated").json()["prompt_template"] == "t60 {inputs} t61"
    for server in (single, client):
        assert server.delete("/prefixes/templated").status_code == 204


def test_a_text_task_on_the_ingress_without_weights_is_a_clear_501(loaded: LoadedModel, tmp_path: Any) -> None:
    """The Ray ingress holds a meta-device skeleton: it cannot run a text through the model, and says so (instead of
    storing a garbage prefix or answering 500)."""
    from transformers import AutoModelForCausalLM

    from service.model_loader import wrap_model

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(loaded.model.config)
    ingress_loaded = wrap_model(skeleton, loaded.tokenizer, loaded.name)
    ingress_loaded.dtype = loaded.dtype
    settings = Settings(prefix_dir=tmp_path / "store")

    async def build(settings: Settings, metrics: Metrics) -> ServiceState:
        registry = make_registry(settings, ingress_loaded, metrics, shared=True, device=torch.device("cpu"))
        registry.load_all()
        engine = RemoteEngine(lambda *a: None, limits=EngineLimits.from_settings(settings))  # type: ignore[arg-type, return-value]
        return ingress_state(settings, ingress_loaded, registry, engine, metrics)

    with TestClient(create_app(settings, build=build, health_router=health_router(DeploymentView(60)))) as client:
        response = client.post("/prefixes", data={"task_id": "from-text", "text": "t5 t6 t7"})
        assert response.status_code == 501 and "single-process server" in response.json()["error"], response.text
        assert client.get("/prefixes").json()["prefixes"] == []


# -- issue 18: 503s a retry can cure say when; series of replicas that are gone leave /metrics ----------------------


def dead_replica_call(request: RemoteRequest, model_id: str | None, stream: bool) -> AsyncIterator[object]:
    """The OpenCall's answer when the replica died under the request (what `handle_call` yields for Ray's error)."""

    async def items() -> AsyncIterator[object]:
        status, body = replica_unavailable(RuntimeError("the actor died"))
        yield StreamStart(status, replica="", body=body)

    return items()


def test_a_replica_failure_is_a_503_with_retry_after(
    loaded: LoadedModel, adapters: dict[str, tuple[bytes, bytes]], tmp_path: Any
) -> None:
    settings = Settings(prefix_dir=tmp_path / "store")

    async def build(settings: Settings, metrics: Metrics) -> ServiceState:
        registry = make_registry(settings, loaded, metrics, shared=True, device=torch.device("cpu"))
        registry.load_all()
        engine = RemoteEngine(dead_replica_call, limits=EngineLimits.from_settings(settings))
        return ingress_state(settings, loaded, registry, engine, metrics)

    with TestClient(create_app(settings, build=build, health_router=health_router(DeploymentView(60)))) as client:
        assert upload(client, "alpha", adapters["alpha"]).status_code == 201
        for path, body in [
            ("/generate", {"task_id": "alpha", "inputs": PROMPTS[0]}),
            ("/v1/completions", {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 4}),
        ]:
            response = client.post(path, json=body)
            assert response.status_code == 503 and response.headers["retry-after"] == "1", (path, response.text)
            assert "replica_unavailable" in response.text, path
        # A stream's status line is sent before the replica answers: the error event says when to retry.
        stream = client.post("/generate_stream", json={"task_id": "alpha", "inputs": PROMPTS[0]})
        event = json.loads(stream.text.strip().removeprefix("data:"))
        assert event["type"] == "replica_unavailable" and event["retry_after_s"] == 1


def test_health_without_live_replicas_is_a_503_with_retry_after(loaded: LoadedModel, tmp_path: Any) -> None:
    settings = Settings(prefix_dir=tmp_path / "store")

    async def build(settings: Settings, metrics: Metrics) -> ServiceState:
        registry = make_registry(settings, loaded, metrics, shared=True, device=torch.device("cpu"))
        engine = RemoteEngine(dead_replica_call, limits=EngineLimits.from_settings(settings))
        return ingress_state(settings, loaded, registry, engine, metrics)

    view = DeploymentView(stale_after_s=12.5, poll_interval_s=2.5)  # replicas report every 2.5 s
    with TestClient(create_app(settings, build=build, health_router=health_router(view))) as client:
        response = client.get("/health")
        assert response.status_code == 503 and response.headers["retry-after"] == "3", response.text
        assert response.json()["type"] == "unavailable"


def test_ray_handle_failures_become_a_503_with_retry_after() -> None:
    """`handle_call` turns what Ray raises when a replica dies (before or during a stream) into that status."""
    pytest.importorskip("ray.serve", reason="needs the ray extra: pip install -e '.[ray]'")
    from service.scaleout.app import handle_call

    class DeadResponse:
        """A DeploymentResponse (awaited) or DeploymentResponseGenerator (iterated) of a replica that died."""

        async def _fail(self) -> Any:
            raise RuntimeError("ActorDiedError")

        def __await__(self) -> Any:
            return self._fail().__await__()

        def __aiter__(self) -> "DeadResponse":
            return self

        async def __anext__(self) -> Any:
            return await self._fail()

        def cancel(self) -> None:
            pass

    method = SimpleNamespace(remote=lambda request: DeadResponse())
    handle: Any = SimpleNamespace(options=lambda **options: SimpleNamespace(generate=method, stream=method))
    request = RemoteRequest(prompt_ids=[5, 6], task_id=None, sha256=None, params=SamplingParams())

    async def first(stream: bool) -> Any:
        return await anext(handle_call(handle)(request, None, stream))

    for stream in (False, True):
        start = asyncio.run(first(stream))
        assert isinstance(start, StreamStart) and start.status == 503, stream
        assert start.body == {**start.body, "type": "replica_unavailable", "retry_after_s": 1}, stream


def test_routed_series_of_replicas_that_are_gone_leave_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica Ray replaced stops reporting and accepting: once it is stale (as for /health), its
    `prefix_serve_routed_requests_total` series go. A new replica's series stay before its first report is polled."""
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(ingress_module, "time", SimpleNamespace(monotonic=lambda: clock.now))
    metrics = Metrics()
    view = DeploymentView(stale_after_s=8.0)
    routed = install_deployment_metrics(metrics, view)

    def series() -> dict[tuple[str, str], float]:
        values = prometheus_values(metrics.render().decode(), "prefix_serve_routed_requests_total")
        return {(dict(labels)["replica"], dict(labels)["task"]): value for labels, value in values.items()}

    view.update({"r0": {"replica": "r0", "age_s": 0.0}, "r1": {"replica": "r1", "age_s": 0.0}})
    for replica, task in [("r0", "alpha"), ("r1", "alpha"), ("r1", "beta"), ("r1", "beta")]:
        routed.inc(replica, task)
    assert series() == {("r0", "alpha"): 1.0, ("r1", "alpha"): 1.0, ("r1", "beta"): 2.0}

    clock.now += 5.0  # r1 was killed at 1000; its replacement r2 accepts before any report of it is polled
    routed.inc("r2", "alpha")
    view.update({"r0": {"replica": "r0", "age_s": 0.0}, "r1": {"replica": "r1", "age_s": 5.0}})
    assert set(series()) == {("r0", "alpha"), ("r1", "alpha"), ("r1", "beta"), ("r2", "alpha")}  # r1 not stale yet

    clock.now += 5.0  # r1's last report is 10 s old (> 8): gone from /health, and now from the routed series
    view.update({"r0": {"replica": "r0", "age_s": 0.0}, "r1": {"replica": "r1", "age_s": 10.0}})
    assert series() == {("r0", "alpha"): 1.0, ("r2", "alpha"): 1.0}
    assert prometheus_values(metrics.render().decode(), "prefix_serve_replicas") == {frozenset(): 1.0}


def test_a_replica_keeps_one_device_copy_of_a_prefix_in_its_bank_and_host_copies_in_its_lru(
    adapters: dict[str, tuple[bytes, bytes]], tmp_path: Path
) -> None:
    """Serve's LRU must not hold a second served-dtype copy of what the engine's prefix bank already holds: in the
    slot layout a replica loads host copies (the file's float32 values) and the bank converts as it copies in."""
    model = tiny_llama(seed=0, initializer_range=0.5, max_position_embeddings=TINY_MAX_POSITIONS).to(torch.bfloat16)
    served = wrap_model(model, tiny_tokenizer(128), "tiny-llama-bf16")
    settings = Settings(prefix_dir=tmp_path)
    store = make_registry(settings, served, None, shared=True)
    store.load_all()
    versions = {task: store.put(task, *files)[0].sha256 for task, files in adapters.items()}
    core = ReplicaCore(settings, "replica-0", loaded=served)
    replica = InProcessReplica(core)
    try:
        for task, sha256 in versions.items():
            request = RemoteRequest(
                request_id=f"r-{task}", prompt_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=3),
                task_id=task, sha256=sha256,
            )
            items = asyncio.run(collect_async(replica(request, f"{task}@{sha256}", stream=False)))
            assert isinstance(items[0], StreamStart) and items[0].status == 200, items
        assert core.layout == "slots"
        lru = list(replica.loaded.values())
        assert len(lru) == 2 and all(p.kv.dtype == torch.float32 for p in lru)  # host form, not the served bf16
        held = core.snapshot()["prefix_bytes"]
        assert held["host"] == sum(p.nbytes for p in lru)
        assert held["device"] == held["host"] // 2  # the bank's bf16 copy of each, once
        del lru
        replica.loaded.clear()  # Serve's LRU evicted them: the host copies are gone, the bank keeps its own
        gc.collect()
        assert core.snapshot()["prefix_bytes"] == {"device": held["device"], "host": 0}
    finally:
        core.stop()
