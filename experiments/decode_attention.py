"""One layer of the slot layout's decode attention, five ways, at the shapes of a 32-row SmolLM2 step in bfloat16.

    PYTHONPATH=. .venv/bin/python experiments/decode_attention.py --out benchmarks/results/decode-attention-cpu.json

- `float32_matmul`: what `service.attention._decode_attention` did until 2026-12-06, with each task's prefix in the
  bank only: gather each row's prefix columns from the bank and its own columns from the store into one float32 copy,
  two batched matmuls, `masked_fill` + softmax between;
- `bfloat16_sdpa`: the same gather in bfloat16, then `F.scaled_dot_product_attention` with the hidden columns as a
  boolean mask (its CPU kernel accumulates in float32), hidden keys zeroed first: sdpa turns an inf score under the
  mask into NaN (checked here), where the engine's `masked_fill` makes it -inf;
- `gather_only`: just the bfloat16 gather, the floor both share;
- `in_place_sdpa`: what it does now, with each row's prefix copied into its slot's first columns at admission: one
  sdpa call on a slice of the store, no copy, a kv head's query heads passed as that head's queries;
- `in_place_sdpa_enable_gqa`: the same with the query heads as heads and `enable_gqa=True` (which copies each kv
  head per query head).

Random values (the cost does not depend on them); each arm timed in turns over `--rounds` rounds; the largest
difference of each arm's output from the float32 one is reported.

Run it with glibc's mmap threshold fixed (`MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=134217728`, as the
recorded result was): by default the float32 arm's fresh ~2.4 MB buffers are mmapped and page-faulted on some calls
and not others (glibc moves the threshold as memory is freed), and its time swings between ~450 and ~1,800 µs.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from experiments.timing import time_in_turns, write_result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=20, help="Virtual tokens of each row's prefix.")
    parser.add_argument("--own", type=int, default=60, help="Own columns each row reads (prompt + generated).")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows, prefix, own = args.rows, args.prefix, args.own
    kv_heads, groups, head_dim, dtype = 3, 3, 64, torch.bfloat16  # SmolLM2-135M
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    bank_keys, bank_values = randn(kv_heads, 8 * prefix, head_dim), randn(kv_heads, 8 * prefix, head_dim)
    store_keys, store_values = randn(rows + 8, kv_heads, 2048, head_dim), randn(rows + 8, kv_heads, 2048, head_dim)
    columns = torch.randint(0, 8 * prefix, (rows, prefix), generator=generator)
    hidden = torch.zeros(rows, 1, 1, prefix + own, dtype=torch.bool)
    hidden[..., prefix + own - 5:] = True  # columns not written yet
    query = randn(kv_heads * groups, rows, head_dim)
    scale = head_dim**-0.5
    # The in-place layout: each row's prefix in its slot's columns [0, prefix), its own tokens after it.
    in_place_keys, in_place_values = store_keys.clone(), store_values.clone()
    in_place_keys[:rows, :, :prefix] = bank_keys[:, columns].transpose(0, 1)
    in_place_values[:rows, :, :prefix] = bank_values[:, columns].transpose(0, 1)
    in_place_keys[:rows, :, prefix : prefix + own] = store_keys[:rows, :, :own]
    in_place_values[:rows, :, prefix : prefix + own] = store_values[:rows, :, :own]
    visible = ~hidden

    def gather(compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (rows, kv_heads, prefix + own, head_dim)
        keys, values = torch.empty(shape, dtype=compute), torch.empty(shape, dtype=compute)
        flat, gathered = columns.reshape(-1), (rows, prefix, kv_heads, head_dim)
        keys[:, :, :prefix] = bank_keys.index_select(1, flat).transpose(0, 1).reshape(gathered).transpose(1, 2)
        values[:, :, :prefix] = bank_values.index_select(1, flat).transpose(0, 1).reshape(gathered).transpose(1, 2)
        keys[:, :, prefix:] = store_keys[:rows, :, :own]
        values[:, :, prefix:] = store_values[:rows, :, :own]
        return keys, values

    def float32_matmul() -> torch.Tensor:
        keys, values = gather(torch.float32)
        q = (query.transpose(0, 1).float() * scale).reshape(rows, kv_heads, groups, head_dim)
        probs = torch.softmax(torch.matmul(q, keys.transpose(-1, -2)).masked_fill_(hidden, float("-inf")), dim=-1)
        return torch.matmul(probs, values).reshape(rows, kv_heads * groups, head_dim).to(dtype)

    def bfloat16_sdpa() -> torch.Tensor:
        keys, values = gather(dtype)
        keys.masked_fill_(hidden.view(rows, 1, prefix + own, 1), 0.0)
        q = query.transpose(0, 1).reshape(rows, kv_heads * groups, 1, head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=~hidden, scale=scale, enable_gqa=True)
        return out.reshape(rows, kv_heads * groups, head_dim)

    def in_place_sdpa() -> torch.Tensor:
        keys, values = in_place_keys[:rows, :, : prefix + own], in_place_values[:rows, :, : prefix + own]
        q = query.transpose(0, 1).reshape(rows, kv_heads, groups, head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=scale)
        return out.reshape(rows, kv_heads * groups, head_dim)

    def in_place_sdpa_enable_gqa() -> torch.Tensor:
        keys, values = in_place_keys[:rows, :, : prefix + own], in_place_values[:rows, :, : prefix + own]
        q = query.transpose(0, 1).reshape(rows, kv_heads * groups, 1, head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=scale, enable_gqa=True)
        return out.reshape(rows, kv_heads * groups, head_dim)

    arms: dict[str, Callable[[], object]] = {
        "float32_matmul": float32_matmul, "bfloat16_sdpa": bfloat16_sdpa, "gather_only": lambda: gather(dtype),
        "in_place_sdpa": in_place_sdpa, "in_place_sdpa_enable_gqa": in_place_sdpa_enable_gqa,
    }
    with torch.inference_mode():
        reference = float32_matmul().float()
        difference = float((bfloat16_sdpa().float() - reference).abs().max())
        in_place_difference = float((in_place_sdpa().float() - reference).abs().max())
        reference_scale = float(reference.abs().max())
        one = torch.ones(1, 1, 1, 4, dtype=dtype)
        overflowing = torch.cat([one.expand(1, 1, 2, 4), torch.full((1, 1, 1, 4), 3e38, dtype=dtype)], dim=2)
        nan_under_mask = bool(F.scaled_dot_product_attention(
            one, overflowing, overflowing, attn_mask=torch.tensor([True, True, False]).view(1, 1, 1, 3)
        ).isnan().any())
        times = {name: [t * 1e6 for t in values] for name, values in time_in_turns(arms, args.rounds, args.calls).items()}
    result = {
        "rows": rows, "prefix": prefix, "own": own, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "us_per_layer_median": {name: round(statistics.median(values), 1) for name, values in times.items()},
        "us_per_layer_range": {name: [round(min(v), 1), round(max(v), 1)] for name, v in times.items()},
        "bfloat16_sdpa_max_abs_difference": difference,
        "in_place_sdpa_max_abs_difference": in_place_difference,  # one bfloat16 rounding of the output
        "float32_output_max_abs": reference_scale,
        "sdpa_nan_for_an_inf_score_under_its_mask": nan_under_mask,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
