"""Would one GEMM for q/k/v and one for gate/up pay in a decode step? A layer's seven projections as the model runs
them (seven `F.linear` calls) against four (q|k|v and gate|up with their weights concatenated once), bfloat16.

    PYTHONPATH=. .venv/bin/python experiments/fused_projections.py --rows 32 \
        --out benchmarks/results/fused-projections-cpu.json

The shapes and weights are the embedded SmolLM2-135M's first layer (or `--model DIR`); the input is B rows of one token
each (a decode step). Each form is timed in turns over `--rounds` rounds of `--calls` calls; the saving per step is
the per-layer difference times the model's layers, set against the per-step GEMM time of the profile
(`benchmarks/profile_step.py`). The fused outputs are split back with views and compared with the separate ones.
This measures the GEMMs alone: a fused forward would also drop three of the seven modules' Python calls a layer.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.timing import time_in_turns, write_result
from service.model_loader import load_base_model
from service.settings import Settings


@torch.inference_mode()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    options = {"model": args.model} if args.model else {}
    model = load_base_model(Settings(dtype="bfloat16", device="cpu", **options)).model
    layer = model.model.layers[0]
    attention, mlp = layer.self_attn, layer.mlp
    separate = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj, mlp.up_proj,
                mlp.down_proj]
    if any(linear.bias is not None for linear in separate):
        raise SystemExit("this model's projections have biases; the experiment covers bias-free ones")
    qkv_weight = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]).contiguous()
    gate_up_weight = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous()
    hidden = torch.randn(args.rows, model.config.hidden_size).to(torch.bfloat16)
    attended = torch.randn(args.rows, attention.o_proj.in_features).to(torch.bfloat16)
    activated = torch.randn(args.rows, mlp.down_proj.in_features).to(torch.bfloat16)

    def seven() -> tuple[torch.Tensor, ...]:
        return (
            attention.q_proj(hidden), attention.k_proj(hidden), attention.v_proj(hidden), attention.o_proj(attended),
            mlp.gate_proj(hidden), mlp.up_proj(hidden), mlp.down_proj(activated),
        )

    def four() -> tuple[torch.Tensor, ...]:
        return (
            F.linear(hidden, qkv_weight), attention.o_proj(attended), F.linear(hidden, gate_up_weight),
            mlp.down_proj(activated),
        )

    q, k, v, _, gate, up, _ = seven()
    qkv, _, gate_up, _ = four()
    splits = [q.shape[-1], k.shape[-1], v.shape[-1]]
    fused_difference = max(
        float((a.float() - b.float()).abs().max())
        for a, b in zip(qkv.split(splits, dim=-1) + gate_up.split([gate.shape[-1], up.shape[-1]], dim=-1),
                        (q, k, v, gate, up))
    )
    times = time_in_turns({"seven_linears": seven, "four_linears": four}, args.rounds, args.calls)
    us = {name: round(statistics.median(values) * 1e6, 1) for name, values in times.items()}
    ranges = {name: [round(min(v) * 1e6, 1), round(max(v) * 1e6, 1)] for name, v in times.items()}
    layers = model.config.num_hidden_layers
    result = {
        "model": model.config.name_or_path or "embedded SmolLM2-135M-Instruct",
        "rows": args.rows, "dtype": "bfloat16", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "us_per_layer_median": us,
        "us_per_layer_range": ranges,
        "saving_ms_per_step": round((us["seven_linears"] - us["four_linears"]) * layers / 1000, 2),
        "layers": layers,
        "fused_max_abs_difference": fused_difference,
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
