"""`prefix-serve bench`: one command, one seeded workload, every system, a table + JSON + PNG.

Systems (tokens/s ratios are reported at --clients):
  peft       the seed's method: PeftModel + set_adapter + generate, one request at a time
  static     HF generate over static batches of --clients requests, prefixes stacked, no server: the ceiling a
             user could script for the same work
  per-task   this service, --batching per-task
  mixed      this service, --batching mixed (continuous, tasks share batches)
  no-prefix  the bare base model under `mixed`, to show what the prefixes cost
  ray-N      `mixed` as N replicas on Ray Serve (a private local cluster; needs prefix-serve[ray]); not in the
             default set, run at --clients in the first --dtype only
  llama.cpp  llama.cpp's llama-server on the same weights (--llama-server, --llama-gguf), at --clients, each prompt
             behind its task's text (cache_prompt); not in the default set. With it every task here is made from
             the same text (service/bench/llama_cpp.py)

--rounds N runs static, the engine systems and llama.cpp N times, alternating their order; the table shows each
system's median round and the range, and every ratio is the median of the rounds' ratios (peft and ray-N run once).

Encoder-decoder models (T5, BART; `--model DIR` or `--random-init` of such a config) run the same systems with PEFT
SEQ_2_SEQ_LM prefixes; there peft is PEFT's prompt cache handed to the model's `generate` one request at a time
(service/bench/peft_baseline.py says why), and static stacks the prefixes in the self-attention half of an
`EncoderDecoderCache`.

With several --dtype values (e.g. float32,bfloat16) static and the engine systems run once per dtype; rows of the
second and later dtypes are named e.g. `mixed-bfloat16`. peft runs in the first dtype.

--few-shot runs a separate pair instead (service/bench/fewshot.py): a ~1,000-token few-shot block in every prompt
vs the same block stored once as a task made from text, at --clients, in the first --dtype.

--scale N runs the ten-thousand-task bench instead (service/bench/scale.py): bulk import of N tasks, listing pages,
and Zipf / cold-task traffic over the N stored tasks vs 8, at --clients, in the first --dtype.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.bench import SYSTEMS
from service.extras import missing_modules, needs_extra_message

# Only argparse and light modules here: `prefix-serve` builds this parser for every command, serving included, and the
# run itself (`service.bench.command`) needs the `bench` extra.


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="Benchmark PEFT's method vs this service.", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--model", help="Local HF model dir or .gguf (default: the embedded SmolLM2-135M).")
    bench.add_argument("--random-init", type=Path, metavar="CONFIG.json",
                       help="Benchmark a randomly initialised model built from this config (no weights needed).")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench.add_argument("--dtype", default="auto",
                       help="auto, float32, bfloat16 or float16; a comma list runs the batched systems per dtype.")
    bench.add_argument("--cache-dir", type=Path)
    bench.add_argument("--clients", type=int, default=32, help="Concurrency at which the ratios are taken.")
    bench.add_argument("--concurrency", default="1,4,16,32,64", help="Concurrency sweep for the plot.")
    bench.add_argument("--tasks", type=int, default=8)
    bench.add_argument("--requests-per-client", type=int, default=2)
    bench.add_argument("--min-requests", type=int, default=8)
    bench.add_argument("--prompt-tokens", default="20-34")
    bench.add_argument("--new-tokens", default="32-32")
    bench.add_argument("--step-token-budget", type=int, default=128,
                       help="The engine's per-step token budget (decode tokens + prompt chunks).")
    bench.add_argument("--virtual-tokens", type=int, default=20)
    bench.add_argument("--systems", default=",".join(SYSTEMS))
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--rounds", type=int, default=1,
                       help="Run the systems this many times, alternating their order; report medians and ranges.")
    bench.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                       help="Before each timed run in the rounds, wait up to this long for other processes to leave "
                            "the cores idle (each run records the cores other jobs kept busy either way).")
    llama = bench.add_argument_group("llama.cpp peer (system llama.cpp)")
    llama.add_argument("--llama-server", type=Path, metavar="PATH", help="A built llama-server binary.")
    llama.add_argument("--llama-gguf", type=Path, metavar="PATH",
                       help="The GGUF it serves; when it does not exist, --llama-convert writes it there.")
    llama.add_argument("--llama-convert", type=Path, metavar="SCRIPT",
                       help="llama.cpp's convert_hf_to_gguf.py: makes --llama-gguf from the served model's directory.")
    llama.add_argument("--llama-outtype", default="bf16", help="With --llama-convert: bf16, f32, f16 or q8_0.")
    llama.add_argument("--llama-args", default="", help="Extra llama-server arguments (one string, shell-split).")
    bench.add_argument("--out", type=Path, default=Path("bench-results"))
    bench.add_argument("--few-shot", action="store_true",
                       help="Instead: a few-shot block in every prompt vs stored as a task made from text, at "
                            "--clients "
                            "(service/bench/fewshot.py); uses the first value of --new-tokens.")
    bench.add_argument("--few-shot-tokens", type=int, default=1000, help="With --few-shot: the block's size in tokens.")
    bench.add_argument("--scale", type=int, metavar="N",
                       help="Instead: N stored tasks (service/bench/scale.py): bulk import time, listing time per "
                            "page, and throughput of Zipf and cold-task traffic over them vs 8 tasks, at --clients.")
    bench.add_argument("--scale-batch", type=int, default=1000, help="With --scale: tasks per bulk-import tar.")
    bench.add_argument("--scale-single-uploads", type=int, default=200,
                       help="With --scale: tasks also uploaded one by one (POST /prefixes) to compare the import with.")
    bench.add_argument("--zipf", type=float, default=1.1, help="With --scale: the Zipf exponent of task popularity.")
    bench.add_argument("--scale-device-prefixes", type=int, default=256,
                       help="With --scale: prefixes the device tier keeps (its byte budget in prefixes of V tokens).")
    bench.add_argument("--scale-host-prefixes", type=int, default=1024,
                       help="With --scale: prefixes the host tier keeps; the rest are read back from disk.")
    bench.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Checked before anything runs: matplotlib is first imported for the plot, at the end of a run of many minutes.
    missing = missing_modules("bench")
    if missing:
        print(f"error: {needs_extra_message('bench', 'bench', missing)}", file=sys.stderr)
        return 2
    from service.bench.command import main

    return main(args)
