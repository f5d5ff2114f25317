"""Every task is a TGI endpoint at /tasks/{task_id}: Hugging Face's own `InferenceClient(model=URL).text_generation`
and LangChain's `HuggingFaceEndpoint(endpoint_url=URL)` against a live server (tiny random model, real PEFT prefix).

The reference text is PEFT's own greedy forward; every per-task answer must also equal /generate's for the task."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError

from service.api.app import create_app
from service.model_loader import LoadedModel
from service.settings import Settings
from tests.helpers import (
    TINY_MAX_POSITIONS,
    ThreadedServer,
    expected_text,
    make_peft_prefix_model,
    save_adapter,
    sse_events,
    upload_over_http,
)

TASK = "tgi-task"
TEMPLATED = "tgi-templated"
TEMPLATE = "t3 t4 {inputs} t9"
V = 5
PROMPT = "t5 t6 t7 t8"
NEW_TOKENS = 6
API_KEY = "tgi-test-key"


@pytest.fixture(scope="module")
def live(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """(base URL, the PEFT model of TASK) of a live server holding TASK and TEMPLATED (no API keys)."""
    tmp = tmp_path_factory.mktemp("tgi")
    app = create_app(Settings(prefix_dir=tmp / "store", max_running_rows=8, max_prefix_bytes=1 << 20), loaded)
    peft_model = make_peft_prefix_model(loaded.model, num_virtual_tokens=V, seed=31)
    with ThreadedServer(app) as server:
        adapter_dir = save_adapter(peft_model, tmp / "adapter")
        assert upload_over_http(server.url, TASK, adapter_dir).status_code == 201
        templated = upload_over_http(server.url, TEMPLATED, adapter_dir, prompt_template=TEMPLATE)
        assert templated.status_code == 201, templated.text
        yield server.url, peft_model


@pytest.fixture(scope="module")
def client(live: tuple[str, Any]) -> InferenceClient:
    return InferenceClient(model=f"{live[0]}/tasks/{TASK}", timeout=60)


def generate(url: str, task_id: str, inputs: str, **parameters: Any) -> dict[str, Any]:
    """The answer of plain /generate, which every per-task route must equal."""
    body = {"task_id": task_id, "inputs": inputs, "parameters": parameters}
    response = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def http_error(raised: pytest.ExceptionInfo[HfHubHTTPError], status: int, *needles: str) -> dict[str, Any]:
    """The client raised for `status`; the body is the project's error shape and names each needle."""
    response = raised.value.response
    assert response is not None and response.status_code == status, raised.value
    body = response.json()
    assert isinstance(body["error"], str) and body["type"], body
    for needle in needles:
        assert needle in body["error"], (needle, body)
    return body


# ------------------------------------------------------------------------------------------------ InferenceClient


def test_blocking_text_generation_is_the_tasks_greedy_output(client, live, loaded: LoadedModel) -> None:
    text = client.text_generation(PROMPT, max_new_tokens=NEW_TOKENS)
    assert text == expected_text(loaded, live[1], PROMPT, NEW_TOKENS)
    assert text == generate(live[0], TASK, PROMPT, max_new_tokens=NEW_TOKENS)["generated_text"]


def test_details_parse_into_tgi_output(client, live) -> None:
    out = client.text_generation(PROMPT, max_new_tokens=NEW_TOKENS, details=True)
    details = out.details
    assert details.finish_reason == "length"
    assert details.generated_tokens == NEW_TOKENS
    assert details.seed is None
    assert details.prefill == []
    assert len(details.tokens) == NEW_TOKENS
    assert "".join(token.text for token in details.tokens) == out.generated_text
    assert all(not token.special and token.logprob is None for token in details.tokens)
    plain = generate(live[0], TASK, PROMPT, max_new_tokens=NEW_TOKENS)
    assert out.generated_text == plain["generated_text"]
    assert "tokens" not in plain["details"], "per-token details only when asked"


def test_stream_joins_to_the_blocking_text(client) -> None:
    blocking = client.text_generation(PROMPT, max_new_tokens=NEW_TOKENS)
    pieces = list(client.text_generation(PROMPT, max_new_tokens=NEW_TOKENS, stream=True))
    assert len(pieces) == NEW_TOKENS
    assert "".join(pieces) == blocking
    events = list(client.text_generation(PROMPT, max_new_tokens=NEW_TOKENS, stream=True, details=True))
    assert events[-1].generated_text == blocking
    assert events[-1].details.finish_reason == "length"
    assert events[-1].details.generated_tokens == NEW_TOKENS
    assert all(event.details is None for event in events[:-1])


def test_stop_sequence_ends_the_text(client) -> None:
    words = client.text_generation(PROMPT, max_new_tokens=NEW_TOKENS).split()
    stop = words[2]
    cut = words[: words.index(stop) + 1]
    out = client.text_generation(PROMPT, max_new_tokens=NEW_TOKENS, stop=[stop], details=True)
    assert out.generated_text.split() == cut
    assert out.details.finish_reason == "stop_sequence"
    assert "".join(client.text_generation(PROMPT, max_new_tokens=NEW_TOKENS, stop=[stop], stream=True)).split() == cut


def test_seeded_sample_is_reproducible(client, live) -> None:
    def sample(seed: int) -> Any:
        return client.text_generation(
            PROMPT, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=seed, details=True
        )

    first, again, other = sample(1234), sample(1234), sample(99)
    assert first.generated_text == again.generated_text
    assert first.details.seed == 1234
    assert first.generated_text != other.generated_text
    same_on_generate = generate(
        live[0], TASK, PROMPT, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=1234
    )
    assert same_on_generate["generated_text"] == first.generated_text


def test_return_full_text_prepends_the_inputs(client) -> None:
    new_text = client.text_generation(PROMPT, max_new_tokens=NEW_TOKENS)
    assert client.text_generation(PROMPT, max_new_tokens=NEW_TOKENS, return_full_text=True) == PROMPT + new_text
    assert client.text_generation(PROMPT, max_new_tokens=NEW_TOKENS, return_full_text=False) == new_text


def test_unknown_task_is_404(live) -> None:
    with pytest.raises(HfHubHTTPError) as raised:
        InferenceClient(model=f"{live[0]}/tasks/no-such-task").text_generation(PROMPT)
    assert http_error(raised, 404, "no-such-task")["task_id"] == "no-such-task"
    with pytest.raises(HfHubHTTPError) as raised:
        list(InferenceClient(model=f"{live[0]}/tasks/no-such-task").text_generation(PROMPT, stream=True))
    http_error(raised, 404, "no-such-task")
    # A malformed id is a 422 naming the pattern, as on /generate.
    with pytest.raises(HfHubHTTPError) as raised:
        InferenceClient(model=f"{live[0]}/tasks/bad%20id").text_generation(PROMPT)
    http_error(raised, 422, "A-Za-z0-9")


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"watermark": True}, "watermark"),
        ({"typical_p": 0.95}, "typical_p"),
        ({"best_of": 2}, "best_of"),
        ({"top_n_tokens": 3}, "top_n_tokens"),
        ({"grammar": {"type": "json", "value": {"type": "object"}}}, "grammar"),
        ({"decoder_input_details": True, "details": True}, "decoder_input_details"),
        ({"truncate": 10}, "truncate"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"adapter_id": "another-task"}, "adapter_id"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_unsupported_or_bad_parameter_is_422_naming_it(client, parameters: dict[str, Any], named: str) -> None:
    with pytest.raises(HfHubHTTPError) as raised:
        client.text_generation(PROMPT, **parameters)
    body = http_error(raised, 422, named)
    assert named in str(body.get("field")), body


def test_neutral_values_of_unsupported_parameters_are_accepted(client) -> None:
    expected = client.text_generation(PROMPT, max_new_tokens=NEW_TOKENS)
    neutral = client.text_generation(
        PROMPT, max_new_tokens=NEW_TOKENS, watermark=False, typical_p=1.0, best_of=1, top_n_tokens=0,
        frequency_penalty=0.0, adapter_id=TASK, decoder_input_details=False,
    )  # fmt: skip
    assert neutral == expected


def test_api_key_is_the_clients_token(
    loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    # No implicit token from this machine's environment or login: "no token" must really send none.
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    settings = Settings(prefix_dir=tmp_path / "store", api_keys=[API_KEY], admin_api_keys=["admin-key"])
    peft_model = make_peft_prefix_model(loaded.model, num_virtual_tokens=V, seed=32)
    with ThreadedServer(create_app(settings, loaded)) as server:
        admin = {"Authorization": "Bearer admin-key"}
        uploaded = upload_over_http(server.url, TASK, save_adapter(peft_model, tmp_path / "a"), headers=admin)
        assert uploaded.status_code == 201, uploaded.text
        url = f"{server.url}/tasks/{TASK}"
        assert InferenceClient(model=url, token=API_KEY).text_generation(PROMPT, max_new_tokens=NEW_TOKENS) == (
            expected_text(loaded, peft_model, PROMPT, NEW_TOKENS)
        )
        assert "".join(InferenceClient(model=url, token=API_KEY).text_generation(PROMPT, stream=True))
        for token in (None, "wrong-key"):
            with pytest.raises(HfHubHTTPError) as raised:
                InferenceClient(model=url, token=token).text_generation(PROMPT)
            http_error(raised, 401)
        assert not InferenceClient(model=url, provider="hf-inference").health_check()
        assert InferenceClient(model=url, token=API_KEY, provider="hf-inference").health_check()


def test_endpoint_info_and_health(live) -> None:
    # huggingface_hub 2.x reads /info and /health only with the provider named.
    endpoint = InferenceClient(model=f"{live[0]}/tasks/{TASK}", provider="hf-inference")
    info = endpoint.get_endpoint_info()
    assert info["model_id"] == "tiny-llama" and info["task_id"] == TASK
    assert info["num_virtual_tokens"] == V
    assert info["max_total_tokens"] == TINY_MAX_POSITIONS - V
    assert info["max_best_of"] == 1 and info["model_pipeline_tag"] == "text-generation"
    assert endpoint.health_check()
    assert not InferenceClient(model=f"{live[0]}/tasks/no-such-task", provider="hf-inference").health_check()
    with pytest.raises(HfHubHTTPError) as raised:
        InferenceClient(model=f"{live[0]}/tasks/no-such-task", provider="hf-inference").get_endpoint_info()
    assert raised.value.response.status_code == 404


def test_trailing_slash_url_works(client, live) -> None:
    slashed = InferenceClient(model=f"{live[0]}/tasks/{TASK}/")
    assert slashed.text_generation(PROMPT, max_new_tokens=NEW_TOKENS) == client.text_generation(
        PROMPT, max_new_tokens=NEW_TOKENS
    )


def test_task_template_is_filled_as_on_generate(live) -> None:
    templated = InferenceClient(model=f"{live[0]}/tasks/{TEMPLATED}")
    text = templated.text_generation(PROMPT, max_new_tokens=NEW_TOKENS)
    assert text == generate(live[0], TEMPLATED, PROMPT, max_new_tokens=NEW_TOKENS)["generated_text"]
    assert text != generate(live[0], TASK, PROMPT, max_new_tokens=NEW_TOKENS)["generated_text"]
    raw = httpx.post(
        f"{live[0]}/tasks/{TEMPLATED}",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": NEW_TOKENS}, "raw_prompt": True},
        timeout=60,
    )
    assert raw.json()["generated_text"] == generate(live[0], TASK, PROMPT, max_new_tokens=NEW_TOKENS)["generated_text"]


# ------------------------------------------------------------------------------------------------ the routes by hand


def test_generate_and_generate_stream_under_the_task(live) -> None:
    url = live[0]
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": NEW_TOKENS}}
    plain = generate(url, TASK, PROMPT, max_new_tokens=NEW_TOKENS)
    under_task = httpx.post(f"{url}/tasks/{TASK}/generate", json=body, timeout=60)
    assert under_task.status_code == 200 and under_task.json() == plain
    root = httpx.post(f"{url}/tasks/{TASK}", json={**body, "stream": False}, timeout=60)
    assert root.json() == plain
    for path, extra in ((f"/tasks/{TASK}/generate_stream", {}), (f"/tasks/{TASK}", {"stream": True})):
        streamed = httpx.post(f"{url}{path}", json={**body, **extra}, timeout=60)
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
        events = sse_events(streamed.text)
        assert events[-1]["generated_text"] == plain["generated_text"]
        assert events[-1]["details"] == plain["details"]
    # The body of /generate is not the per-task body: task_id belongs in the URL here.
    wrong = httpx.post(f"{url}/tasks/{TASK}/generate", json={**body, "task_id": TASK}, timeout=60)
    assert wrong.status_code == 422 and "task_id" in wrong.json()["error"]
    missing = httpx.post(f"{url}/tasks/no-such-task/generate_stream", json=body, timeout=60)
    assert missing.status_code == 404 and "no-such-task" in missing.json()["error"]


# ------------------------------------------------------------------------------------------------ LangChain


def test_langchain_huggingface_endpoint(live, monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_huggingface import HuggingFaceEndpoint

    monkeypatch.delenv("HF_TOKEN", raising=False)
    url = f"{live[0]}/tasks/{TASK}"
    expected = generate(live[0], TASK, PROMPT, max_new_tokens=NEW_TOKENS)["generated_text"]
    # LangChain's defaults sample with typical_p=0.95, which this server refuses (422): greedy here, typical_p off.
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False, temperature=None, top_p=None, typical_p=None)
    assert HuggingFaceEndpoint(endpoint_url=url, **greedy).invoke(PROMPT) == expected
    streamed = HuggingFaceEndpoint(endpoint_url=url, streaming=True, **greedy)
    assert "".join(streamed.stream(PROMPT)) == expected
    with pytest.raises(HfHubHTTPError) as raised:
        HuggingFaceEndpoint(endpoint_url=url, max_new_tokens=NEW_TOKENS).invoke(PROMPT)
    http_error(raised, 422, "typical_p")
