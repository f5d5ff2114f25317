"""Does torch.compile pay for a decode step on this CPU? Eager vs compiled bare-model step, B rows, static shapes.

    PYTHONPATH=. .venv/bin/python experiments/compile_step.py --dtype bfloat16 --rows 32 \
        --out benchmarks/results/compile-step-cpu.json

The embedded SmolLM2-135M (or `--model DIR`) decodes one token per row per step with a `StaticCache` of
`--cache-len` columns (so every step has the same shapes and one compiled graph serves them all), after a prefill of
`--prompt` random tokens per row. Three arms, each timed over `--steps` steps after its warm-up: eager with the
static cache, the same forward under `torch.compile` (inductor, `dynamic=False`; its compile time is reported), and
eager with a `DynamicCache` (what the engine's reference, HF `generate`, grows). The compiled arm's greedy tokens are
compared with the eager static arm's. Each arm runs in a thread that then exits (`service.compute_thread`).

This is the lever's ceiling on the bare model: the engine's slot step has a per-step plan (rows, prompt chunks, KV
width) that changes shape every step, so wiring compile into the service would need padded/bucketed shapes first.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import DynamicCache, StaticCache

from service.compute_thread import run_in_fresh_thread
from service.model_loader import load_base_model
from service.settings import Settings

logger = logging.getLogger("compile_step")


@torch.inference_mode()
def run_arm(model: torch.nn.Module, forward: Callable[..., Any], *, static: bool, rows: int, prompt: int,
            cache_len: int, steps: int, warmup: int, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 40000, (rows, prompt), generator=generator)
    cache = StaticCache(config=model.config, max_cache_len=cache_len) if static else DynamicCache()
    out = model(input_ids=ids, cache=cache, use_cache=True, cache_position=torch.arange(prompt), logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens, times = [], []
    first_call_s = None
    for i in range(warmup + steps):
        position = prompt + i
        started = time.perf_counter()
        out = forward(input_ids=token, cache=cache, use_cache=True, cache_position=torch.tensor([position]),
                      position_ids=torch.full((rows, 1), position))  # fmt: skip
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        elapsed = time.perf_counter() - started
        if i == 0:
            first_call_s = elapsed
        if i >= warmup:
            times.append(elapsed)
        tokens.append(token[:, 0].tolist())
    return {
        "step_ms_median": round(statistics.median(times) * 1000, 3),
        "step_ms_range": [round(min(times) * 1000, 3), round(max(times) * 1000, 3)],
        "tokens_per_s": round(rows / statistics.median(times), 1),
        "first_call_s": round(first_call_s or 0.0, 2),
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=48, help="Prefilled columns per row (prefix + prompt).")
    parser.add_argument("--cache-len", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compile-step-cpu.json"))
    parser.add_argument("--freezing", action="store_true",
                        help="Also a fourth arm: torch.compile with inductor's freezing (CPU inference: prepacked weights).")
    parser.add_argument("--note", default="", help="What else ran on the machine (recorded in the JSON).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.prompt + args.warmup + args.steps > args.cache_len:
        parser.error("--cache-len must hold --prompt + --warmup + --steps columns")

    loaded = run_in_fresh_thread(load_base_model, Settings(device="cpu", dtype=args.dtype, model=args.model))
    model = loaded.model
    model.config._attn_implementation = "sdpa"
    common = dict(rows=args.rows, prompt=args.prompt, cache_len=args.cache_len, steps=args.steps, warmup=args.warmup)
    eager = run_in_fresh_thread(run_arm, model, model, static=True, **common)
    logger.info("eager static: %s ms", eager["step_ms_median"])
    dynamic = run_in_fresh_thread(run_arm, model, model, static=False, **common)
    logger.info("eager dynamic cache: %s ms", dynamic["step_ms_median"])
    compiled_forward = torch.compile(model, dynamic=False)
    compiled = run_in_fresh_thread(run_arm, model, compiled_forward, static=True, **common)
    logger.info("compiled static: %s ms (first call %s s)", compiled["step_ms_median"], compiled["first_call_s"])
    frozen = None
    if args.freezing:  # inductor's CPU inference mode: weights as constants, prepacked for oneDNN's GEMMs
        import torch._inductor.config as inductor_config

        torch._dynamo.reset()
        inductor_config.freezing = True
        frozen_forward = torch.compile(model, dynamic=False)
        frozen = run_in_fresh_thread(run_arm, model, frozen_forward, static=True, **common)
        logger.info("compiled+frozen static: %s ms (first call %s s)", frozen["step_ms_median"], frozen["first_call_s"])

    def agreement(a: dict[str, Any], b: dict[str, Any]) -> str:
        """Greedy tokens equal, over (step, row) pairs; every arm feeds back its own tokens, so one difference
        changes that row from there on (bf16 near-ties on random prompts make that common)."""
        pairs = [(x, y) for sa, sb in zip(a["tokens"], b["tokens"]) for x, y in zip(sa, sb)]
        return f"{sum(x == y for x, y in pairs)}/{len(pairs)}"

    payload = {
        "title": f"{loaded.name}, {args.dtype}, {args.rows} rows, decode step, eager vs torch.compile, "
                 f"{torch.get_num_threads()} torch threads",  # fmt: skip
        "note": args.note,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version()},  # fmt: skip
        "eager_static": {k: v for k, v in eager.items() if k != "tokens"},
        "eager_dynamic_cache": {k: v for k, v in dynamic.items() if k != "tokens"},
        "compiled_static": {k: v for k, v in compiled.items() if k != "tokens"},
        "compiled_frozen_static": {k: v for k, v in frozen.items() if k != "tokens"} if frozen else None,
        "compiled_frozen_vs_eager_static": round(eager["step_ms_median"] / frozen["step_ms_median"], 3) if frozen else None,
        "compiled_vs_eager_static": round(eager["step_ms_median"] / compiled["step_ms_median"], 3),
        "compiled_vs_eager_dynamic": round(dynamic["step_ms_median"] / compiled["step_ms_median"], 3),
        "greedy_tokens_equal_compiled_vs_eager_static": agreement(eager, compiled),
        "greedy_tokens_equal_dynamic_vs_eager_static": agreement(eager, dynamic),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({k: v for k, v in payload.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
