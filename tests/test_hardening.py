"""Auth, limits, prefix memory tiers, metrics and request-id logging, as a client and an operator see them."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors

from service import cli
from service.api.app import create_app, make_registry
from service.api.auth import exposure_problem, is_loopback
from service.api.keys import ApiKeys
from service.logging_setup import JsonFormatter
from service.model_loader import LoadedModel
from service.settings import Settings
from tests.helpers import (
    adapter,
    assert_error,
    prometheus_values,
    read_adapter,
    safetensors_bytes,
    sse_events,
    upload,
)

GENERATE_KEY, ADMIN_KEY = "gen-key-123", "admin-key-456"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def secured(tmp_path: Path, loaded: LoadedModel) -> Iterator[TestClient]:
    settings = Settings(prefix_dir=tmp_path / "store", api_keys=[GENERATE_KEY], admin_api_keys=[ADMIN_KEY])
    with TestClient(create_app(settings, loaded)) as client:
        yield client


def test_keys_are_required_and_scoped(secured: TestClient, loaded: LoadedModel, tmp_path: Path) -> None:
    body = {"task_id": "t", "inputs": "t5 t6", "parameters": {"max_new_tokens": 3}}
    missing = secured.post("/generate", json=body)
    assert_error(missing, 401, "API key")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_error(secured.post("/generate", json=body, headers=bearer("wrong")), 401, "invalid")
    assert_error(secured.post("/generate", json=body, headers={"Authorization": "Basic abc"}), 401)

    adapter_dir = adapter(loaded, tmp_path, "a", v=3, seed=1)[0]
    files = {"adapter_config": ("c.json", (adapter_dir / "adapter_config.json").read_bytes()),
             "adapter_model": ("m.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes())}
    forbidden = secured.post("/prefixes", data={"task_id": "t"}, files=files, headers=bearer(GENERATE_KEY))
    assert_error(forbidden, 403, "admin")
    assert secured.post("/prefixes", data={"task_id": "t"}, files=files, headers=bearer(ADMIN_KEY)).status_code == 201

    assert secured.post("/generate", json=body, headers=bearer(GENERATE_KEY)).status_code == 200
    assert secured.post("/generate", json=body, headers=bearer(ADMIN_KEY)).status_code == 200, "admin implies generate"
    assert secured.get("/prefixes", headers=bearer(GENERATE_KEY)).status_code == 200
    assert_error(secured.get("/prefixes"), 401)
    assert_error(secured.delete("/prefixes/t", headers=bearer(GENERATE_KEY)), 403)
    assert secured.delete("/prefixes/t", headers=bearer(ADMIN_KEY)).status_code == 204
    assert secured.get("/health").status_code == 200
    # /metrics names tasks in its labels: with keys configured it needs one (PREFIX_SERVE_METRICS_REQUIRE_KEY).
    assert_error(secured.get("/metrics"), 401)
    assert secured.get("/metrics", headers=bearer(GENERATE_KEY)).status_code == 200


def test_refuses_to_expose_an_unauthenticated_server() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    assert exposure_problem(Settings(host="127.0.0.1")) is None
    assert "refusing to bind 0.0.0.0" in exposure_problem(Settings(host="0.0.0.0"))
    assert exposure_problem(Settings(host="0.0.0.0", api_keys=["k"])) is None
    assert exposure_problem(Settings(host="0.0.0.0", allow_unauthenticated=True)) is None
    # The CLI stops before loading any model.
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2


@pytest.fixture
def limited(tmp_path: Path, loaded: LoadedModel) -> Iterator[TestClient]:
    settings = Settings(
        prefix_dir=tmp_path / "store", max_prompt_tokens=10, max_stop_sequences=2, max_stop_sequence_chars=5,
        max_prefixes=2, max_json_body_bytes=200_000,
    )
    with TestClient(create_app(settings, loaded)) as client:
        yield client


def test_request_limits_answer_4xx(limited: TestClient, loaded: LoadedModel, tmp_path: Path) -> None:
    adapter_dir = adapter(loaded, tmp_path, "a", v=3, seed=2)[0]
    assert upload(limited, "one", adapter_dir).status_code == 201
    assert upload(limited, "two", adapter_dir).status_code == 201
    assert_error(upload(limited, "three", adapter_dir), 409, "limit")
    assert upload(limited, "two", adapter_dir, replace=True).status_code == 200, "replacing needs no new slot"

    def gen(inputs: str = "t5", **parameters) -> object:
        return limited.post("/generate", json={"task_id": "one", "inputs": inputs, "parameters": parameters})

    assert_error(gen(" ".join(["t5"] * 11)), 422, "11 tokens", "10")
    assert gen(" ".join(["t5"] * 10), max_new_tokens=2).status_code == 200
    assert_error(gen(stop=["a", "b", "c"]), 422, "stop", "2")
    assert_error(gen(stop=["toolong"]), 422, "stop", "5")
    big = limited.post("/generate", content=b"x" * 200_001, headers={"content-type": "application/json"})
    assert_error(big, 413, "200000")


def test_memory_tiers_evict_and_return_transparently(tmp_path: Path, loaded: LoadedModel) -> None:
    """The slot layout: the engine's prefix bank is the device tier (one device copy of a hot prefix, its idle
    entries within the device budget), the registry's LRU the host tier, then disk."""
    one_prefix = 2 * 2 * 2 * 4 * 8 * 4  # L * 2 * H_kv * V * D * float32 bytes for V=4 on the tiny llama
    settings = Settings(prefix_dir=tmp_path / "store", prefix_device_budget_bytes=one_prefix,
                        prefix_host_budget_bytes=one_prefix)
    with TestClient(create_app(settings, loaded)) as client:
        expected = {}
        for i, task in enumerate(["a", "b", "c"]):
            upload(client, task, adapter(loaded, tmp_path, task, v=4, seed=10 + i)[0])
        tiers = {p["task_id"]: p["tier"] for p in client.get("/prefixes").json()["prefixes"]}
        assert tiers == {"c": "host", "b": "disk", "a": "disk"}  # nothing on the device before a request runs
        # Each request brings its prefix to the host tier and into the bank; the bank keeps one idle prefix.
        for task in ["b", "c", "a", "a"]:
            out = client.post("/generate", json={"task_id": task, "inputs": "t7 t8", "parameters": {"max_new_tokens": 5}})
            assert out.status_code == 200
            expected.setdefault(task, out.json()["generated_text"])
            assert out.json()["generated_text"] == expected[task], "an evicted prefix comes back unchanged"
            assert client.get(f"/prefixes/{task}").json()["tier"] == "device"
        tiers = {p["task_id"]: p["tier"] for p in client.get("/prefixes").json()["prefixes"]}
        assert tiers == {"a": "device", "b": "disk", "c": "disk"}
        registry = client.app.state.service.registry
        stats = registry.cache.stats
        assert (stats.hits, stats.misses_from_host, stats.misses_from_disk) == (1, 0, 3)
        assert (stats.evictions_to_host, stats.evictions_to_disk) == (0, 5)  # 2 of them during the uploads
        # a: once in the bank (device), once in host memory; nothing else held.
        assert registry.bytes_by_tier() == {"device": one_prefix, "host": one_prefix}
        metrics = client.get("/metrics").text
        assert 'prefix_serve_prefix_cache_misses_total{source="disk"} 3.0' in metrics
        assert 'prefix_serve_prefix_cache_evictions_total{to="disk"} 5.0' in metrics
        assert 'prefix_serve_prefixes{tier="device"} 1.0' in metrics
        assert 'prefix_serve_prefixes{tier="disk"} 2.0' in metrics
        assert f'prefix_serve_prefix_bytes{{tier="device"}} {float(one_prefix)}' in metrics
        assert f'prefix_serve_prefix_bytes{{tier="host"}} {float(one_prefix)}' in metrics


def test_weights_damaged_on_disk_answer_a_clear_error_naming_the_task(tmp_path: Path, loaded: LoadedModel) -> None:
    store = tmp_path / "store"
    with TestClient(create_app(Settings(prefix_dir=store), loaded)) as client:
        upload(client, "t", adapter(loaded, tmp_path, "t", v=4, seed=3)[0])
    # Restarted: the index is read, the weights are not; then the file is damaged under the server.
    with TestClient(create_app(Settings(prefix_dir=store), loaded)) as client:
        weights = store / "t" / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0x01
        weights.write_bytes(bytes(data))
        body = {"task_id": "t", "inputs": "t7 t8", "parameters": {"max_new_tokens": 2}}
        out = client.post("/generate", json=body)
        assert out.status_code == 503
        assert out.json()["type"] == "stored_task_unreadable" and "'t'" in out.json()["error"]
        assert client.post("/generate", json=body).status_code == 404  # taken out: no error loop on the same file
        assert weights.is_file()


def test_metrics_cover_requests_batches_and_uploads(client_with_task) -> None:
    client = client_with_task
    for _ in range(2):
        client.post("/generate", json={"task_id": "t", "inputs": "t5 t6", "parameters": {"max_new_tokens": 4}})
    client.post("/generate", json={"task_id": "missing", "inputs": "t5"})
    text = client.get("/metrics").text
    assert 'prefix_serve_requests_total{route="/generate",status="200",task="t"} 2.0' in text
    assert 'prefix_serve_requests_total{route="/generate",status="404",task=""} 1.0' in text
    assert 'prefix_serve_uploads_total{result="created"} 1.0' in text
    assert "prefix_serve_generated_tokens_total" in text and 'task="t"' in text
    for name in ("prefix_serve_batch_size_count", "prefix_serve_time_to_first_token_seconds_count",
                 "prefix_serve_queue_duration_seconds_count", "prefix_serve_request_duration_seconds_count",
                 "prefix_serve_queue_size", "prefix_serve_running_rows", "prefix_serve_prefix_cache_hits_total"):
        assert name in text, name


@pytest.fixture
def client_with_task(tmp_path: Path, loaded: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(prefix_dir=tmp_path / "store"), loaded)) as client:
        upload(client, "t", adapter(loaded, tmp_path, "a", v=3, seed=3)[0])
        yield client


def test_request_id_is_returned_and_logged_without_the_prompt(client_with_task, caplog) -> None:
    client = client_with_task
    secret = "t99 t98 t97 t96"
    with caplog.at_level(logging.DEBUG):
        response = client.post("/generate", json={"task_id": "t", "inputs": secret}, headers={"X-Request-ID": "abc-1"})
    assert response.headers["x-request-id"] == "abc-1"
    generated = client.post("/generate", json={"task_id": "t", "inputs": "t5"})
    assert len(generated.headers["x-request-id"]) == 32, "a fresh id when the client sends none"
    weird = client.post("/generate", json={"task_id": "t", "inputs": "t5"}, headers={"X-Request-ID": "a b/c"})
    assert weird.headers["x-request-id"] != "a b/c"
    access = [r for r in caplog.records if r.name == "service.access"]
    assert any(getattr(r, "route", None) == "/generate" and r.status == 200 for r in access)
    formatter = JsonFormatter()
    for record in caplog.records:
        line = formatter.format(record)
        assert secret not in line
        json.loads(line)
    tagged = [json.loads(formatter.format(r)) for r in access]
    assert any(line.get("request_id") == "abc-1" for line in tagged)


# ---------------------------------------------------------------------------------------------------------------------
# Round two of the outside attack (issue 11): metrics, redirects, blank keys, OpenAI errors, duplicate form fields


def _series_for(text: str, task: str) -> list[str]:
    return [line for line in text.splitlines() if f'task="{task}"' in line]


def test_deleted_tasks_leave_no_metric_series_and_per_task_series_are_bounded(
    tmp_path: Path, loaded: LoadedModel
) -> None:
    settings = Settings(prefix_dir=tmp_path / "store", metrics_max_tasks=3)
    adapter_dir = adapter(loaded, tmp_path, "a", v=3, seed=3)[0]
    with TestClient(create_app(settings, loaded)) as client:
        for i in range(5):
            assert upload(client, f"task{i}", adapter_dir).status_code == 201
            body = {"task_id": f"task{i}", "inputs": "t5 t6", "parameters": {"max_new_tokens": 2}}
            assert client.post("/generate", json=body).status_code == 200
        text = client.get("/metrics").text
        assert all(_series_for(text, f"task{i}") for i in range(3))
        assert not _series_for(text, "task3") and not _series_for(text, "task4"), "over the cap: counted as _other"
        assert 'prefix_serve_requests_total{route="/generate",status="200",task="_other"} 2.0' in text
        for i in range(5):
            assert client.delete(f"/prefixes/task{i}").status_code == 204
        after = client.get("/metrics").text
        leaked = [line for i in range(5) for line in _series_for(after, f"task{i}")]
        assert not leaked, leaked[:5]
        # A freed slot goes to the next task.
        assert upload(client, "fresh", adapter_dir).status_code == 201
        assert client.post("/generate", json={"task_id": "fresh", "inputs": "t5"}).status_code == 200
        assert _series_for(client.get("/metrics").text, "fresh")


def test_metrics_can_stay_open_for_a_scraper_without_a_key(tmp_path: Path, loaded: LoadedModel) -> None:
    settings = Settings(prefix_dir=tmp_path / "store", api_keys=[GENERATE_KEY], metrics_require_key=False)
    with TestClient(create_app(settings, loaded)) as client:
        assert client.get("/metrics").status_code == 200
        assert_error(client.get("/prefixes"), 401)


@pytest.mark.parametrize("path", ["/generate/", "/prefixes/", "/v1/models/", "/health/"])
def test_no_redirect_to_a_client_chosen_host(client_with_task: TestClient, path: str) -> None:
    response = client_with_task.get(path, headers={"Host": "evil.example.com"}, follow_redirects=False)
    assert not 300 <= response.status_code < 400, (response.status_code, response.headers.get("location"))
    assert "location" not in response.headers
    assert response.status_code in (404, 405) and response.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("keys", [[" "], [""], ["\t"], [" padded "]])
def test_blank_api_keys_are_refused_at_start(keys: list[str], monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    with pytest.raises(ValueError):
        Settings(api_keys=keys)
    with pytest.raises(ValueError):
        Settings(admin_api_keys=keys)
    with pytest.raises(ValueError):
        ApiKeys(keys, [])
    monkeypatch.setenv("PREFIX_SERVE_API_KEYS", json.dumps(keys))
    # The CLI's logging set-up would bind a handler to this test's captured stderr, closed after it: keep pytest's.
    monkeypatch.setattr(cli, "configure_logging", lambda *args, **kwargs: None)
    with caplog.at_level(logging.ERROR):
        assert cli.main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "PREFIX_SERVE_API_KEYS" in caplog.text and "whitespace" in caplog.text, caplog.text


def test_v1_errors_have_openais_shape_and_tgi_routes_keep_theirs(tmp_path: Path, loaded: LoadedModel) -> None:
    settings = Settings(prefix_dir=tmp_path / "store", api_keys=[GENERATE_KEY], max_json_body_bytes=10_000)
    with TestClient(create_app(settings, loaded)) as client:
        def openai_error(response, status: int) -> dict:
            assert response.status_code == status, response.text
            body = response.json()
            assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
            assert body["error"]["message"], body
            return body["error"]

        auth = bearer(GENERATE_KEY)
        assert openai_error(client.post("/v1/completions", json={"model": "x", "prompt": "t5"}), 401)["type"] == \
            "authentication_error"
        missing = openai_error(client.post("/v1/completions", json={"model": "nope", "prompt": "t5"}, headers=auth), 404)
        assert (missing["code"], missing["param"]) == ("model_not_found", "model") and "nope" in missing["message"]
        invalid = openai_error(client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "t5",
                                                                    "max_tokens": "3"}, headers=auth), 422)
        assert invalid["param"] == "max_tokens" and "integer" in invalid["message"], invalid
        big = client.post("/v1/completions", content=b"x" * 10_001,
                          headers={**auth, "content-type": "application/json"})
        assert openai_error(big, 413)["code"] == "payload_too_large"
        wrong_type = client.post("/v1/completions", content=b"{}", headers={**auth, "content-type": "text/plain"})
        assert openai_error(wrong_type, 415)["param"] == "content-type"
        assert openai_error(client.get("/v1/nothing", headers=auth), 404)["type"] == "not_found_error"
        # The TGI routes keep the project's shape.
        tgi = client.post("/generate", json={"task_id": "nope", "inputs": "t5"}, headers=auth)
        assert_error(tgi, 404, "nope")
        assert tgi.json()["type"] == "task_not_found"


def test_repeated_or_unknown_upload_fields_are_refused(client_with_task: TestClient, loaded: LoadedModel,
                                                       tmp_path: Path) -> None:
    adapter_dir = adapter(loaded, tmp_path, "b", v=3, seed=4)[0]
    config = (adapter_dir / "adapter_config.json").read_bytes()
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    files = [("adapter_config", ("c.json", config)), ("adapter_model", ("m.safetensors", weights))]
    before = client_with_task.get("/prefixes").json()
    two_ids = client_with_task.post("/prefixes", data={"task_id": ["first", "second"]}, files=files)
    assert_error(two_ids, 422, "task_id", "more than once")
    two_models = client_with_task.post(
        "/prefixes", data={"task_id": "dup"}, files=[*files, ("adapter_model", ("m2.safetensors", weights))]
    )
    assert_error(two_models, 422, "adapter_model", "more than once")
    extra = client_with_task.post("/prefixes", data={"task_id": "dup", "note": "x"}, files=files)
    assert_error(extra, 422, "note")
    assert client_with_task.get("/prefixes").json() == before, "a refused upload stored something"
    assert client_with_task.post("/prefixes", data={"task_id": "dup"}, files=files).status_code == 201


def test_upload_with_the_wrong_content_type_or_a_broken_form_says_so(client_with_task: TestClient) -> None:
    as_json = client_with_task.post("/prefixes", json={"task_id": "x"})
    assert_error(as_json, 415, "multipart/form-data", "application/json")
    broken = client_with_task.post(
        "/prefixes", content=b"--nope\r\nnot a part", headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert_error(broken, 422, "multipart/form-data body could not be parsed")


# ---------------------------------------------------------------------------------------------------------------------
# Round three of the outside attack (issue 18): downloads, text-task uploads, prefix values that overflow


def test_downloading_a_task_needs_the_admin_scope(secured: TestClient) -> None:
    """A text task's text (system prompts, customer instructions) and any task's trained weights leave the server
    only with an admin key; a generate key still lists the task, without its text."""
    secret = "t5 t6 t7 t8"
    created = secured.post("/prefixes", data={"task_id": "private", "text": secret}, headers=bearer(ADMIN_KEY))
    assert created.status_code == 201, created.text
    refused = secured.get("/prefixes/private/adapter", headers=bearer(GENERATE_KEY))
    assert_error(refused, 403, "admin")
    assert secret not in refused.text
    assert_error(secured.get("/prefixes/private/adapter"), 401)
    shown = secured.get("/prefixes/private", headers=bearer(GENERATE_KEY))
    assert shown.status_code == 200 and secret not in shown.text
    downloaded = secured.get("/prefixes/private/adapter", headers=bearer(ADMIN_KEY))
    assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "application/zip"


NOT_UTF8 = b"t5 \xff\xfe\x80 t6"  # the first bad byte at offset 3


@pytest.mark.parametrize("sent_as", ["multipart_field", "multipart_file", "urlencoded"])
def test_text_that_is_not_utf8_is_422_naming_the_field_and_byte_offset(client_with_task: TestClient,
                                                                       sent_as: str) -> None:
    """One rule for every text the upload form carries (fields, the text as a file part, adapter_config.json): UTF-8,
    else a 422 naming the field and the first bad byte's offset. It used to be stored as Latin-1 mojibake."""
    client = client_with_task
    before = client.get("/prefixes").json()
    if sent_as == "urlencoded":
        response = client.post("/prefixes", content=b"task_id=bad&text=t5+%FF%FE%80+t6",
                               headers={"content-type": "application/x-www-form-urlencoded"})
    else:
        part = ("text.txt", NOT_UTF8) if sent_as == "multipart_file" else (None, NOT_UTF8)
        response = client.post("/prefixes", data={"task_id": "bad"}, files={"text": part})
    body = assert_error(response, 422, "text", "UTF-8", "byte 3")
    assert body["field"] == "text"
    assert client.get("/prefixes").json() == before
    if sent_as == "multipart_file":  # the control: a UTF-8 text file part is the task's text
        created = client.post("/prefixes", data={"task_id": "from-file"}, files={"text": ("text.txt", b"t5 t6")})
        assert created.status_code == 201 and created.json()["num_virtual_tokens"] == 2, created.text


def test_adapter_config_that_is_not_utf8_names_the_byte_offset(client_with_task: TestClient, loaded: LoadedModel,
                                                               tmp_path: Path) -> None:
    adapter_dir = adapter(loaded, tmp_path, "u", v=3, seed=5)[0]
    config = (adapter_dir / "adapter_config.json").read_bytes()
    bad = b'{"x": "\xff", ' + config[1:]
    body = assert_error(upload(client_with_task, "bad", adapter_dir, config=bad), 422, "adapter_config", "UTF-8",
                        "byte 7")
    assert body["field"] == "adapter_config"


@pytest.mark.parametrize("field_name", ["text", "prompt_template", "description"])
def test_a_nul_character_is_refused_in_every_stored_text(client_with_task: TestClient, field_name: str) -> None:
    """One NUL rule for the text, templates and descriptions: refused, naming the field and the offset."""
    form = {"task_id": "nul", "text": "t5 t6", "prompt_template": "{inputs} t7", "description": "ok"}
    form[field_name] = "t5 \x00" + ("{inputs}" if field_name == "prompt_template" else "")
    body = assert_error(client_with_task.post("/prefixes", data=form), 422, field_name, "NUL", "offset 3")
    assert body["field"] == field_name
    assert "nul" not in [p["task_id"] for p in client_with_task.get("/prefixes").json()["prefixes"]]


@pytest.mark.parametrize("sent_as", ["multipart", "urlencoded"])
def test_a_text_over_the_limit_is_413_naming_the_text_limit(client_with_task: TestClient, sent_as: str) -> None:
    """Over Starlette's 1 MiB part limit a text field used to be 'the multipart body could not be parsed'; the form is
    now read with the text's own bound (max_text_task_tokens x the longest token, in UTF-8 bytes) and stops there."""
    text = b"t5 " * 800_000  # 2.4 MB: over the form's bound for this tokenizer either way (x3 for URL encoding)
    if sent_as == "multipart":
        response = client_with_task.post("/prefixes", data={"task_id": "big"}, files={"text": (None, text)})
    else:
        response = client_with_task.post("/prefixes", content=b"task_id=big&text=" + text.replace(b" ", b"+"),
                                         headers={"content-type": "application/x-www-form-urlencoded"})
    body = assert_error(response, 413, "text", "2048 tokens", "max_text_task_tokens")
    assert body["field"] == "text"


@pytest.mark.parametrize("sent_as", ["multipart", "urlencoded"])
@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_a_blank_text_is_422_saying_so(client_with_task: TestClient, sent_as: str, text: str) -> None:
    """An empty text field used to read as no text at all: '422 adapter_config: missing'."""
    if sent_as == "multipart":
        response = client_with_task.post("/prefixes", data={"task_id": "blank"}, files={"text": (None, text.encode())})
    else:
        response = client_with_task.post("/prefixes", data={"task_id": "blank", "text": text})
    body = assert_error(response, 422, "text", "blank")
    assert body["field"] == "text"


def _overflowing_adapter(loaded: LoadedModel, tmp_path: Path, value: float = 1e30) -> tuple[bytes, bytes]:
    """A PEFT adapter of the tiny model whose every value is `value`: finite in float32, yet the model's computation
    overflows with it (an RMSNorm's variance becomes inf and zeroes the state: every logit equal, token 0 forever)."""
    config, weights = read_adapter(adapter(loaded, tmp_path, "overflowing", v=3, seed=6)[0])
    tensor = load_safetensors(weights)["prompt_embeddings"]
    return config, safetensors_bytes({"prompt_embeddings": torch.full_like(tensor, value)})


def test_a_prefix_the_model_cannot_compute_with_is_refused_at_upload(client_with_task: TestClient,
                                                                     loaded: LoadedModel, tmp_path: Path) -> None:
    config, weights = _overflowing_adapter(loaded, tmp_path)
    files = {"adapter_config": ("adapter_config.json", config), "adapter_model": ("adapter_model.safetensors", weights)}
    refused = client_with_task.post("/prefixes", data={"task_id": "huge"}, files=files)
    body = assert_error(refused, 422, "prompt_embeddings", "probe", "float32")
    assert body["field"] == "prompt_embeddings"
    assert [p["task_id"] for p in client_with_task.get("/prefixes").json()["prefixes"]] == ["t"]


def test_a_stored_prefix_the_model_cannot_compute_with_fails_only_its_own_requests(tmp_path: Path,
                                                                                  loaded: LoadedModel) -> None:
    """A task stored before uploads were probed: its requests get a 422 `non_finite_logits` (also as a stream's last
    event), counted in /metrics, never tokens; requests of another task at the same time are untouched."""
    settings = Settings(prefix_dir=tmp_path / "store")
    older = make_registry(settings, loaded, None, shared=False)  # no probe: what an older server stored
    older.put("huge", *_overflowing_adapter(loaded, tmp_path))
    body = {"task_id": "huge", "inputs": "t5 t6", "parameters": {"max_new_tokens": 4}}
    with TestClient(create_app(settings, loaded)) as client:
        upload(client, "t", adapter(loaded, tmp_path, "a", v=3, seed=3)[0])
        good = {"task_id": "t", "inputs": "t5 t6", "parameters": {"max_new_tokens": 4}}
        expected = client.post("/generate", json=good).json()["generated_text"]
        with ThreadPoolExecutor(4) as pool:  # the failing and the good requests share the engine's batches
            answers = list(pool.map(lambda b: client.post("/generate", json=b), [body, good, body, good]))
        for failed in answers[0::2]:
            assert_error(failed, 422, "NaN", "huge")
            assert failed.json()["type"] == "non_finite_logits"
        assert [a.json()["generated_text"] for a in answers[1::2]] == [expected, expected]
        events = sse_events(client.post("/generate_stream", json=body).text)
        assert events[-1]["type"] == "non_finite_logits" and all("token" not in e for e in events), events
        counted = prometheus_values(client.get("/metrics").text, "prefix_serve_generation_errors_total")
        assert counted == {frozenset({("kind", "non_finite_logits")}): 3.0}, counted
