"""The upload client (`prefix-serve upload`, and `prefix-serve train --upload`): one function both commands call.

Its own module so that the top-level CLI and the training CLI each import it, not one another. Prints to stdout and
stderr: it is a command's body, and tests read what it prints."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from service.logging_setup import configure_logging


def _stored_task(adapter_dir: Path | None) -> dict[str, Any]:
    """The adapter directory's task.json (written by `prefix-serve train` and by GET /prefixes/{id}/adapter), or {}."""
    task_file = adapter_dir / "task.json" if adapter_dir is not None else None
    if task_file is None or not task_file.is_file():
        return {}
    try:
        loaded = json.loads(task_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{task_file}: not valid JSON ({exc})") from None
    return loaded if isinstance(loaded, dict) else {}


def _task_fields(stored: dict[str, Any], prompt_template: str | None, description: str | None) -> dict[str, str]:
    """prompt_template / description: from the flags, else from the stored task.json."""
    fields = {}
    for name, flag in (("prompt_template", prompt_template), ("description", description)):
        value = flag if flag is not None else stored.get(name)
        if isinstance(value, str) and value:
            fields[name] = value
    return fields


def _stored_text(stored: dict[str, Any]) -> str | None:
    """The text of a downloaded task made from text: the server re-creates it from the text (the same prefix on the
    same model), which holds for every length the server holds; its files would be refused over max_virtual_tokens
    and run to ~94 MB at 2,048 tokens of SmolLM2."""
    text = stored.get("text")
    return text if stored.get("source") == "text" and isinstance(text, str) and text else None


def upload_task(
    url: str,
    task_id: str,
    *,
    adapter_dir: Path | None = None,
    text_file: Path | None = None,
    prompt_template: str | None = None,
    description: str | None = None,
    replace: bool = False,
    api_key: str | None = None,
) -> int:
    """`prefix-serve upload`: POST an adapter directory (or a text task) to a running server's /prefixes, print the
    server's answer; the exit code: 0 uploaded, 1 refused or unreachable, 2 bad local input."""
    configure_logging("warning", "text")
    if (adapter_dir is None) == (text_file is None):
        print("error: give an adapter directory or --text FILE (one of them)", file=sys.stderr)
        return 2
    try:
        stored = _stored_task(adapter_dir)
        data = {"task_id": task_id, "replace": "true" if replace else "false"}
        data.update(_task_fields(stored, prompt_template, description))
        text = text_file.read_text(encoding="utf-8") if text_file is not None else _stored_text(stored)
        if text is not None:
            data["text"] = text
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files: dict[str, Any] = {}
    downloaded_sha256: str | None = None
    if adapter_dir is not None and text is not None:
        weights_path = adapter_dir / "adapter_model.safetensors"
        if weights_path.is_file():
            downloaded_sha256 = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    elif adapter_dir is not None:
        config_path = adapter_dir / "adapter_config.json"
        weights_path = adapter_dir / "adapter_model.safetensors"
        for path in (config_path, weights_path):
            if not path.is_file():
                print(f"error: {path} not found (expected a PEFT adapter directory)", file=sys.stderr)
                return 2
        files = {
            "adapter_config": ("adapter_config.json", config_path.read_bytes(), "application/json"),
            "adapter_model": ("adapter_model.safetensors", weights_path.read_bytes(), "application/octet-stream"),
        }
    api_key = api_key or os.environ.get("PREFIX_SERVE_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.post(
            url.rstrip("/") + "/prefixes",
            headers=headers,
            data=data,
            files=files or None,  # a text task: a plain urlencoded form, which the route parses as well
            timeout=300,
        )
    except httpx.HTTPError as exc:
        print(f"error: could not reach {url}: {exc}", file=sys.stderr)
        return 1
    body = response.text
    try:
        parsed = response.json()
        body = json.dumps(parsed, indent=2)
    except ValueError:
        parsed = None
    print(body)
    recomputed = parsed.get("sha256") if isinstance(parsed, dict) else None
    if response.is_success and downloaded_sha256 and recomputed != downloaded_sha256:
        print(
            "note: the task was re-created from task.json's text; its prefix differs from the directory's "
            "adapter_model.safetensors (a server with another model or dtype computes other K/V)",
            file=sys.stderr,
        )
    return 0 if response.is_success else 1


# ------------------------------------------------------------------------------------------------------ many tasks

TASK_MARKERS = ("adapter_config.json", "task.json")  # a folder with either is a task folder (task.json alone: text)


def task_folders(paths: list[Path]) -> dict[str, Path]:
    """Task id -> folder: each path is a task folder (its name is the task id), or a folder of task folders.
    ValueError for a path that is neither, or two folders of one name."""
    found: dict[str, Path] = {}
    for path in paths:
        if not path.is_dir():
            raise ValueError(f"{path}: not a directory")
        is_task = any((path / marker).is_file() for marker in TASK_MARKERS)
        children = [path] if is_task else sorted(
            child for child in path.iterdir()
            if child.is_dir() and any((child / marker).is_file() for marker in TASK_MARKERS)
        )  # fmt: skip
        if not children:
            raise ValueError(f"{path}: neither an adapter directory nor a folder of adapter directories")
        for child in children:
            if child.name in found:
                raise ValueError(f"task {child.name!r} twice: {found[child.name]} and {child}")
            found[child.name] = child
    return found


def _folder_files(folder: Path) -> dict[str, bytes]:
    from service.bulk_archive import TASK_FILES

    return {name: (folder / name).read_bytes() for name in TASK_FILES if (folder / name).is_file()}


def upload_many(
    url: str,
    paths: list[Path],
    *,
    replace: bool = False,
    api_key: str | None = None,
    batch_size: int = 500,
    concurrency: int = 2,
) -> int:
    """`prefix-serve upload DIR DIR...`: send the task folders as tars to POST /prefixes/bulk, `batch_size` tasks a
    request, `concurrency` requests at a time (the server stores each request's tasks with several threads too).
    Prints each refused task on stderr and the totals as JSON on stdout; exit code 0 when every task was stored,
    1 when any was refused or a request failed, 2 for bad local input."""
    from concurrent.futures import ThreadPoolExecutor

    from service.bulk_archive import tar_stream

    configure_logging("warning", "text")
    if batch_size < 1 or concurrency < 1:
        print("error: --batch-size and --concurrency must be at least 1", file=sys.stderr)
        return 2
    try:
        folders = task_folders(paths)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    task_ids = sorted(folders)
    batches = [task_ids[i:i + batch_size] for i in range(0, len(task_ids), batch_size)]
    api_key = api_key or os.environ.get("PREFIX_SERVE_API_KEY")
    headers = {"Content-Type": "application/x-tar", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    endpoint = url.rstrip("/") + "/prefixes/bulk"
    totals = {"created": 0, "replaced": 0, "errors": 0}

    def send(batch: list[str], client: httpx.Client) -> tuple[dict[str, Any] | None, str | None]:
        body = tar_stream((task_id, _folder_files(folders[task_id])) for task_id in batch)
        try:
            response = client.post(endpoint, content=body, headers=headers, params={"replace": str(replace).lower()})
        except (httpx.HTTPError, OSError) as exc:
            return None, f"could not reach {url}: {exc}"
        try:
            parsed = response.json()
        except ValueError:
            parsed = None
        if not response.is_success or not isinstance(parsed, dict):
            shown = parsed.get("error") if isinstance(parsed, dict) else response.text[:500]
            return None, f"{response.status_code} for tasks {batch[0]}..{batch[-1]}: {shown}"
        return parsed, None

    failed_requests = 0
    with httpx.Client(timeout=None) as client, ThreadPoolExecutor(max_workers=concurrency) as pool:
        for answer, problem in pool.map(lambda batch: send(batch, client), batches):
            if problem is not None:
                failed_requests += 1
                print(f"error: {problem}", file=sys.stderr)
                continue
            assert answer is not None
            for key in totals:
                totals[key] += int(answer.get(key, 0))
            for result in answer.get("results", []):
                if result.get("status") == "error":
                    print(f"{result.get('task_id')}: {result.get('error')}", file=sys.stderr)
    print(json.dumps({**totals, "tasks": len(task_ids), "failed_requests": failed_requests}))
    return 0 if totals["errors"] == 0 and failed_requests == 0 else 1
