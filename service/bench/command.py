"""`prefix-serve bench`'s run: load the model(s), run every system on the seeded workload, write the table, JSON and
plot. The command's flags and its description are in `service.bench.cli`; this module needs the `bench` extra."""

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
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from service.bench import SYSTEMS
from service.bench.peft_baseline import load_peft_model
from service.bench.report import markdown_table, plot, ratios_table, write_json
from service.bench.ray_system import ray_replicas, run_ray_system
from service.bench.run import run_engine_system, run_peft_system
from service.bench.static_baseline import run_static_system
from service.compute_thread import run_in_fresh_thread
from service.runner import ModelRunner
from service.startup import check_model
from service.bench.workload import WorkItem, make_workload, synthetic_tokenizer, token_range, write_random_prefixes
from service.logging_setup import configure_logging
from service.model_loader import LoadedModel, load_base_model, resolve_device, resolve_dtype, wrap_model
from service.prefix import TaskPrefix
from service.registry import PrefixRegistry
from service.settings import Settings

logger = logging.getLogger(__name__)

ENGINE_SYSTEMS = (("per-task", "per-task", True), ("mixed", "mixed", True), ("no-prefix", "mixed", False))


def _load(args: argparse.Namespace, dtype: str) -> LoadedModel:
    if args.random_init is None:
        overrides: dict[str, Any] = {"device": args.device, "dtype": dtype, "model": args.model}
        if args.cache_dir:
            overrides["cache_dir"] = args.cache_dir
        return load_base_model(Settings(**overrides))
    config = AutoConfig.for_model(**json.loads(args.random_init.read_text()))
    device = resolve_device(args.device)
    torch_dtype = resolve_dtype(dtype, device)
    torch.manual_seed(args.seed)
    model_class = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device(device):
        model = model_class.from_config(config, dtype=torch_dtype)
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
    dtypes = [d for d in args.dtype.split(",") if d]
    bad = [d for d in dtypes if d not in ("auto", "float32", "bfloat16", "float16")]
    if bad or not dtypes:
        print(f"error: unknown --dtype {bad or args.dtype!r}; choose from auto, float32, bfloat16, float16", file=sys.stderr)
        return 2
    concurrencies = sorted({int(c) for c in args.concurrency.split(",") if c} | {args.clients})
    if args.scale is not None:  # its own runs, in service/bench/scale.py
        from service.bench.scale import run_scale

        return run_scale(args, run_in_fresh_thread(_load, args, dtypes[0]))
    if args.few_shot:  # its own pair of systems, in service/bench/fewshot.py
        from service.bench.fewshot import run_few_shot

        loaded = _load(args, dtypes[0])
        check_model(ModelRunner(loaded.model, loaded.tokenizer), loaded.geometry)
        return run_few_shot(args, loaded)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []

    with tempfile.TemporaryDirectory() as tmp:
        first: LoadedModel | None = None
        for index, dtype in enumerate(dtypes):
            # Every computing step outside the engine runs in a thread that exits (service.compute_thread).
            loaded, runner, adapters, prefixes = run_in_fresh_thread(_prepare, args, dtype, Path(tmp), index)
            first = first or loaded
            suffix = "" if index == 0 else "-" + str(loaded.dtype).removeprefix("torch.")
            for concurrency in concurrencies:
                workload, warmup = _workloads(args, loaded, concurrency)
                if "static" in systems:
                    result = run_in_fresh_thread(run_static_system, "static" + suffix, runner, prefixes, workload,
                                                 concurrency=concurrency, warmup=warmup)
                    _record(result, rows, results)
                for system, policy, use_prefix in ENGINE_SYSTEMS:
                    if system in systems:
                        result = run_engine_system(
                            system + suffix, runner, prefixes, workload, concurrency=concurrency, policy=policy,
                            use_prefix=use_prefix, warmup=warmup, step_token_budget=args.step_token_budget,
                        )
                        _record(result, rows, results)
            for system in ray_systems if index == 0 else []:  # at --clients, in the first dtype
                workload, warmup = _workloads(args, loaded, args.clients)
                ray_settings = Settings(model=args.model, device=args.device, dtype=dtype,
                                        prefix_dir=Path(tmp) / f"store-{index}", **({"cache_dir": args.cache_dir}
                                                                                     if args.cache_dir else {}))
                result = run_ray_system(system, ray_replicas(system) or 1, ray_settings, prefixes, workload,
                                        concurrency=args.clients, warmup=warmup)
                _record(result, rows, results)
            if "peft" in systems and index == 0:  # last: PEFT wraps (and patches) the base model for good
                workload, warmup = _workloads(args, loaded, args.clients)
                peft_model = run_in_fresh_thread(load_peft_model, loaded.model, adapters)
                result = run_peft_system("peft", peft_model, workload, concurrency=args.clients, warmup=warmup[:2])
                _record(result, rows, results)
            del runner, loaded

    assert first is not None
    ratios = _ratios(rows, args.clients, dtypes)
    title = (f"{first.name} on {first.device} ({', '.join(dtypes)}), {args.tasks} tasks, V={args.virtual_tokens}, "
             f"prompts {args.prompt_tokens}, new tokens {args.new_tokens}, {torch.get_num_threads()} torch threads")
    payload = {
        "title": title,
        "command": " ".join(["prefix-serve", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else None,
        "environment": _environment(first),
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


def _prepare(
    args: argparse.Namespace, dtype: str, tmp: Path, index: int
) -> tuple[LoadedModel, ModelRunner, dict[str, Path], dict[str, TaskPrefix]]:
    """Load the model in `dtype`, check it, write the random task prefixes and load them as the registry does."""
    loaded = _load(args, dtype)
    runner = ModelRunner(loaded.model, loaded.tokenizer)
    check_model(runner, loaded.geometry)  # every start-up check, here rather than in the caller's thread
    adapters = write_random_prefixes(
        tmp / "adapters", loaded.geometry, num_tasks=args.tasks, num_virtual_tokens=args.virtual_tokens,
        model_name=loaded.name, seed=args.seed,
    )
    return loaded, runner, adapters, _prefixes(tmp / f"store-{index}", loaded, adapters, args.virtual_tokens)


def _prefixes(store: Path, loaded: LoadedModel, adapters: dict[str, Path], virtual_tokens: int) -> dict[str, TaskPrefix]:
    registry = PrefixRegistry(
        store, loaded.geometry, device=loaded.device, dtype=loaded.dtype, served_model_name=loaded.name,
        max_virtual_tokens=max(virtual_tokens, 1), max_prefix_bytes=1 << 31, max_config_bytes=1 << 20,
    )
    for task_id, adapter_dir in adapters.items():
        registry.put(task_id, (adapter_dir / "adapter_config.json").read_bytes(),
                     (adapter_dir / "adapter_model.safetensors").read_bytes())
    return {t: registry.get(t) for t in adapters}


def _workloads(args: argparse.Namespace, loaded: LoadedModel, concurrency: int) -> tuple[list[WorkItem], list[WorkItem]]:
    workload = make_workload(
        loaded.tokenizer, num_requests=max(args.min_requests, args.requests_per_client * concurrency),
        num_tasks=args.tasks, prompt_tokens=token_range(args.prompt_tokens), new_tokens=token_range(args.new_tokens),
        seed=args.seed,
    )
    warmup = make_workload(loaded.tokenizer, num_requests=min(concurrency, 8), num_tasks=args.tasks,
                           prompt_tokens=(8, 8), new_tokens=(2, 2), seed=args.seed + 1)
    return workload, warmup


def _record(result: Any, rows: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
    summary = result.summary()
    logger.info("%s", summary)
    rows.append(summary)
    results.append(result.to_json())


def _ratios(rows: list[dict[str, Any]], clients: int, dtypes: list[str]) -> dict[str, float | None]:
    at = {r["system"]: r for r in rows if r["concurrency"] == clients}

    def ratio(a: str, b: str) -> float | None:
        if a in at and b in at and at[b]["tokens_per_s"]:
            return round(at[a]["tokens_per_s"] / at[b]["tokens_per_s"], 3)
        return None

    ratios = {
        f"mixed / peft @ {clients}": ratio("mixed", "peft"),
        f"mixed / static @ {clients}": ratio("mixed", "static"),
        f"mixed / per-task @ {clients}": ratio("mixed", "per-task"),
        f"mixed / no-prefix @ {clients}": ratio("mixed", "no-prefix"),
    }
    mixed = at.get("mixed", {})
    if mixed.get("itl_p95_s") and mixed.get("step_p50_s"):
        ratios[f"mixed p95 inter-token latency / median step @ {clients}"] = round(
            mixed["itl_p95_s"] / mixed["step_p50_s"], 3
        )
    for dtype in dtypes[1:]:
        name = f"mixed-{dtype}"
        ratios[f"{name} / mixed @ {clients}"] = ratio(name, "mixed")
        ratios[f"{name} / static-{dtype} @ {clients}"] = ratio(name, f"static-{dtype}")
        ratios[f"{name} / peft @ {clients}"] = ratio(name, "peft")
    for system in sorted(s for s in at if ray_replicas(s)):
        ratios[f"{system} / mixed @ {clients}"] = ratio(system, "mixed")
    return {k: v for k, v in ratios.items() if v is not None or "mixed /" in k}


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
