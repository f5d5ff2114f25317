"""`prefix-serve bench --few-shot`: a ~1,000-token few-shot block sent in every prompt vs the same block stored once as
a task made from text (service/text_prefix.py), in the same run, on the same engine.

- `few-shot-in-prompt`: every request's prompt is the block followed by its query; the engine prefills ~1,000 extra
  tokens per request (what a client does without stored tasks; automatic prefix caches in vLLM/SGLang would share
  this, but not as a named, persistent object).
- `text-task`: the block is run through the model once and stored as a prefix (V = its token count); every request
  sends only its query with that task. Its rows mix in batches with any other prefix.

The block is labelled examples of the shipped `sentiment` task (`Review : <text> Sentiment : <label>` lines) up to
`--few-shot-tokens`; the queries are held-out reviews in the same format. Every request generates exactly the same
number of tokens (EOS ignored). Before timing, greedy outputs of a few queries are compared between the two systems
(they must be identical: the prefix is the block's exact K/V).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from service.batch import generate
from service.bench.report import markdown_table, write_json
from service.bench.run import run_engine_system
from service.bench.workload import WorkItem
from service.model_loader import LoadedModel
from service.registry import PrefixRegistry, TaskInfo
from service.requests import GenerationRequest, SamplingParams
from service.runner import ModelRunner
from service.text_prefix import make_text_adapter

logger = logging.getLogger(__name__)

TASK_ID = "few-shot"
SYSTEMS = ("few-shot-in-prompt", "text-task")


def few_shot_block(loaded: LoadedModel, target_tokens: int) -> str:
    """Labelled training reviews, one per line, until the block has about `target_tokens` tokens (never more)."""
    from service.training.examples import get_task

    task = get_task("sentiment")
    lines: list[str] = []
    for example in task.examples("train"):
        line = example.prompt + example.completion + "\n"
        if len(loaded.tokenizer("".join(lines) + line)["input_ids"]) > target_tokens:
            break
        lines.append(line)
    return "".join(lines)


def queries(loaded: LoadedModel, count: int) -> list[str]:
    from service.training.examples import get_task

    heldout = get_task("sentiment").examples("heldout")
    return [heldout[i % len(heldout)].prompt for i in range(count)]


def run_few_shot(args: argparse.Namespace, loaded: LoadedModel) -> int:
    runner = ModelRunner(loaded.model, loaded.tokenizer)
    block = few_shot_block(loaded, args.few_shot_tokens)
    block_ids = list(loaded.tokenizer(block)["input_ids"])
    new_tokens = int(args.new_tokens.partition("-")[0])
    concurrency = args.clients
    texts = queries(loaded, max(args.min_requests, args.requests_per_client * concurrency))

    with tempfile.TemporaryDirectory() as tmp:
        registry = PrefixRegistry(
            Path(tmp) / "store", loaded.geometry, device=loaded.device, dtype=loaded.dtype,
            served_model_name=loaded.name, max_virtual_tokens=1, max_prefix_bytes=1 << 31, max_config_bytes=1 << 20,
            max_text_tokens=len(block_ids),
        )  # fmt: skip
        made = make_text_adapter(
            loaded.model, loaded.tokenizer, loaded.geometry, block, base_model_name_or_path=loaded.name,
            max_tokens=len(block_ids),
        )  # fmt: skip
        registry.put(TASK_ID, made.config_bytes, made.weights_bytes, info=TaskInfo(source="text", text=block))
        prefix = registry.get(TASK_ID)

    query_ids = [list(loaded.tokenizer(q)["input_ids"]) for q in texts]
    # The block ends with a newline and every query starts a new line: the token boundary holds.
    boundary_ok = all(loaded.tokenizer(block + q)["input_ids"] == block_ids + ids for q, ids in zip(texts, query_ids))
    check = min(4, len(query_ids))
    greedy = SamplingParams(max_new_tokens=4)
    in_prompt = generate(runner, [GenerationRequest(block_ids + ids, None, greedy) for ids in query_ids[:check]])
    stored = generate(runner, [GenerationRequest(ids, prefix, greedy) for ids in query_ids[:check]])
    identical = sum(a.token_ids == b.token_ids for a, b in zip(in_prompt, stored))
    answers = [loaded.tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in stored]
    logger.info("few-shot block: %d tokens; greedy outputs identical for %d/%d queries %s", len(block_ids),
                identical, check, answers)  # fmt: skip

    workloads = {
        "few-shot-in-prompt": [WorkItem(None, block_ids + ids, new_tokens) for ids in query_ids],
        "text-task": [WorkItem(TASK_ID, ids, new_tokens) for ids in query_ids],
    }
    warmup_ids = query_ids[: min(2, len(query_ids))]
    warmups = {
        "few-shot-in-prompt": [WorkItem(None, block_ids + ids, 2) for ids in warmup_ids],
        "text-task": [WorkItem(TASK_ID, ids, 2) for ids in warmup_ids],
    }
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for system in SYSTEMS:
        result = run_engine_system(
            system, runner, {TASK_ID: prefix}, workloads[system], concurrency=concurrency, policy="mixed",
            use_prefix=system == "text-task", warmup=warmups[system], step_token_budget=args.step_token_budget,
        )  # fmt: skip
        summary = result.summary()
        summary["prompt_tokens_per_request"] = round(
            sum(len(item.prompt_ids) for item in workloads[system]) / len(workloads[system]), 1
        )
        logger.info("%s", summary)
        rows.append(summary)
        runs.append(result.to_json())

    by_system = {r["system"]: r for r in rows}
    speedup = {
        "tokens_per_s (text-task / in-prompt)": _ratio(by_system, "tokens_per_s", "text-task", "few-shot-in-prompt"),
        "ttft_p50 (in-prompt / text-task)": _ratio(by_system, "ttft_p50_s", "few-shot-in-prompt", "text-task"),
        "ttft_p95 (in-prompt / text-task)": _ratio(by_system, "ttft_p95_s", "few-shot-in-prompt", "text-task"),
    }
    title = (f"{loaded.name} on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')}): a {len(block_ids)}-token "
             f"few-shot block in every prompt vs stored as a task made from text; {concurrency} clients, "
             f"{len(query_ids)} requests, {new_tokens} new tokens each")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "fewshot.json", {
        "title": title,
        "command": " ".join(["prefix-serve", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None,
        "block_tokens": len(block_ids),
        "token_boundary_ok": boundary_ok,
        "greedy_identical": f"{identical}/{check}",
        "rows": rows,
        "ratios": speedup,
        "runs": runs,
    })  # fmt: skip
    table = markdown_table(rows)
    ratios = "\n".join(["| ratio | value |", "|---|---|"] + [f"| {k} | {v}x |" for k, v in speedup.items()])
    (args.out / "fewshot.md").write_text(f"{title}\n\n{table}\n\n{ratios}\n")
    print(f"{title}\n\ngreedy outputs identical: {identical}/{check}\n\n{table}\n\n{ratios}\n\n"
          f"wrote {args.out / 'fewshot.json'}, {args.out / 'fewshot.md'}")  # fmt: skip
    return 0 if identical == check else 1


def _ratio(rows: dict[str, dict[str, Any]], key: str, a: str, b: str) -> float | None:
    if a not in rows or b not in rows or not rows[b][key]:
        return None
    return round(rows[a][key] / rows[b][key], 2)
