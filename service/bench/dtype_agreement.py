"""Does bfloat16 serve the same answers as float32? Greedy agreement on the shipped tasks' held-out sets.

    python -m service.bench.dtype_agreement --json benchmarks/results/dtype-agreement.json

For every shipped example task and every held-out example, the prompt is decoded greedily (the serving engine's
slot layout, stop at EOS) by the embedded model in float32 and in bfloat16, with the task's stored prefix. Reported
per task: exact-match accuracy in each dtype, how often the two dtypes return the same answer, and how often they
return the same tokens over a longer continuation (a stricter, numerical view: past the answer the model's text is
arbitrary and small logit differences show up there first). This is the data behind the CPU default dtype.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from service.scheduling import slots
from service.model_loader import load_base_model
from service.requests import GenerationRequest, SamplingParams
from service.runner import ModelRunner
from service.settings import Settings
from service.training.evaluate import max_new_tokens_for, open_registry
from service.training.examples import EXAMPLE_TASKS
from service.training.report import eval_items

logger = logging.getLogger(__name__)

CONTINUATION_TOKENS = 24


def _decode_all(runner: ModelRunner, prompts: list[list[int]], prefix: Any, new_tokens: int, ignore_eos: bool) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=ignore_eos)
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), 32):
        requests = [GenerationRequest(p, prefix, params) for p in prompts[start : start + 32]]
        outputs += [r.token_ids for r in slots.generate(runner, requests)]
    return outputs


def measure(prefix_dir: Path, dtypes: tuple[str, str] = ("float32", "bfloat16")) -> dict[str, Any]:
    per_dtype: dict[str, dict[str, Any]] = {}
    for dtype in dtypes:
        loaded = load_base_model(Settings(model=None, device="cpu", dtype=dtype))
        runner = ModelRunner(loaded.model, loaded.tokenizer)
        registry = open_registry(prefix_dir, loaded)
        tasks: dict[str, Any] = {}
        for task_id, task in EXAMPLE_TASKS.items():
            items = eval_items(task.examples("heldout"), runner)
            prompts = [list(i.prompt_ids) for i in items]
            prefix = registry.get(task_id)
            answers = _decode_all(runner, prompts, prefix, max_new_tokens_for(items, runner), ignore_eos=False)
            continuations = _decode_all(runner, prompts, prefix, CONTINUATION_TOKENS, ignore_eos=True)
            texts = [runner.decode(a).strip() for a in answers]
            tasks[task_id] = {
                "answers": answers,
                "continuations": continuations,
                "correct": sum(t == i.answer for t, i in zip(texts, items)),
                "total": len(items),
            }
        per_dtype[dtype] = tasks
        del runner, loaded, registry

    first, second = dtypes
    report: dict[str, Any] = {"dtypes": list(dtypes), "continuation_tokens": CONTINUATION_TOKENS, "tasks": {}}
    for task_id in EXAMPLE_TASKS:
        a, b = per_dtype[first][task_id], per_dtype[second][task_id]
        same_answer = sum(x == y for x, y in zip(a["answers"], b["answers"]))
        same_continuation = sum(x == y for x, y in zip(a["continuations"], b["continuations"]))
        first_divergence = [
            next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
            for x, y in zip(a["continuations"], b["continuations"])
        ]
        report["tasks"][task_id] = {
            "examples": a["total"],
            f"exact_match_{first}": a["correct"] / a["total"],
            f"exact_match_{second}": b["correct"] / b["total"],
            "same_answer": same_answer / a["total"],
            f"same_{CONTINUATION_TOKENS}_token_continuation": same_continuation / a["total"],
            "mean_tokens_before_divergence": sum(first_divergence) / len(first_divergence),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix-dir", type=Path, default=Path("prefixes"))
    parser.add_argument("--json", type=Path, help="Write the report here too.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.manual_seed(0)
    report = measure(args.prefix_dir)
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
