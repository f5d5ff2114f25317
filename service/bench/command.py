"""`prefix-serve bench`'s run: load the model(s), run every system on the seeded workload, write the table, JSON and
plot. The command's flags and its description are in `service.bench.cli`; this module needs the `bench` extra."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from service.bench import SYSTEMS
from service.bench import llama_cpp
from service.bench.machine import CpuWatch, wait_until_quiet
from service.bench.peft_baseline import load_peft_model
from service.bench.report import markdown_table, median_rows, plot, ratios_table, write_json
from service.bench.ray_system import ray_replicas, run_ray_system
from service.bench.run import run_engine_system, run_peft_system
from service.bench.static_baseline import run_static_system
from service.compute_thread import run_in_fresh_thread
from service.runner import ModelRunner
from service.startup import check_model
from service.bench.workload import (
    WorkItem,
    make_workload,
    synthetic_tokenizer,
    token_range,
    write_random_prefixes,
    write_text_prefixes,
)
from service.logging_setup import configure_logging
from service.model_loader import (
    LoadedModel,
    embedded_model_dir,
    load_base_model,
    resolve_device,
    resolve_dtype,
    wrap_model,
)
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
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request to the llama.cpp peer
    systems = [s for s in args.systems.split(",") if s]
    unknown = {s for s in systems if s not in SYSTEMS and ray_replicas(s) is None and s != llama_cpp.SYSTEM}
    if unknown:
        print(f"error: unknown systems {sorted(unknown)}; choose from {SYSTEMS}, {llama_cpp.SYSTEM} or ray-N",
              file=sys.stderr)  # fmt: skip
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
    if args.rounds < 1:
        print(f"error: --rounds {args.rounds}: run at least one round", file=sys.stderr)
        return 2
    with_llama = llama_cpp.SYSTEM in systems
    if with_llama:
        problem = _check_llama_args(args)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        if threading.current_thread() is threading.main_thread():  # a SIGTERM unwinds, so the server is stopped
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
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
    rows: list[dict[str, Any]] = []  # one per run (rounds included)
    results: list[dict[str, Any]] = []
    llama_info: dict[str, Any] = {}

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        first: LoadedModel | None = None
        for index, dtype in enumerate(dtypes):
            # Every computing step outside the engine runs in a thread that exits (service.compute_thread).
            loaded, runner, adapters, prefixes, task_tokens = run_in_fresh_thread(
                _prepare, args, dtype, Path(tmp), index, with_llama
            )
            first = first or loaded
            suffix = "" if index == 0 else "-" + str(loaded.dtype).removeprefix("torch.")
            jobs: list[tuple[str, int, Callable[[], Any]]] = []
            for concurrency in concurrencies:
                workload, warmup = _workloads(args, loaded, concurrency)
                if "static" in systems:
                    jobs.append(("static" + suffix, concurrency, _job(
                        run_in_fresh_thread, run_static_system, "static" + suffix, runner, prefixes, workload,
                        concurrency=concurrency, warmup=warmup,
                    )))  # fmt: skip
                for system, policy, use_prefix in ENGINE_SYSTEMS:
                    if system in systems:
                        jobs.append((system + suffix, concurrency, _job(
                            run_engine_system, system + suffix, runner, prefixes, workload, concurrency=concurrency,
                            policy=policy, use_prefix=use_prefix, warmup=warmup,
                            step_token_budget=args.step_token_budget,
                        )))  # fmt: skip
            if with_llama and index == 0:  # at --clients, against the first dtype's rows
                server = stack.enter_context(_start_llama_server(args, llama_info))
                # Warm-up: one request per slot (other prompts, the same task texts), so the first timed round does
                # not pay each slot's first use (measured: the first round ran 25-40% slower without it).
                workload, warmup = _workloads(args, loaded, args.clients, warmup_requests=args.clients)
                llama_info["greedy_agreement"] = run_in_fresh_thread(
                    _greedy_agreement, runner, prefixes, task_tokens, workload, server.url
                )
                jobs.append((llama_cpp.SYSTEM, args.clients, _job(
                    llama_cpp.run_llama_cpp_system, llama_cpp.SYSTEM, server.url, task_tokens, workload,
                    concurrency=args.clients, warmup=warmup,
                )))  # fmt: skip
            peer_pids = (server.pid,) if with_llama and index == 0 and server.pid else ()
            for round_index in range(args.rounds):  # alternate the order: no system always runs first or last
                for _, _, job in jobs if round_index % 2 == 0 else reversed(jobs):
                    busy_before = wait_until_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
                    watch = CpuWatch.start(*peer_pids)
                    result = job()
                    own_cpu_s = watch.own_cpu_s()
                    tokens = sum(t.generated_tokens for t in result.timings)
                    machine = {"other_cores_busy": watch.other_cores_busy(), "other_cores_busy_before": busy_before,
                               "own_cpu_s": own_cpu_s, "peer_cpu_s": watch.peer_cpu_s() if peer_pids else None,
                               "tokens_per_cpu_s": round(tokens / own_cpu_s, 2) if own_cpu_s > 0 else None}
                    _record(result, rows, results, round_index, machine)
            for system in ray_systems if index == 0 else []:  # at --clients, in the first dtype, once
                workload, warmup = _workloads(args, loaded, args.clients)
                ray_settings = Settings(model=args.model, device=args.device, dtype=dtype,
                                        prefix_dir=Path(tmp) / f"store-{index}", **({"cache_dir": args.cache_dir}
                                                                                     if args.cache_dir else {}))
                result = run_ray_system(system, ray_replicas(system) or 1, ray_settings, prefixes, workload,
                                        concurrency=args.clients, warmup=warmup)
                _record(result, rows, results, None)
            if "peft" in systems and index == 0:  # last: PEFT wraps (and patches) the base model for good
                workload, warmup = _workloads(args, loaded, args.clients)
                peft_model = run_in_fresh_thread(load_peft_model, loaded.model, adapters)
                result = run_peft_system("peft", peft_model, workload, concurrency=args.clients, warmup=warmup[:2])
                _record(result, rows, results, None)
            del runner, loaded

    assert first is not None
    ratios, ratio_ranges = _ratios_over_rounds(rows, args.clients, dtypes, args.rounds)
    table_rows = median_rows(rows)
    rounds_note = f", median of {args.rounds} alternating rounds" if args.rounds > 1 else ""
    title = (f"{first.name} on {first.device} ({', '.join(dtypes)}), {args.tasks} tasks, V={args.virtual_tokens}, "
             f"prompts {args.prompt_tokens}, new tokens {args.new_tokens}, {torch.get_num_threads()} torch threads"
             f"{rounds_note}")  # fmt: skip
    payload = {
        "title": title,
        "command": " ".join(["prefix-serve", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else None,
        "environment": _environment(first),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
        "rows": table_rows,
        "ratios": ratios,
        "ratio_ranges": ratio_ranges,
        "runs": results,
    }
    if llama_info:
        payload["llama_cpp"] = llama_info
    write_json(args.out / "bench.json", payload)
    table = markdown_table(table_rows) + "\n\n" + ratios_table(ratios, ratio_ranges)
    (args.out / "bench.md").write_text(f"{title}\n\n{table}\n")
    plot(args.out / "bench.png", table_rows, title)
    print(f"{title}\n\n{table}\n\nwrote {args.out / 'bench.json'}, {args.out / 'bench.md'}, {args.out / 'bench.png'}")
    return 0


def _job(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
    return lambda: function(*args, **kwargs)


def _check_llama_args(args: argparse.Namespace) -> str | None:
    """Why the llama.cpp system cannot run with these flags (checked before any model loads), or None."""
    if args.llama_server is None or not args.llama_server.is_file():
        return f"the {llama_cpp.SYSTEM} system needs --llama-server PATH, a built llama-server binary (got {args.llama_server})"
    if args.llama_gguf is None:
        return f"the {llama_cpp.SYSTEM} system needs --llama-gguf PATH (an existing GGUF, or where to write one with --llama-convert)"
    if args.llama_gguf.exists():
        return None
    if args.llama_convert is None:
        return f"--llama-gguf {args.llama_gguf} does not exist: give an existing GGUF or --llama-convert SCRIPT to make it"
    if not args.llama_convert.is_file():
        return f"--llama-convert {args.llama_convert}: no such file (llama.cpp's convert_hf_to_gguf.py)"
    if args.llama_outtype not in llama_cpp.OUTTYPES:
        return f"--llama-outtype {args.llama_outtype!r}: choose from {', '.join(llama_cpp.OUTTYPES)}"
    if args.random_init is not None:
        return "--random-init models have no directory to convert: save the model, pass it as --model DIR, or give --llama-gguf"
    if args.model is not None and not Path(args.model).is_dir():
        return f"--model {args.model}: only a Hugging Face model directory can be converted to GGUF here"
    return None


def _start_llama_server(args: argparse.Namespace, info: dict[str, Any]) -> llama_cpp.LlamaServer:
    gguf = args.llama_gguf
    if not gguf.exists():
        if args.model is not None:
            model_dir = Path(args.model)
        else:
            model_dir = embedded_model_dir(args.cache_dir or Settings().cache_dir)
        llama_cpp.convert_to_gguf(args.llama_convert, model_dir, args.llama_outtype, gguf)
        info["converted_from"] = str(model_dir)
        info["outtype"] = args.llama_outtype
    port = llama_cpp.free_port()
    command = llama_cpp.server_command(args.llama_server, gguf, port, parallel=args.clients,
                                       threads=torch.get_num_threads(), extra=args.llama_args)  # fmt: skip
    info.update({"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "server_command": command})
    return llama_cpp.LlamaServer(command, port, args.out / "llama-server.log")


def _greedy_agreement(
    runner: ModelRunner, prefixes: dict[str, TaskPrefix], task_tokens: dict[str, list[int]], workload: list[WorkItem],
    url: str, count: int = 4, new_tokens: int = 8,
) -> str:
    """Greedy tokens of the first `count` requests on both sides (a check that both compute the same thing; in bf16
    rounding may still part them after a few tokens): "k/n identical"."""
    import httpx

    from service.batch import generate
    from service.requests import GenerationRequest, SamplingParams

    items = [WorkItem(w.task_id, w.prompt_ids, new_tokens) for w in workload[:count]]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ours = generate(runner, [GenerationRequest(w.prompt_ids, prefixes[w.task_id], params) for w in items])
    identical = 0
    for item, result in zip(items, ours):
        body = llama_cpp.completion_body(task_tokens[item.task_id], item)
        theirs = httpx.post(url + "/completion", json=body, timeout=120.0).json().get("tokens", [])
        identical += list(result.token_ids) == list(theirs)
        logger.info("greedy %s: prefix-serve %s llama.cpp %s", item.task_id, list(result.token_ids), theirs)
    return f"{identical}/{len(items)} identical"


def _prepare(
    args: argparse.Namespace, dtype: str, tmp: Path, index: int, text_tasks: bool
) -> tuple[LoadedModel, ModelRunner, dict[str, Path], dict[str, TaskPrefix], dict[str, list[int]]]:
    """Load the model in `dtype`, check it, write the task prefixes (random, or made from text when a peer without
    stored prefixes runs: the same text is then sent in front of its prompts) and load them as the registry does."""
    loaded = _load(args, dtype)
    runner = ModelRunner(loaded.model, loaded.tokenizer)
    check_model(runner, loaded.geometry)  # every start-up check, here rather than in the caller's thread
    task_tokens: dict[str, list[int]] = {}
    if text_tasks:
        adapters, task_tokens = write_text_prefixes(
            tmp / f"adapters-{index}", loaded.model, loaded.tokenizer, loaded.geometry, num_tasks=args.tasks,
            num_virtual_tokens=args.virtual_tokens, model_name=loaded.name, seed=args.seed,
        )  # fmt: skip
    else:
        adapters = write_random_prefixes(
            tmp / "adapters", loaded.geometry, num_tasks=args.tasks, num_virtual_tokens=args.virtual_tokens,
            model_name=loaded.name, seed=args.seed,
        )
    prefixes = _prefixes(tmp / f"store-{index}", loaded, adapters, args.virtual_tokens)
    return loaded, runner, adapters, prefixes, task_tokens


def _prefixes(store: Path, loaded: LoadedModel, adapters: dict[str, Path], virtual_tokens: int) -> dict[str, TaskPrefix]:
    registry = PrefixRegistry(
        store, loaded.geometry, device=loaded.device, dtype=loaded.dtype, served_model_name=loaded.name,
        max_virtual_tokens=max(virtual_tokens, 1), max_prefix_bytes=1 << 31, max_config_bytes=1 << 20,
    )
    for task_id, adapter_dir in adapters.items():
        registry.put(task_id, (adapter_dir / "adapter_config.json").read_bytes(),
                     (adapter_dir / "adapter_model.safetensors").read_bytes())
    return {t: registry.get(t) for t in adapters}


def _workloads(
    args: argparse.Namespace, loaded: LoadedModel, concurrency: int, warmup_requests: int | None = None
) -> tuple[list[WorkItem], list[WorkItem]]:
    workload = make_workload(
        loaded.tokenizer, num_requests=max(args.min_requests, args.requests_per_client * concurrency),
        num_tasks=args.tasks, prompt_tokens=token_range(args.prompt_tokens), new_tokens=token_range(args.new_tokens),
        seed=args.seed,
    )
    warmup = make_workload(loaded.tokenizer, num_requests=warmup_requests or min(concurrency, 8), num_tasks=args.tasks,
                           prompt_tokens=(8, 8), new_tokens=(2, 2), seed=args.seed + 1)
    return workload, warmup


def _record(
    result: Any, rows: list[dict[str, Any]], results: list[dict[str, Any]], round_index: int | None,
    machine: dict[str, Any] | None = None,
) -> None:
    """`round_index` None: a system run once, outside the rounds (peft, ray-N). `machine`: what else the machine
    did during the run (`service.bench.machine`)."""
    summary = {**result.summary(), "round": round_index, **(machine or {})}
    logger.info("%s", summary)
    rows.append(summary)
    results.append({**result.to_json(), "round": round_index, **(machine or {})})


def _ratios_over_rounds(
    rows: list[dict[str, Any]], clients: int, dtypes: list[str], rounds: int
) -> tuple[dict[str, float | None], dict[str, list[float]]]:
    """Each ratio taken within each round (systems run once count in every round), then its median over rounds and
    its range."""
    once = [r for r in rows if r["round"] is None]
    per_round = [_ratios(once + [r for r in rows if r["round"] == i], clients, dtypes) for i in range(rounds)]
    medians: dict[str, float | None] = {}
    ranges: dict[str, list[float]] = {}
    for key in per_round[0]:
        values = [p[key] for p in per_round if p.get(key) is not None]
        medians[key] = round(statistics.median(values), 3) if values else None
        if len(values) > 1:
            ranges[key] = [min(values), max(values)]
    return medians, ranges


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
    if llama_cpp.SYSTEM in at:
        ratios[f"mixed / {llama_cpp.SYSTEM} @ {clients}"] = ratio("mixed", llama_cpp.SYSTEM)
        ours, theirs = at.get("mixed", {}).get("tokens_per_cpu_s"), at[llama_cpp.SYSTEM].get("tokens_per_cpu_s")
        if ours and theirs:  # robust to other jobs on the cores: tokens per CPU second of each side's processes
            ratios[f"mixed / {llama_cpp.SYSTEM} per CPU second @ {clients}"] = round(ours / theirs, 3)
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
        if llama_cpp.SYSTEM in at:
            ratios[f"{name} / {llama_cpp.SYSTEM} @ {clients}"] = ratio(name, llama_cpp.SYSTEM)
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
