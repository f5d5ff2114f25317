"""What would fused RMSNorm and SwiGLU save in a decode step? The model's own modules against torch's fused forms, at
the shapes one decode step of B rows runs them, bfloat16.

    PYTHONPATH=. .venv/bin/python experiments/fused_ops.py --rows 32 --out benchmarks/results/fused-ops-cpu.json

RMSNorm: transformers' `LlamaRMSNorm` (float32 upcast, mean of squares, rsqrt, cast back, scale) against
`torch.nn.functional.rms_norm` on the bfloat16 input (one kernel; its result differs from the module's by up to a
bfloat16 step), and against the same kernel on the float32 upcast (the module's numerics exactly). SwiGLU's activation:
`silu(gate) * up` as the MLP computes it. Each form is timed in turns over `--rounds` rounds of `--calls` calls; the
saving per step multiplies by the model's count of each (2 norms a layer + the final one; one activation a layer) and
is set against a measured bfloat16 decode step of the bare model at the same rows.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from experiments.timing import time_in_turns, write_result
from service.model_loader import load_base_model
from service.settings import Settings


def median_us(arms: dict[str, Callable[[], Any]], rounds: int, calls: int) -> dict[str, float]:
    times = time_in_turns(arms, rounds, calls)
    return {name: round(statistics.median(values) * 1e6, 1) for name, values in times.items()}


@torch.inference_mode()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = load_base_model(Settings(dtype="bfloat16", device="cpu")).model
    config = model.config
    hidden, intermediate, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    norm = next(m for m in model.modules() if isinstance(m, LlamaRMSNorm))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, 1, hidden, generator=generator).to(torch.bfloat16)
    gate, up = (torch.randn(args.rows, 1, intermediate, generator=generator).to(torch.bfloat16) for _ in range(2))
    eps = norm.variance_epsilon
    norm_arms = {
        "module": lambda: norm(x),
        "fused_bfloat16": lambda: F.rms_norm(x, (hidden,), norm.weight, eps),
        "fused_float32_upcast": lambda: norm.weight * F.rms_norm(x.float(), (hidden,), None, eps).to(x.dtype),
    }
    norm_us = median_us(norm_arms, args.rounds, args.calls)
    activation_us = median_us({"silu_times_up": lambda: F.silu(gate) * up}, args.rounds, args.calls)

    ids = torch.randint(10, 40000, (args.rows, 60), generator=generator)
    cache = DynamicCache()
    token = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)

    def step() -> None:
        model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
        cache.crop(-1)

    step_ms = median_us({"step": step}, args.rounds, 5)["step"] / 1000
    norms, activations = 2 * layers + 1, layers
    norm_save_ms = norms * (norm_us["module"] - norm_us["fused_bfloat16"]) / 1000
    result = {
        "rows": args.rows, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "rmsnorm_us": norm_us,
        "rmsnorm_max_abs_difference_fused_bfloat16": float((norm_arms["module"]() - norm_arms["fused_bfloat16"]()).abs().max()),
        "rmsnorm_max_abs_difference_fused_float32_upcast": float(
            (norm_arms["module"]() - norm_arms["fused_float32_upcast"]()).abs().max()
        ),
        "activation_us": activation_us,
        "decode_step_ms": round(step_ms, 1),
        "norms_per_step": norms, "activations_per_step": activations,
        "rmsnorm_all_per_step_ms": round(norms * norm_us["module"] / 1000, 2),
        "activation_all_per_step_ms": round(activations * activation_us["silu_times_up"] / 1000, 2),
        "fused_rmsnorm_saves_per_step_ms": round(norm_save_ms, 2),
        "fused_rmsnorm_saves_share_of_step": round(norm_save_ms / step_ms, 4),
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
