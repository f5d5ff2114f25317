"""`prefix-serve` command line: serve, upload, train, bench (and the example-task commands)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import httpx
from pydantic import ValidationError

from service.bench.cli import register as register_bench
from service.logging_setup import configure_logging
from service.settings import Settings
from service.training.cli import register as register_training

logger = logging.getLogger("service.cli")


def _settings_from_args(args: argparse.Namespace, names: Sequence[str]) -> Settings:
    """Environment (PREFIX_SERVE_*) first, then any flag given on the command line wins."""
    overrides: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return Settings(**overrides)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app

    from service.api.auth import exposure_problem

    try:
        settings = _settings_from_args(
            args,
            ["model", "prefix_dir", "host", "port", "device", "dtype", "cache_dir", "log_level", "log_format",
             "batching", "allow_unauthenticated", "replicas", "ray_address"],
        )
    except ValidationError as exc:  # e.g. a blank API key: say which setting, not a traceback
        configure_logging("info", "text")
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ()))
            logger.error("invalid setting PREFIX_SERVE_%s: %s", where.upper(), error.get("msg"))
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        problem = exposure_problem(settings)
    except ValueError as exc:  # a malformed key file, or a blank key in it
        logger.error("%s", exc)
        return 2
    if problem:
        logger.error(problem)
        return 2
    if settings.replicas > 0 or settings.ray_address:
        from service.scaleout.launch import serve_on_ray

        return serve_on_ray(settings)
    app = create_app(settings)
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_keep_alive=settings.keep_alive_timeout_s,
    )
    return 0


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


def _task_fields(stored: dict[str, Any], args: argparse.Namespace) -> dict[str, str]:
    """prompt_template / description: from the flags, else from the stored task.json."""
    fields = {}
    for name, flag in (("prompt_template", args.prompt_template), ("description", args.description)):
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


def _upload(args: argparse.Namespace) -> int:
    configure_logging("warning", "text")
    if (args.adapter_dir is None) == (args.text is None):
        print("error: give an adapter directory or --text FILE (one of them)", file=sys.stderr)
        return 2
    adapter_dir = Path(args.adapter_dir) if args.adapter_dir is not None else None
    try:
        stored = _stored_task(adapter_dir)
        data = {"task_id": args.task_id, "replace": "true" if args.replace else "false"}
        data.update(_task_fields(stored, args))
        text = Path(args.text).read_text(encoding="utf-8") if args.text is not None else _stored_text(stored)
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
    api_key = args.api_key or os.environ.get("PREFIX_SERVE_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.post(
            args.url.rstrip("/") + "/prefixes",
            headers=headers,
            data=data,
            files=files or None,  # a text task: a plain urlencoded form, which the route parses as well
            timeout=300,
        )
    except httpx.HTTPError as exc:
        print(f"error: could not reach {args.url}: {exc}", file=sys.stderr)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefix-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="Run the HTTP server.")
    serve.add_argument("--model", help="Local HF model directory or .gguf file (default: embedded SmolLM2-135M).")
    serve.add_argument("--prefix-dir", type=Path, help="Prefix store directory (default: ./prefixes).")
    serve.add_argument("--host", help="Bind address (default 127.0.0.1).")
    serve.add_argument("--port", type=int, help="Port (default 8000).")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"])
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--cache-dir", type=Path, help="Model cache (default ~/.cache/prefix-serve).")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["json", "text"], help="Log lines as JSON (default) or text.")
    serve.add_argument("--batching", choices=["mixed", "per-task"], help="Engine policy (default mixed).")
    serve.add_argument(
        "--allow-unauthenticated", action="store_true", default=None,
        help="Allow binding a non-loopback address with no API keys configured.",
    )
    serve.add_argument(
        "--replicas", type=int,
        help="Scale out on Ray Serve with N model replicas behind one HTTP ingress (needs prefix-serve[ray]).",
    )
    serve.add_argument(
        "--ray-address", help="Join this Ray cluster (e.g. auto) instead of starting a local one; implies Ray Serve.",
    )
    serve.set_defaults(func=_serve)

    upload = sub.add_parser(
        "upload", help="Upload a PEFT prefix-tuning adapter directory, or make a task from a text, on a running server."
    )
    upload.add_argument(
        "adapter_dir", nargs="?",
        help="Directory with adapter_config.json and adapter_model.safetensors (and optionally task.json); a "
        "downloaded task made from text is re-created from task.json's text.",
    )  # fmt: skip
    upload.add_argument("--text", metavar="FILE", help="Instead of an adapter: a task made from this UTF-8 text file.")
    upload.add_argument("--prompt-template", help="The task's template with one {inputs} slot (default: task.json's).")
    upload.add_argument("--description", help="A short description (default: task.json's).")
    upload.add_argument("--task-id", required=True)
    upload.add_argument("--url", default="http://127.0.0.1:8000")
    upload.add_argument("--replace", action="store_true", help="Overwrite the task's existing prefix.")
    upload.add_argument("--api-key", help="An admin API key (default: $PREFIX_SERVE_API_KEY).")
    upload.set_defaults(func=_upload)
    register_training(sub)
    register_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
