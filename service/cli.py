"""`prefix-serve` command line: serve, upload, train, bench (and the example-task commands)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from pydantic import ValidationError

from service.bench.cli import register as register_bench
from service.logging_setup import configure_logging
from service.settings import Settings
from service.training.cli import register as register_training
from service.upload import upload_many, upload_task

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


def _upload(args: argparse.Namespace) -> int:
    dirs = [Path(d) for d in args.adapter_dirs]
    if args.task_id is None and args.text is None and dirs:  # many tasks: each folder's name is its task id
        if args.prompt_template is not None or args.description is not None:
            print("error: --prompt-template and --description name one task's fields; with several tasks each "
                  "folder's task.json carries them", file=sys.stderr)  # fmt: skip
            return 2
        return upload_many(
            args.url, dirs, replace=args.replace, api_key=args.api_key, batch_size=args.batch_size,
            concurrency=args.concurrency,
        )  # fmt: skip
    if args.task_id is None or len(dirs) > 1:
        print("error: --task-id names one task (one adapter directory or --text FILE); to upload several tasks, give "
              "their directories without --task-id (each folder's name is its task id)", file=sys.stderr)  # fmt: skip
        return 2
    return upload_task(
        args.url, args.task_id,
        adapter_dir=dirs[0] if dirs else None,
        text_file=Path(args.text) if args.text is not None else None,
        prompt_template=args.prompt_template, description=args.description,
        replace=args.replace, api_key=args.api_key,
    )  # fmt: skip


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
        "adapter_dirs", nargs="*", metavar="DIR",
        help="Directory with adapter_config.json and adapter_model.safetensors (and optionally task.json); a "
        "downloaded task made from text is re-created from task.json's text. Without --task-id: any number of such "
        "directories, or folders of them (an unpacked GET /prefixes/export), each named by its task id, sent as tars "
        "to POST /prefixes/bulk.",
    )  # fmt: skip
    upload.add_argument("--text", metavar="FILE", help="Instead of an adapter: a task made from this UTF-8 text file.")
    upload.add_argument("--prompt-template", help="The task's template with one {inputs} slot (default: task.json's).")
    upload.add_argument("--description", help="A short description (default: task.json's).")
    upload.add_argument("--task-id", help="The task id of one adapter directory or --text FILE.")
    upload.add_argument("--batch-size", type=int, default=500, help="Many tasks: tasks per bulk request (default 500).")
    upload.add_argument("--concurrency", type=int, default=2, help="Many tasks: bulk requests at once (default 2).")
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
