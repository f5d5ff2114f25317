"""Ten thousand tasks, the API side (issue 19): listing pages (GET /prefixes, GET /v1/models), bulk import
(POST /prefixes/bulk), export (GET /prefixes/export), against the ASGI app with a tiny random model."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.model_loader import LoadedModel
from service.settings import Settings
from tests.helpers import (
    ThreadedServer, adapter, assert_error, edit_config, read_adapter, store_snapshot, tar_bytes, tar_members, upload,
)

TAR = {"Content-Type": "application/x-tar"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(prefix_dir=tmp_path / "store", max_running_rows=8, max_prefix_bytes=1 << 20, max_bulk_tasks=20)


@pytest.fixture
def client(settings: Settings, loaded: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_app(settings, loaded)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def files(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of one small PEFT prefix for the tiny model."""
    directory, _ = adapter(loaded, tmp_path_factory.mktemp("adapter"), "a", v=3, seed=1)
    return read_adapter(directory)


def task_tar(files: tuple[bytes, bytes], task_ids: list[str], **extra: bytes) -> bytes:
    members = {}
    for task_id in task_ids:
        members[f"{task_id}/adapter_config.json"] = files[0]
        members[f"{task_id}/adapter_model.safetensors"] = files[1]
    members.update(extra)
    return tar_bytes(members)


def bulk(client: TestClient, body: bytes, **params: str):
    return client.post("/prefixes/bulk", content=body, headers=TAR, params=params)


def listed_ids(client: TestClient, **params: object) -> tuple[list[str], str | None]:
    response = client.get("/prefixes", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    return [p["task_id"] for p in body["prefixes"]], body["next_cursor"]


# ------------------------------------------------------------------------------------------------------ listing pages


def test_pages_follow_the_cursor_and_a_change_between_pages_neither_repeats_nor_skips(
    client: TestClient, files: tuple[bytes, bytes]
) -> None:
    ids = [f"t{i:02d}" for i in range(12)]
    assert bulk(client, task_tar(files, ids)).json()["created"] == 12

    first, cursor = listed_ids(client, limit=5)
    assert first == ids[:5] and cursor
    # Between pages: one task already listed and one not yet listed are deleted, two are added (before and after).
    assert client.delete("/prefixes/t02").status_code == 204
    assert client.delete("/prefixes/t07").status_code == 204
    assert bulk(client, task_tar(files, ["t00a", "t05a"])).json()["created"] == 2
    rest: list[str] = []
    while cursor:
        page, cursor = listed_ids(client, limit=5, cursor=cursor)
        rest += page
    assert rest == ["t05", "t05a", "t06", "t08", "t09", "t10", "t11"]  # t00a sorts before the cursor: not seen

    whole, end = listed_ids(client)  # the default page holds everything here: old clients see no change
    assert end is None and len(whole) == 12
    assert listed_ids(client, prefix="t05") == (["t05", "t05a"], None)
    page, cursor = listed_ids(client, prefix="t1", limit=1)
    assert page == ["t10"] and cursor
    assert listed_ids(client, prefix="t1", limit=1, cursor=cursor) == (["t11"], None)
    assert listed_ids(client, prefix="zz") == ([], None)
    # A filter no task id can begin with is refused by name, on every paged route (and never reaches a header).
    for route in ("/prefixes", "/v1/models", "/prefixes/export"):
        response = client.get(route, params={"prefix": "caf\u00e9"})  # /v1/models answers in OpenAI's error shape
        assert response.status_code == 422 and "prefix: 'café' cannot begin a task id" in response.text, response.text


def test_bad_limits_and_cursors_are_422_naming_the_problem(client: TestClient, files: tuple[bytes, bytes]) -> None:
    bulk(client, task_tar(files, ["a1", "a2", "b1"]))
    assert_error(client.get("/prefixes", params={"limit": 0}), 422, "limit", "1000")
    assert_error(client.get("/prefixes", params={"limit": 1001}), 422, "limit", "between 1 and 1000")
    assert_error(client.get("/prefixes", params={"cursor": "not-a-cursor"}), 422, "cursor", "next_cursor")
    _, cursor = listed_ids(client, prefix="a", limit=1)
    assert_error(client.get("/prefixes", params={"cursor": cursor, "prefix": "b"}), 422, "cursor", "prefix='a'")
    assert_error(client.get("/prefixes", params={"prefix": "x" * 65}), 422, "prefix", "64")


def test_v1_models_pages_in_openai_style(client: TestClient, files: tuple[bytes, bytes]) -> None:
    bulk(client, task_tar(files, ["m1", "m2", "m3"]))
    first = client.get("/v1/models", params={"limit": 2}).json()
    assert first["object"] == "list"
    assert [m["id"] for m in first["data"]] == ["tiny-llama", "m1"]
    assert (first["first_id"], first["last_id"], first["has_more"]) == ("tiny-llama", "m1", True)
    second = client.get("/v1/models", params={"limit": 2, "after": first["last_id"]}).json()
    assert [m["id"] for m in second["data"]] == ["m2", "m3"] and second["has_more"] is False
    assert [m["id"] for m in client.get("/v1/models", params={"after": "tiny-llama"}).json()["data"]] == ["m1", "m2", "m3"]
    assert [m["id"] for m in client.get("/v1/models", params={"prefix": "m2"}).json()["data"]] == ["m2"]
    error = client.get("/v1/models", params={"limit": 5000})
    assert error.status_code == 422 and error.json()["error"]["param"] == "limit"
    assert "between 1 and 1000" in error.json()["error"]["message"]


# -------------------------------------------------------------------------------------------------------- bulk import


def test_bulk_import_stores_each_task_as_one_upload_would_and_reports_each(
    client: TestClient, files: tuple[bytes, bytes], loaded: LoadedModel, tmp_path: Path
) -> None:
    adapter_dir, _ = adapter(loaded, tmp_path, "a", v=3, seed=1)  # the same adapter as `files`
    assert upload(client, "exists", adapter_dir).status_code == 201
    task_json = json.dumps({"prompt_template": "t9 {inputs}", "description": "with a template"}).encode()
    body = task_tar(files, ["good1", "good2", "exists"], **{
        "good2/task.json": task_json,
        "bad/adapter_config.json": edit_config(files[0], num_virtual_tokens=99),
        "bad/adapter_model.safetensors": files[1],
        "odd/adapter_config.json": files[0], "odd/adapter_model.safetensors": files[1], "odd/notes.txt": b"hi",
        "half/adapter_config.json": files[0],
        "Bad id!/adapter_config.json": files[0], "Bad id!/adapter_model.safetensors": files[1],
    })  # fmt: skip
    response = bulk(client, body)
    assert response.status_code == 200, response.text
    answer = response.json()
    by_id = {r["task_id"]: r for r in answer["results"]}
    assert [r["task_id"] for r in answer["results"]] == sorted(by_id)
    assert (answer["created"], answer["replaced"], answer["errors"]) == (2, 0, 5)
    assert by_id["good1"]["status"] == by_id["good2"]["status"] == "created"
    assert by_id["exists"]["status_code"] == 409 and "replace" in by_id["exists"]["error"]
    assert by_id["bad"]["status_code"] == 422 and "num_virtual_tokens" in by_id["bad"]["error"]
    assert "notes.txt" in by_id["odd"]["error"] and "half/adapter_model.safetensors" in by_id["half"]["error"]
    assert by_id["Bad id!"]["type"] == "invalid_task_id"

    single = upload(client, "single", adapter_dir).json()
    stored = client.get("/prefixes/good2").json()
    assert stored["sha256"] == single["sha256"] == by_id["good2"]["sha256"]
    assert (stored["prompt_template"], stored["description"]) == ("t9 {inputs}", "with a template")
    generated = [
        client.post("/generate", json={"task_id": t, "inputs": "t5 t6", "raw_prompt": True,
                                       "parameters": {"max_new_tokens": 4}}).json()["generated_text"]
        for t in ("good1", "single")
    ]  # fmt: skip
    assert generated[0] == generated[1]

    replaced = bulk(client, task_tar(files, ["good1", "new"]), replace="true").json()
    assert [(r["task_id"], r["status"]) for r in replaced["results"]] == [("good1", "replaced"), ("new", "created")]


def _with_member(kind: bytes, name: str, linkname: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        archive.addfile(info)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (tar_bytes({"../escape/adapter_config.json": b"{}"}), "'..'"),
        (tar_bytes({"/abs/adapter_config.json": b"{}"}), "absolute"),
        (tar_bytes({"a/b/adapter_config.json": b"{}"}), "<task_id>/<file>"),
        (tar_bytes({"README": b"hi"}), "<task_id>/<file>"),
        (_with_member(tarfile.SYMTYPE, "t/adapter_config.json", "/etc/passwd"), "links"),
        (_with_member(tarfile.LNKTYPE, "t/adapter_model.safetensors", "t/adapter_config.json"), "links"),
        (b"not a tar at all" * 100, "not a"),
        (b"\x1f\x8b\x08" + b"\0" * 100, "uncompressed tar"),
    ],
)
def test_an_archive_that_could_escape_or_is_not_a_tar_is_refused_whole(
    client: TestClient, settings: Settings, files: tuple[bytes, bytes], body: bytes, needle: str
) -> None:
    before = store_snapshot(settings.prefix_dir)
    assert_error(bulk(client, body), 422, needle)
    assert store_snapshot(settings.prefix_dir) == before
    assert listed_ids(client) == ([], None)


def test_bulk_limits_are_checked_before_any_task_is_stored(
    settings: Settings, loaded: LoadedModel, files: tuple[bytes, bytes]
) -> None:
    settings = settings.model_copy(update={"max_bulk_tasks": 2, "max_bulk_body_bytes": 300_000, "max_config_bytes": 2000})
    with TestClient(create_app(settings, loaded)) as client:
        assert_error(bulk(client, task_tar(files, ["a", "b", "c"])), 413, "max_bulk_tasks")
        assert_error(bulk(client, b"x" * 300_001), 413, "300000")
        big = bulk(client, task_tar(files, ["a"], **{"b/adapter_config.json": b" " * 2001}))
        assert {r["task_id"]: r["status_code"] for r in big.json()["results"]} == {"a": None, "b": 413}
        assert_error(client.post("/prefixes/bulk", content=b"x", headers={"Content-Type": "application/zip"}), 415, "tar")
        assert [p["task_id"] for p in client.get("/prefixes").json()["prefixes"]] == ["a"]


def test_duplicate_members_are_that_tasks_error(client: TestClient, files: tuple[bytes, bytes]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in (("d/adapter_config.json", files[0]), ("d/adapter_model.safetensors", files[1]),
                           ("d/adapter_config.json", files[0])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    result = bulk(client, buffer.getvalue()).json()["results"]
    assert result[0]["status"] == "error" and "more than once" in result[0]["error"]


# -------------------------------------------------------------------------------------------------------------- export


def test_export_round_trips_through_bulk_import(
    client: TestClient, files: tuple[bytes, bytes], loaded: LoadedModel, tmp_path: Path
) -> None:
    task_json = json.dumps({"prompt_template": "t9 {inputs}"}).encode()
    bulk(client, task_tar(files, ["x1", "x2", "y1"], **{"x2/task.json": task_json}))
    exported = client.get("/prefixes/export")
    assert exported.status_code == 200 and exported.headers["content-type"] == "application/x-tar"
    members = tar_members(exported.content)
    assert set(members) == {f"{t}/{f}" for t in ("x1", "x2", "y1")
                            for f in ("adapter_config.json", "adapter_model.safetensors")} | {"x2/task.json"}
    only_x = tar_members(client.get("/prefixes/export", params={"prefix": "x"}).content)
    assert {name.split("/")[0] for name in only_x} == {"x1", "x2"}

    other = Settings(prefix_dir=tmp_path / "other", max_running_rows=8, max_prefix_bytes=1 << 20)
    with TestClient(create_app(other, loaded)) as second:
        assert bulk(second, exported.content).json()["created"] == 3
        for task_id in ("x1", "x2", "y1"):
            a, b = client.get(f"/prefixes/{task_id}").json(), second.get(f"/prefixes/{task_id}").json()
            assert (a["sha256"], a["prompt_template"]) == (b["sha256"], b["prompt_template"])


def test_the_archive_layout_is_the_registrys() -> None:
    from service import bulk_archive, registry

    assert (bulk_archive.CONFIG_FILE, bulk_archive.WEIGHTS_FILE, bulk_archive.TASK_FILE) == (
        registry.CONFIG_FILE, registry.WEIGHTS_FILE, registry.TASK_FILE
    )


# -------------------------------------------------------------------------------------------------------- the client


def test_upload_cli_sends_many_task_folders_in_batches(
    settings: Settings, loaded: LoadedModel, files: tuple[bytes, bytes], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from service import cli

    parent = tmp_path / "tasks"
    for task_id in ("c1", "c2", "c3", "broken"):
        (parent / task_id).mkdir(parents=True)
        (parent / task_id / "adapter_config.json").write_bytes(files[0] if task_id != "broken" else b"{")
        (parent / task_id / "adapter_model.safetensors").write_bytes(files[1])
    (parent / "c2" / "task.json").write_text(json.dumps({"description": "second"}))
    (tmp_path / "single").mkdir()
    for name, data in zip(("adapter_config.json", "adapter_model.safetensors"), files):
        (tmp_path / "single" / name).write_bytes(data)

    with ThreadedServer(create_app(settings, loaded)) as live:
        args = ["upload", str(parent), str(tmp_path / "single"), "--url", live.url, "--batch-size", "2"]
        assert cli.main(args) == 1  # "broken" is refused, the others stored
        out, err = capsys.readouterr()
        assert json.loads(out.strip().splitlines()[-1]) == {
            "created": 4, "replaced": 0, "errors": 1, "tasks": 5, "failed_requests": 0
        }
        assert "broken:" in err and "adapter_config" in err
        assert cli.main(["upload", str(parent / "c1"), "--url", live.url, "--replace"]) == 0
        assert json.loads(capsys.readouterr().out)["replaced"] == 1
        listed = httpx.get(f"{live.url}/prefixes").json()["prefixes"]
        assert [p["task_id"] for p in listed] == ["c1", "c2", "c3", "single"]
        assert listed[1]["description"] == "second"
    assert cli.main(["upload", str(parent), str(parent / "c1"), "--url", "http://unused"]) == 2  # c1 twice
    assert cli.main(["upload", str(parent), str(parent), "--task-id", "x"]) == 2


def test_the_bulk_answer_shown_in_the_docs_is_the_servers(client: TestClient, files: tuple[bytes, bytes]) -> None:
    """docs/tasks.md's example: the tar of three folders, `support-billing` already stored."""
    import re

    text = (Path(__file__).parents[1] / "docs" / "tasks.md").read_text()
    section = text[text.index("## Bulk import and export"):]
    block = re.search(r"```json\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    shown = [json.loads(line) for line in block.splitlines() if line.strip()]
    counts = re.search(r'`(\{"created": .*?)\.\.\.\]\}`', section).group(1)  # type: ignore[union-attr]
    bulk(client, task_tar(files, ["support-billing"]))
    answer = bulk(client, task_tar(files, ["sentiment", "support-billing", "support-returns"])).json()
    assert counts == json.dumps({k: answer[k] for k in ("created", "replaced", "errors")})[:-1] + ', "results": ['
    for expected, actual in zip(shown, answer["results"], strict=True):
        if expected["sha256"] == "…":
            expected["sha256"] = actual["sha256"]
        if expected["num_virtual_tokens"] is not None:  # the docs' V=20 is SmolLM2's, the tiny model's here is 3
            expected["num_virtual_tokens"] = actual["num_virtual_tokens"]
        assert actual == expected


def test_the_listing_page_shown_in_the_docs_is_the_servers(client: TestClient, files: tuple[bytes, bytes]) -> None:
    """docs/api.md's `GET /prefixes?limit=2&prefix=support-` and its answer's ids and next_cursor."""
    import re

    text = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    section = text[text.index("## Listing pages"):]
    query = re.search(r"curl -s 'localhost:8000(/prefixes\?[^']*)'", section).group(1)  # type: ignore[union-attr]
    shown_ids = re.findall(r'\{"task_id": "([^"]+)", \.\.\.\}', section)
    shown_cursor = re.search(r'"next_cursor": "([^"]+)"', section).group(1)  # type: ignore[union-attr]
    bulk(client, task_tar(files, ["sentiment", "support-billing", "support-returns", "support-shipping"]))
    answer = client.get(query).json()
    assert [p["task_id"] for p in answer["prefixes"]] == shown_ids
    assert answer["next_cursor"] == shown_cursor


def test_bulk_import_and_export_need_the_admin_key_and_listing_the_generate_key(
    settings: Settings, loaded: LoadedModel, files: tuple[bytes, bytes]
) -> None:
    settings = settings.model_copy(update={"api_keys": ["reader"], "admin_api_keys": ["admin"]})
    reader, admin = {"Authorization": "Bearer reader"}, {"Authorization": "Bearer admin"}
    with TestClient(create_app(settings, loaded)) as client:
        body = task_tar(files, ["k1"])
        assert_error(client.post("/prefixes/bulk", content=body, headers={**TAR, **reader}), 403, "admin")
        assert_error(client.get("/prefixes/export", headers=reader), 403, "admin")
        assert client.post("/prefixes/bulk", content=body, headers={**TAR, **admin}).json()["created"] == 1
        assert client.get("/prefixes/export", headers=admin).status_code == 200
        assert [p["task_id"] for p in client.get("/prefixes", headers=reader).json()["prefixes"]] == ["k1"]
        assert client.get("/prefixes", headers={"Authorization": "Bearer nope"}).status_code == 401
