"""Where a busy decode step's time goes: torch.profiler over decode steps of the engine's slot layout at 32 running
rows, and over the bare HF model's decode step at the same batch as a reference.

    PYTHONPATH=. .venv/bin/python benchmarks/profile_step.py --dtype bfloat16 --rows 32 \
        --out benchmarks/results/profile-step-cpu.json

The slot step is the engine's own (`schedule_step`, then `service.slots.SlotBatch.execute`: plan, one forward
through the slot attention, token selection), with 32 rows admitted at once, each behind one of 8 random V=20 task prefixes, prompts of 20-34
tokens, prefilled before the profile starts. The reference is `model(...)` on one new token per row with a
`DynamicCache` holding the same number of columns (prefix + prompt), HF's sdpa attention, then argmax.

Time per step is split by where each operator ran (the innermost range this script wraps around it) and else by its
name: GEMMs (aten::mm/addmm/linear/matmul outside the attention), attention (inside the model's attention function),
KV cache update (inside `cache.update`), norms, rotary (embedding + application), activations, sampling (token
selection), step planning (slot layout: building the step's index tensors), other operators (embedding, residual
adds, the MLP's product, copies), and Python between kernels = the step's wall time minus every operator's self time.
Host syncs: calls of aten::item / aten::_local_scalar_dense (on a CPU no device waits; a `.tolist()` of a CPU tensor
is no operator at all). Unprofiled wall times (median of `--steps` steps) are reported beside the profiled split.
Every computing phase runs in a thread that then exits (`service.compute_thread`: one OpenMP team at a time).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile
from transformers import AttentionInterface, DynamicCache
from transformers.models.llama import modeling_llama

from service import llama_forward
from service import slots as slots_module
from service.attention import SlotCache
from service.bench.workload import make_workload, write_random_prefixes
from service.compute_thread import run_in_fresh_thread
from service.model_loader import LoadedModel, load_base_model
from service.registry import PrefixRegistry
from service.requests import GenerationRequest, SamplingParams
from service.runner import ModelRunner
from service.settings import Settings
from service.scheduling.slot_schedule import SlotLimits, schedule_step
from service.slots import SlotBatch
from service.startup import check_model

logger = logging.getLogger("profile_step")

TAG = "ps::"
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm"}
SYNC_OPS = {"aten::item", "aten::_local_scalar_dense"}
CATEGORIES = ("gemm", "attention", "kv_update", "norm", "rotary", "activation", "sampling", "plan", "other_ops",
              "python_between_kernels")  # fmt: skip


def _ranged(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(TAG + name):
            return fn(*args, **kwargs)

    return wrapper


def instrument(model: torch.nn.Module, attn_implementation: str) -> None:
    """Wrap the parts of a step in named profiler ranges (this process only; nothing is changed on disk)."""
    original = AttentionInterface._global_mapping[attn_implementation]
    AttentionInterface._global_mapping[attn_implementation] = _ranged("attention", original)
    modeling_llama.apply_rotary_pos_emb = _ranged("rotary", modeling_llama.apply_rotary_pos_emb)
    # The slot layout's own llama forward calls both by the names it imported.
    llama_forward.slot_attention = _ranged("attention", llama_forward.slot_attention)
    llama_forward.apply_rotary_pos_emb = _ranged("rotary", llama_forward.apply_rotary_pos_emb)
    SlotCache.update = _ranged("kv_update", SlotCache.update)
    DynamicCache.update = _ranged("kv_update", DynamicCache.update)
    slots_module.select_tokens = _ranged("sampling", slots_module.select_tokens)
    SlotBatch._plan = _ranged("plan", SlotBatch._plan)
    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm"):
            module.forward = _ranged("norm", module.forward)
        elif kind.endswith("RotaryEmbedding"):
            module.forward = _ranged("rotary", module.forward)
        elif kind.endswith("MLP"):
            module.act_fn = _ActivationRange(module.act_fn)


class _ActivationRange(torch.nn.Module):
    def __init__(self, act: torch.nn.Module) -> None:
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with record_function(TAG + "activation"):
            return self.act(x)


def split(prof: Any, steps: int) -> dict[str, Any]:
    """Milliseconds per step by category, from the profile's events."""
    totals: dict[str, float] = defaultdict(float)
    op_self = 0.0
    syncs = 0
    sync_us = 0.0
    wall = 0.0
    top: dict[str, float] = defaultdict(float)
    for event in prof.events():
        name = event.name
        if name == TAG + "step":
            wall += event.cpu_time_total
            continue
        if name.startswith(TAG):
            continue
        self_us = event.self_cpu_time_total
        op_self += self_us
        top[name] += self_us
        if name in SYNC_OPS:
            syncs += 1
            sync_us += self_us
        parent, category = event.cpu_parent, None
        while parent is not None:
            if parent.name.startswith(TAG) and parent.name != TAG + "step":
                category = parent.name[len(TAG):]
                break
            parent = parent.cpu_parent
        if category is None:
            category = "gemm" if name in GEMM_OPS else "other_ops"
        totals[category] += self_us
    totals["python_between_kernels"] = wall - op_self
    per_step = {c: round(totals.get(c, 0.0) / steps / 1000, 3) for c in CATEGORIES}
    return {
        "profiled_step_ms": round(wall / steps / 1000, 3),
        "ms_per_step": per_step,
        "share": {c: round(v / (wall / steps / 1000), 3) for c, v in per_step.items()} if wall else {},
        "host_syncs_per_step": syncs / steps,
        "host_sync_ms_per_step": round(sync_us / steps / 1000, 4),
        "top_ops_ms_per_step": {k: round(v / steps / 1000, 3) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]},
    }


def _timed_and_profiled(step: Callable[[], None], steps: int, warmup: int) -> dict[str, Any]:
    for _ in range(warmup):
        step()
    walls = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        walls.append(time.perf_counter() - started)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function(TAG + "step"):
                step()
    return {"wall_ms_median": round(statistics.median(walls) * 1000, 3),
            "wall_ms_range": [round(min(walls) * 1000, 3), round(max(walls) * 1000, 3)], **split(prof, steps)}  # fmt: skip


def profile_slot_step(runner: ModelRunner, requests: list[GenerationRequest], steps: int, warmup: int) -> dict[str, Any]:
    budget = sum(r.reserved_kv_tokens for r in requests) * 2 + 4096
    limits = SlotLimits(num_slots=len(requests), max_kv_tokens=budget, step_token_budget=128)
    batch = SlotBatch(runner, limits.num_slots)
    rows = [batch.add(r) for r in requests]
    while any(r.prefilling for r in rows):  # prefill (idle budget: one or two big steps)
        batch.execute(schedule_step(batch.rows, limits))

    def step() -> None:  # what the engine's SlotScheduler.step runs: schedule, then execute
        batch.execute(schedule_step(batch.rows, limits))

    result = _timed_and_profiled(step, steps, warmup)
    assert all(not r.finished and not r.prefilling for r in rows), "rows finished during the profile: raise new tokens"
    result["rows"] = len(rows)
    result["kv_columns_at_end"] = [min(r.cached for r in rows), max(r.cached for r in rows)]
    return result


@torch.inference_mode()
def profile_hf_step(runner: ModelRunner, rows: int, columns: int, steps: int, warmup: int) -> dict[str, Any]:
    model = runner.model
    cache = DynamicCache()
    top = min(1000, model.config.vocab_size)  # ordinary ids of any vocabulary
    ids = torch.randint(10, top, (rows, columns))
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    state = {"position": columns, "next": torch.randint(10, top, (rows, 1))}

    def step() -> None:
        position = state["position"]
        out = model(input_ids=state["next"], cache=cache, use_cache=True,
                    position_ids=torch.full((rows, 1), position), cache_position=torch.tensor([position]))  # fmt: skip
        with record_function(TAG + "sampling"):
            state["next"] = out.logits[:, -1].argmax(-1, keepdim=True)
        state["position"] = position + 1

    result = _timed_and_profiled(step, steps, warmup)
    result["rows"] = rows
    result["kv_columns_at_start"] = columns
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile-step-cpu.json"))
    parser.add_argument("--note", default="", help="What else ran on the machine (recorded in the JSON).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    loaded: LoadedModel = run_in_fresh_thread(load_base_model, Settings(device="cpu", dtype=args.dtype))
    runner = ModelRunner(loaded.model, loaded.tokenizer)
    run_in_fresh_thread(check_model, runner, loaded.geometry)  # installs the slot attention, as the server does
    new_tokens = args.warmup + 2 * args.steps + 8  # rows must still be decoding when the profile ends
    workload = make_workload(loaded.tokenizer, num_requests=args.rows, num_tasks=args.tasks, prompt_tokens=(20, 34),
                             new_tokens=(new_tokens, new_tokens), seed=0)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        adapters = write_random_prefixes(Path(tmp) / "adapters", loaded.geometry, num_tasks=args.tasks,
                                         num_virtual_tokens=args.virtual_tokens, model_name=loaded.name)  # fmt: skip
        registry = PrefixRegistry(Path(tmp) / "store", loaded.geometry, device=loaded.device, dtype=loaded.dtype,
                                  served_model_name=loaded.name, max_virtual_tokens=args.virtual_tokens,
                                  max_prefix_bytes=1 << 31, max_config_bytes=1 << 20)  # fmt: skip
        for task, adapter_dir in adapters.items():
            registry.put(task, (adapter_dir / "adapter_config.json").read_bytes(),
                         (adapter_dir / "adapter_model.safetensors").read_bytes())  # fmt: skip
        prefixes = {task: registry.get(task) for task in adapters}
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    requests = [GenerationRequest(item.prompt_ids, prefixes[item.task_id], params) for item in workload]

    slot_attn = loaded.model.config._attn_implementation
    instrument(loaded.model, slot_attn)
    slot = run_in_fresh_thread(profile_slot_step, runner, requests, args.steps, args.warmup)
    logger.info("slot step: %s", json.dumps(slot))
    # The reference: HF's own sdpa attention and DynamicCache on the same weights.
    columns = args.virtual_tokens + round(sum(len(i.prompt_ids) for i in workload) / len(workload))
    loaded.model.config._attn_implementation = "sdpa"
    instrument_sdpa = AttentionInterface._global_mapping["sdpa"]
    AttentionInterface._global_mapping["sdpa"] = _ranged("attention", instrument_sdpa)
    try:
        reference = run_in_fresh_thread(profile_hf_step, runner, args.rows, columns, args.steps, args.warmup)
    finally:
        loaded.model.config._attn_implementation = slot_attn
    logger.info("HF step: %s", json.dumps(reference))
    payload = {
        "title": f"{loaded.name}, {args.dtype}, {args.rows} rows, decode steps, {torch.get_num_threads()} torch threads",
        "command": "python benchmarks/profile_step.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "note")),
        "note": args.note,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                        "cpu": platform.processor() or platform.machine()},
        "slot_layout_step": slot,
        "hf_reference_step": reference,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(table(slot, reference))
    print(f"wrote {args.out}")


def table(slot: dict[str, Any], reference: dict[str, Any]) -> str:
    lines = ["| ms per step | slot layout (engine) | bare HF model |", "|---|---|---|",
             f"| wall, unprofiled (median) | {slot['wall_ms_median']} | {reference['wall_ms_median']} |",
             f"| wall, profiled | {slot['profiled_step_ms']} | {reference['profiled_step_ms']} |"]  # fmt: skip
    for category in CATEGORIES:
        a, b = slot["ms_per_step"][category], reference["ms_per_step"][category]
        lines.append(f"| {category.replace('_', ' ')} | {a} ({slot['share'][category]:.0%}) | "
                     f"{b} ({reference['share'][category]:.0%}) |")  # fmt: skip
    lines.append(f"| host syncs per step | {slot['host_syncs_per_step']} | {reference['host_syncs_per_step']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
