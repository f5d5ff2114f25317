"""`prefix-serve` command line: serve, upload, train, bench (and the example-task commands)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import httpx

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

    settings = _settings_from_args(
        args,
        ["model", "prefix_dir", "host", "port", "device", "dtype", "cache_dir", "log_level", "log_format",
         "batching", "allow_unauthenticated", "replicas", "ray_address"],
    )
    configure_logging(settings.log_level, settings.log_format)
    problem = exposure_problem(settings)
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


def _upload(args: argparse.Namespace) -> int:
    configure_logging("warning", "text")
    adapter_dir = Path(args.adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            print(f"error: {path} not found (expected a PEFT adapter directory)", file=sys.stderr)
            return 2
    api_key = args.api_key or os.environ.get("PREFIX_SERVE_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with config_path.open("rb") as config_file, weights_path.open("rb") as weights_file:
        try:
            response = httpx.post(
                args.url.rstrip("/") + "/prefixes",
                headers=headers,
                data={"task_id": args.task_id, "replace": "true" if args.replace else "false"},
                files={
                    "adapter_config": ("adapter_config.json", config_file, "application/json"),
                    "adapter_model": ("adapter_model.safetensors", weights_file, "application/octet-stream"),
                },
                timeout=120,
            )
        except httpx.HTTPError as exc:
            print(f"error: could not reach {args.url}: {exc}", file=sys.stderr)
            return 1
    body = response.text
    try:
        body = json.dumps(response.json(), indent=2)
    except ValueError:
        pass
    print(body)
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

    upload = sub.add_parser("upload", help="Upload a PEFT prefix-tuning adapter directory to a running server.")
    upload.add_argument("adapter_dir", help="Directory with adapter_config.json and adapter_model.safetensors.")
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
