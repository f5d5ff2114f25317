"""The engine on a GPU: model shapes x clients x tasks, mixed (the engine) vs static (HF generate batches).

Models are built from configs with random weights on the device (speed does not depend on the values, and nothing
has to travel). For each shape it reports tok/s, p50/p95 inter-token latency and the engine's median step, next to
the time to read the weights once from memory (weight bytes / bandwidth measured here with a device copy): a decode
step at 32 rows should take within 2x of that read. Where the largest shape's step at 32 rows does not, a
torch.profiler summary of a few steps says where the rest goes.

    python benchmarks/gpu/gpu_bench.py --out DIR                       # on a CUDA machine (benchmarks/gpu/check.sh)
    python benchmarks/gpu/gpu_bench.py --device cpu --shapes tiny ...  # the same code on a CPU (CI's test of it)

Writes DIR/gpu-bench.json and DIR/gpu-bench.png; stops starting new runs once --budget-s is spent (the runs left
out are listed as skipped), so a time-boxed machine always returns results.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from service.bench.report import write_json
from service.bench.run import run_engine_system
from service.bench.static_baseline import run_static_system
from service.bench.workload import make_workload, synthetic_tokenizer, task_ids, token_range
from service.geometry import geometry_from_config
from service.model_loader import resolve_device, resolve_dtype
from service.prefix import TaskPrefix
from service.runner import ModelRunner
from service.startup import check_model

logger = logging.getLogger("gpu_bench")

# Public model shapes (their configs' geometry; weights random). "tiny" is for CPU runs of this script in CI.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0),
    "smollm2-1.7b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, intermediate_size=8192, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=130000.0),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=256, max_position_embeddings=512),
}  # fmt: skip
STEP_VS_READ_TARGET = 2.0  # a decode step at 32 rows within 2x the time to read the weights once
PROFILED_ROWS = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPUs that have it (the service's choice)")
    parser.add_argument("--shapes", default="smollm2-135m,smollm2-1.7b,llama-3-8b")
    parser.add_argument("--clients", default="32,128,256")
    parser.add_argument("--tasks", default="8,1000")
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--prompt-tokens", default="20-34")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--systems", default="static,mixed")
    parser.add_argument("--budget-s", type=float, default=330.0, help="start no new run after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: an 8B model never exists on the host
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_prefixes(model: torch.nn.Module, count: int, virtual_tokens: int, seed: int) -> dict[str, TaskPrefix]:
    """Unit-scale random K/V per task (what a PEFT adapter of N(0, 1) embeddings holds), made on the device."""
    g = geometry_from_config(model.config)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (g.num_layers, 2, g.num_kv_heads, virtual_tokens, g.head_dim)
    return {
        task: TaskPrefix(task, torch.randn(shape, generator=generator, device=device).to(dtype), f"random-{task}")
        for task in task_ids(count)  # the workload's task names
    }


def memory_read_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second a device copy moves (read + write counted): the ceiling a weight read can reach."""
    source = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm up
    _synchronize(device)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        target.copy_(source)
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    del source, target
    return 2 * nbytes / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(runner: ModelRunner, prefixes: dict[str, TaskPrefix], args: argparse.Namespace) -> dict[str, Any]:
    """torch.profiler over a few decode steps of PROFILED_ROWS rows (the engine's step, in this thread): the top
    operators by device time (CPU time on a CPU), and the step's wall time under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    from service.requests import GenerationRequest, SamplingParams
    from service.scheduling.slot_schedule import SlotLimits
    from service.scheduling.slots import SlotScheduler

    workload = make_workload(runner.tokenizer, num_requests=PROFILED_ROWS, num_tasks=min(8, len(prefixes)),
                             prompt_tokens=token_range(args.prompt_tokens), new_tokens=(64, 64), seed=args.seed + 7)
    scheduler = SlotScheduler(runner, SlotLimits(num_slots=PROFILED_ROWS, max_kv_tokens=1 << 30, step_token_budget=4096))
    batch = scheduler.batch
    for item in workload:
        batch.add(GenerationRequest(item.prompt_ids, prefixes[item.task_id],
                                    SamplingParams(max_new_tokens=item.max_new_tokens, ignore_eos=True)))
    while any(row.prefilling for row in batch.rows):
        scheduler.step()
    for _ in range(3):  # warm
        scheduler.step()
    steps = 5
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            scheduler.step()
        wall = (time.perf_counter() - started) / steps
    sort_key = "self_device_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, sort_key, 0), reverse=True)
    total = sum(getattr(e, sort_key, 0) for e in events) or 1
    return {
        "rows": PROFILED_ROWS,
        "step_s_profiled": round(wall, 6),
        "sorted_by": sort_key,
        "device_busy_share": round(total / 1e6 / (wall * steps), 3) if runner.device.type == "cuda" else None,
        "top": [
            {"op": e.key, "calls": e.count, "self_ms_per_step": round(getattr(e, sort_key, 0) / 1000 / steps, 3),
             "share": round(getattr(e, sort_key, 0) / total, 4)}
            for e in events[:20]
        ],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
    clients = [int(c) for c in args.clients.split(",") if c]
    task_counts = [int(t) for t in args.tasks.split(",") if t]
    systems = [s for s in args.systems.split(",") if s]
    bandwidth = memory_read_bandwidth(device)
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "environment": {
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "memory_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        },
        "runs": [], "shapes": {}, "skipped": [],
    }
    for shape in shapes:
        if time.monotonic() - started > args.budget_s:
            report["skipped"].append({"shape": shape, "why": "time budget spent"})
            continue
        model = build_model(shape, device, dtype)
        runner = ModelRunner(model, synthetic_tokenizer(model.config.vocab_size))
        layout = check_model(runner, geometry_from_config(model.config))  # every start-up check
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        read_s = weight_bytes / bandwidth
        prefixes = random_prefixes(model, max(task_counts), args.virtual_tokens, args.seed)
        info: dict[str, Any] = {
            "parameters": sum(p.numel() for p in model.parameters()), "weight_bytes": weight_bytes,
            "weight_read_s": round(read_s, 6), "layout": layout,
        }
        logger.info("%s: %.2f B params, weights read once in %.2f ms", shape, info["parameters"] / 1e9, read_s * 1e3)
        for tasks in task_counts:
            for concurrency in clients:
                if time.monotonic() - started > args.budget_s:
                    report["skipped"].append({"shape": shape, "tasks": tasks, "clients": concurrency,
                                              "why": "time budget spent"})
                    continue
                workload = make_workload(runner.tokenizer, num_requests=concurrency, num_tasks=tasks,
                                         prompt_tokens=token_range(args.prompt_tokens),
                                         new_tokens=(args.new_tokens, args.new_tokens), seed=args.seed)
                warmup = make_workload(runner.tokenizer, num_requests=min(concurrency, 8), num_tasks=tasks,
                                       prompt_tokens=(8, 8), new_tokens=(2, 2), seed=args.seed + 1)
                for system in systems:
                    if system == "static":
                        result = run_static_system("static", runner, prefixes, workload, concurrency=concurrency,
                                                   warmup=warmup)
                    else:
                        # Prefill of new rows must not starve behind hundreds of decoding rows: a budget of a few
                        # tokens per client (a GPU step costs the same for 128 or 1,024 tokens at these sizes).
                        result = run_engine_system(system, runner, prefixes, workload, concurrency=concurrency,
                                                   policy="mixed", warmup=warmup,
                                                   step_token_budget=max(512, 4 * concurrency))
                    summary = result.summary()
                    row = {"shape": shape, "tasks": tasks, **summary}
                    if summary.get("step_p50_s"):
                        row["step_vs_weight_read"] = round(summary["step_p50_s"] / read_s, 2)
                    report["runs"].append(row)
                    logger.info("%s", row)
        at_32 = [r for r in report["runs"] if r["shape"] == shape and r["system"] == "mixed"
                 and r["concurrency"] == PROFILED_ROWS and r.get("step_vs_weight_read")]
        if at_32:
            info["step_vs_weight_read_at_32"] = min(r["step_vs_weight_read"] for r in at_32)
            info["within_target"] = info["step_vs_weight_read_at_32"] <= STEP_VS_READ_TARGET
            if shape == shapes[-1] and not info["within_target"] and time.monotonic() - started < args.budget_s:
                info["profile"] = profile_steps(runner, prefixes, args)
        report["shapes"][shape] = info
        del model, runner, prefixes
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["wall_s"] = round(time.monotonic() - started, 1)
    return report


def plot(path: Path, report: dict[str, Any]) -> None:
    """tok/s against clients, one panel per shape, a line per system and task count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(report["shapes"]) or ["(none)"]
    figure, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for axis, shape in zip(axes[0], shapes):
        runs = [r for r in report["runs"] if r["shape"] == shape]
        for key in sorted({(r["system"], r["tasks"]) for r in runs}):
            points = sorted((r for r in runs if (r["system"], r["tasks"]) == key), key=lambda r: r["concurrency"])
            axis.plot([p["concurrency"] for p in points], [p["tokens_per_s"] for p in points], marker="o",
                      label=f"{key[0]}, {key[1]} tasks")
        axis.set_title(shape)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel("generated tokens / s")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    env = report["environment"]
    figure.suptitle(f"prefix-serve on {env['gpu'] or env['device']} ({env['dtype']})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    write_json(args.out / "gpu-bench.json", report)
    plot(args.out / "gpu-bench.png", report)
    logger.info("wrote %s and %s", args.out / "gpu-bench.json", args.out / "gpu-bench.png")
    print(json.dumps({"shapes": report["shapes"], "skipped": report["skipped"]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
