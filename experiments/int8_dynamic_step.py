"""Do int8 weights pay for a decode step on this CPU? float32 vs bfloat16 vs dynamic int8 (torch's own
`torch.ao.quantization.quantize_dynamic`: every `nn.Linear`, the tied LM head included, int8 weights, activations
quantized per step; no extra package; per-tensor weight scales, then the LM head left in float32, then per-channel
scales), bare model, B rows.

    PYTHONPATH=. .venv/bin/python experiments/int8_dynamic_step.py --rows 32 \
        --out benchmarks/results/int8-dynamic-step-cpu.json

The embedded SmolLM2-135M (or `--model DIR`) prefills `--prompt` random tokens per row, then decodes one token per
row per step with a `DynamicCache` cropped back after each step (every timed step sees the same cache length). The
arms are timed in turns, `--rounds` rounds of `--steps` steps, so a busy moment of the machine hits every arm alike;
the table is each arm's median step and range. Each int8 arm's first-step greedy tokens are compared with float32's
(rows agreeing). This is the lever's ceiling on the bare model, before any wiring into the engine.

Weight-only int8 (bfloat16 activations, int8 weights with a scale per output channel) is measured per linear shape
of the model: `torch._weight_int8pack_mm`, aten's CPU kernel for it (what gpt-fast's and torchao's int8 weight-only
paths reach on a CPU), against the bfloat16 `F.linear` on the same `--rows` activations.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import platform
import statistics
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import DynamicCache

from experiments.timing import time_in_turns, write_result
from service.model_loader import load_base_model
from service.settings import Settings

logger = logging.getLogger("int8_dynamic_step")
INT8_ENGINES = ("x86", "fbgemm", "onednn")


@torch.inference_mode()
def decode_step(model: torch.nn.Module, rows: int, prompt: int, engine: str | None) -> tuple[Callable[[], Any], list]:
    """A step function over a prefilled cache, and the greedy first tokens of the prefill."""
    if engine:
        torch.backends.quantized.engine = engine
    ids = torch.randint(10, 40000, (rows, prompt), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    token = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def step() -> None:
        if engine:
            torch.backends.quantized.engine = engine
        model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
        cache.crop(-1)  # back to the prefill's length: every step the same work

    return step, token[:, 0].tolist()


def weight_only_int8(model: torch.nn.Module, rows: int, rounds: int, calls: int = 50) -> list[dict[str, Any]]:
    """Per distinct linear shape: microseconds of bfloat16 F.linear vs the int8 weight-only kernel, in turns."""
    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    generator = torch.Generator().manual_seed(0)
    results = []
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features, generator=generator) * 0.02
        x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
        scales = (weight.abs().amax(1) / 127).clamp(min=1e-8)
        quantized = torch.round(weight / scales[:, None]).clamp(-128, 127).to(torch.int8)
        arms = {
            "bfloat16": functools.partial(torch.nn.functional.linear, x, weight.to(torch.bfloat16)),
            "int8_weight_only": functools.partial(torch._weight_int8pack_mm, x, quantized, scales.to(torch.bfloat16)),
        }
        times = time_in_turns(arms, rounds, calls)
        bf16, int8 = (statistics.median(times[name]) * 1e6 for name in arms)
        results.append({"shape": [out_features, in_features], "bfloat16_us": round(bf16, 1),
                        "int8_weight_only_us": round(int8, 1), "speed_vs_bfloat16": round(bf16 / int8, 3)})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="A model folder (default: the embedded SmolLM2-135M).")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=60)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings(dtype="float32", device="cpu", **({"model": args.model} if args.model else {}))
    base = load_base_model(settings).model
    models: dict[str, tuple[torch.nn.Module, str | None]] = {
        "float32": (base, None), "bfloat16": (copy.deepcopy(base).to(torch.bfloat16), None),
    }
    for engine in INT8_ENGINES:
        if engine in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = engine
            quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {torch.nn.Linear}, torch.qint8)
            models[f"int8-{engine}"] = (quantized, engine)
    if "int8-fbgemm" in models:  # the LM head (the tied embedding, a wide range) kept in float32
        torch.backends.quantized.engine = "fbgemm"
        layers_only = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {torch.nn.Linear}, torch.qint8)
        layers_only.lm_head = base.lm_head
        models["int8-fbgemm-float32-head"] = (layers_only, "fbgemm")
        per_channel = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(base), {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
        )
        models["int8-fbgemm-per-channel"] = (per_channel, "fbgemm")
    steps, first_tokens = {}, {}
    for name, (model, engine) in models.items():
        steps[name], first_tokens[name] = decode_step(model, args.rows, args.prompt, engine)
    times = {name: [t * 1000 for t in values] for name, values in time_in_turns(steps, args.rounds, args.steps).items()}
    reference = first_tokens["float32"]
    result: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "rows": args.rows, "prompt": args.prompt, "steps": args.steps,
        "rounds": args.rounds,
        "arms": {
            name: {
                "ms_per_step_median": round(statistics.median(values), 1),
                "ms_per_step_range": [round(min(values), 1), round(max(values), 1)],
                "first_tokens_equal_to_float32": sum(a == b for a, b in zip(first_tokens[name], reference)),
            }
            for name, values in times.items()
        },
    }
    result["weight_only_int8_linear"] = weight_only_int8(base, args.rows, args.rounds)
    bf16 = result["arms"]["bfloat16"]["ms_per_step_median"]
    for arm in result["arms"].values():
        arm["speed_vs_bfloat16"] = round(bf16 / arm["ms_per_step_median"], 3)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
