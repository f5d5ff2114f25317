"""A randomly initialised Llama of a given shape, saved as a Hugging Face directory beside the embedded SmolLM2
tokenizer, so that `prefix-serve bench --model DIR` and llama.cpp's `convert_hf_to_gguf.py` read the same weights.

    PYTHONPATH=. .venv/bin/python benchmarks/make_random_llama.py /work/llama/smol360-random

Default shape: SmolLM2-360M's (hidden 960, 32 layers, 15 heads, 5 KV heads, intermediate 2560, vocab 49152; the
rest of the config is the embedded SmolLM2-135M's). Seeded; saved in bfloat16, so both sides serve identical bits.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from service.model_loader import embedded_model_dir
from service.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=960)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=15)
    parser.add_argument("--kv-heads", type=int, default=5)
    parser.add_argument("--intermediate", type=int, default=2560)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    source = embedded_model_dir(Settings().cache_dir)
    config = json.loads((source / "config.json").read_text())
    config.pop("_model_name_or_path", None)
    config.update(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
                  head_dim=args.hidden // args.heads, dtype="bfloat16")  # fmt: skip
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).eval()
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(source).save_pretrained(args.out)
    shutil.copy(source / "generation_config.json", args.out / "generation_config.json")
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {args.out}")


if __name__ == "__main__":
    main()
