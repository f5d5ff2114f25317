"""`prefix-serve bench`: one command, one seeded workload, every system, a table + JSON + PNG.

Systems (tokens/s ratios are reported at --clients):
  peft       the seed's method: PeftModel + set_adapter + generate, one request at a time
  per-task   this service, --batching per-task
  mixed      this service, --batching mixed (continuous, tasks share batches)
  no-prefix  the bare base model under `mixed`, to show what the prefixes cost
  ray-N      `mixed` as N replicas on Ray Serve (a private local cluster; needs prefix-serve[ray]); not in the
             default set, run at --clients only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from service.batch import ModelRunner, verify_prefix_support
from service.bench.peft_baseline import load_peft_model
from service.bench.report import markdown_table, plot, ratios_table, write_json
from service.bench.ray_system import ray_replicas, run_ray_system
from service.bench.run import run_engine_system, run_peft_system
from service.bench.workload import make_workload, synthetic_tokenizer, write_random_prefixes
from service.logging_setup import configure_logging
from service.model_loader import LoadedModel, load_base_model, resolve_device, resolve_dtype, wrap_model
from service.registry import PrefixRegistry
from service.settings import Settings

logger = logging.getLogger(__name__)

SYSTEMS = ("peft", "per-task", "mixed", "no-prefix")  # the default set; ray-N (e.g. ray-2) on request


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="Benchmark PEFT's method vs this service.", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--model", help="Local HF model dir or .gguf (default: the embedded SmolLM2-135M).")
    bench.add_argument("--random-init", type=Path, metavar="CONFIG.json",
                       help="Benchmark a randomly initialised model built from this config (no weights needed).")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    bench.add_argument("--cache-dir", type=Path)
    bench.add_argument("--clients", type=int, default=32, help="Concurrency at which the ratios are taken.")
    bench.add_argument("--concurrency", default="1,4,16,32,64", help="Concurrency sweep for the plot.")
    bench.add_argument("--tasks", type=int, default=8)
    bench.add_argument("--requests-per-client", type=int, default=2)
    bench.add_argument("--min-requests", type=int, default=8)
    bench.add_argument("--prompt-tokens", default="20-60")
    bench.add_argument("--new-tokens", default="32-64")
    bench.add_argument("--virtual-tokens", type=int, default=20)
    bench.add_argument("--systems", default=",".join(SYSTEMS))
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--out", type=Path, default=Path("bench-results"))
    bench.set_defaults(func=main)


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def _load(args: argparse.Namespace) -> LoadedModel:
    if args.random_init is None:
        overrides: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "model": args.model}
        if args.cache_dir:
            overrides["cache_dir"] = args.cache_dir
        return load_base_model(Settings(**overrides))
    config = AutoConfig.for_model(**json.loads(args.random_init.read_text()))
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return wrap_model(model, synthetic_tokenizer(config.vocab_size), f"random-init:{args.random_init.name}")


def main(args: argparse.Namespace) -> int:
    configure_logging("info", "text")  # one progress line per finished run
    systems = [s for s in args.systems.split(",") if s]
    unknown = {s for s in systems if s not in SYSTEMS and ray_replicas(s) is None}
    if unknown:
        print(f"error: unknown systems {sorted(unknown)}; choose from {SYSTEMS} or ray-N", file=sys.stderr)
        return 2
    ray_systems = [s for s in systems if ray_replicas(s)]
    if ray_systems and args.random_init is not None:
        print("error: ray-N systems load the model in each replica: use --model or the default, not --random-init",
              file=sys.stderr)
        return 2
    concurrencies = sorted({int(c) for c in args.concurrency.split(",") if c} | {args.clients})
    loaded = _load(args)
    runner = ModelRunner(loaded.model, loaded.tokenizer)
    verify_prefix_support(runner, loaded.geometry)
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        adapters = write_random_prefixes(
            Path(tmp) / "adapters", loaded.geometry, num_tasks=args.tasks, num_virtual_tokens=args.virtual_tokens,
            model_name=loaded.name, seed=args.seed,
        )
        registry = PrefixRegistry(
            Path(tmp) / "store", loaded.geometry, device=loaded.device, dtype=loaded.dtype,
            served_model_name=loaded.name, max_virtual_tokens=max(args.virtual_tokens, 1),
            max_prefix_bytes=1 << 31, max_config_bytes=1 << 20,
        )
        for task_id, adapter_dir in adapters.items():
            registry.put(task_id, (adapter_dir / "adapter_config.json").read_bytes(),
                         (adapter_dir / "adapter_model.safetensors").read_bytes())
        prefixes = {t: registry.get(t) for t in adapters}

        rows: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for concurrency in concurrencies:
            workload = make_workload(
                loaded.tokenizer, num_requests=max(args.min_requests, args.requests_per_client * concurrency),
                num_tasks=args.tasks, prompt_tokens=_range(args.prompt_tokens), new_tokens=_range(args.new_tokens),
                seed=args.seed,
            )
            warmup = make_workload(loaded.tokenizer, num_requests=min(concurrency, 8), num_tasks=args.tasks,
                                   prompt_tokens=(8, 8), new_tokens=(2, 2), seed=args.seed + 1)
            for system, policy, use_prefix in (("per-task", "per-task", True), ("mixed", "mixed", True),
                                               ("no-prefix", "mixed", False)):
                if system not in systems:
                    continue
                result = run_engine_system(system, runner, prefixes, workload, concurrency=concurrency,
                                           policy=policy, use_prefix=use_prefix, warmup=warmup)
                _record(result, rows, results)
            for system in ray_systems if concurrency == args.clients else []:
                ray_settings = Settings(model=args.model, device=args.device, dtype=args.dtype,
                                        prefix_dir=Path(tmp) / "store", **({"cache_dir": args.cache_dir}
                                                                            if args.cache_dir else {}))
                result = run_ray_system(system, ray_replicas(system) or 1, ray_settings, prefixes, workload,
                                        concurrency=concurrency, warmup=warmup)
                _record(result, rows, results)
            if "peft" in systems and concurrency == args.clients:
                peft_model = load_peft_model(loaded.model, adapters)
                result = run_peft_system("peft", peft_model, workload, concurrency=concurrency, warmup=warmup[:2])
                _record(result, rows, results)

    ratios = _ratios(rows, args.clients)
    title = (f"{loaded.name} on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')}), {args.tasks} tasks, "
             f"V={args.virtual_tokens}, prompts {args.prompt_tokens}, new tokens {args.new_tokens}")
    payload = {
        "title": title,
        "command": " ".join(["prefix-serve", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None,
        "environment": _environment(loaded),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
        "rows": rows,
        "ratios": ratios,
        "runs": results,
    }
    write_json(args.out / "bench.json", payload)
    table = markdown_table(rows) + "\n\n" + ratios_table(ratios)
    (args.out / "bench.md").write_text(f"{title}\n\n{table}\n")
    plot(args.out / "bench.png", rows, title)
    print(f"{title}\n\n{table}\n\nwrote {args.out / 'bench.json'}, {args.out / 'bench.md'}, {args.out / 'bench.png'}")
    return 0


def _record(result: Any, rows: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
    summary = result.summary()
    logger.info("%s", summary)
    rows.append(summary)
    results.append(result.to_json())


def _ratios(rows: list[dict[str, Any]], clients: int) -> dict[str, float | None]:
    at = {r["system"]: r["tokens_per_s"] for r in rows if r["concurrency"] == clients}

    def ratio(a: str, b: str) -> float | None:
        return round(at[a] / at[b], 3) if a in at and b in at and at[b] else None

    ratios = {
        f"mixed / peft @ {clients}": ratio("mixed", "peft"),
        f"mixed / per-task @ {clients}": ratio("mixed", "per-task"),
        f"mixed / no-prefix @ {clients}": ratio("mixed", "no-prefix"),
    }
    for system in sorted(s for s in at if ray_replicas(s)):
        ratios[f"{system} / mixed @ {clients}"] = ratio(system, "mixed")
    return ratios


def _environment(loaded: LoadedModel) -> dict[str, Any]:
    params = sum(p.numel() for p in loaded.model.parameters())
    return {
        "model": loaded.name,
        "parameters": params,
        "weight_bytes": sum(p.numel() * p.element_size() for p in loaded.model.parameters()),
        "device": str(loaded.device),
        "gpu": torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else None,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
