"""Zero-shot vs prefix comparison on held-out data: the conditions, the table and the JSON report.

Conditions, all greedy through the serving engine, scored by exact match (whitespace-stripped, case-sensitive):
- `zero_shot`: the base model, the very prompt the prefix was trained on (what /generate does without the prefix);
- `zero_shot_instructed`: the base model, through its chat template, asked in words to do the task (a fairer baseline
  for an instruct model; only where the task has an instruction and the tokenizer a chat template);
- `prefix`: the prompt with the task's prefix, as served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.prefix import TaskPrefix
from service.runner import ModelRunner
from service.training.data import Example
from service.training.encoding import encode_prompt
from service.training.evaluate import EvalItem, ExactMatch, exact_match, max_new_tokens_for

logger = logging.getLogger(__name__)

CONDITIONS = ("zero_shot", "zero_shot_instructed", "prefix")
CONDITION_TITLES = {
    "zero_shot": "zero-shot (same prompt)",
    "zero_shot_instructed": "zero-shot (instruction + chat template)",
    "prefix": "with prefix",
}


@dataclass
class TaskReport:
    task_id: str
    results: dict[str, ExactMatch] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "seconds": round(self.seconds, 1),
            **{name: match.to_json() for name, match in self.results.items()},
        }


def eval_items(examples: Sequence[Example], runner: ModelRunner) -> list[EvalItem]:
    return [EvalItem(e.prompt, encode_prompt(runner.tokenizer, e.prompt), e.answer) for e in examples]


def instructed_items(
    runner: ModelRunner, instruction: str, inputs: Sequence[str], answers: Sequence[str]
) -> list[EvalItem] | None:
    """The same questions put to the model as a chat request; None when the tokenizer has no chat template."""
    tokenizer = runner.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        return None
    items = []
    for raw, answer in zip(inputs, answers):
        messages = [{"role": "user", "content": f"{instruction}\n\n{raw}"}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template already holds the special tokens; do not let the tokenizer add more.
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        items.append(EvalItem(prompt=f"{instruction} | {raw}", prompt_ids=ids, answer=answer))
    return items


def compare(
    runner: ModelRunner,
    task_id: str,
    examples: Sequence[Example],
    prefix: TaskPrefix,
    *,
    instructed: list[EvalItem] | None = None,
    zero_shot: bool = True,
    batch_size: int = 16,
) -> TaskReport:
    started = time.perf_counter()
    items = eval_items(examples, runner)
    max_new = max_new_tokens_for(items, runner)
    report = TaskReport(task_id=task_id)
    if zero_shot:
        report.results["zero_shot"] = exact_match(runner, items, None, max_new_tokens=max_new, batch_size=batch_size)
    if instructed:
        # Chat answers may open with a few words of preamble; give them room so an answer that is right but
        # wordy fails on wording, not on a cut-off.
        report.results["zero_shot_instructed"] = exact_match(
            runner, instructed, None, max_new_tokens=max_new + 8, batch_size=batch_size
        )
    report.results["prefix"] = exact_match(runner, items, prefix, max_new_tokens=max_new, batch_size=batch_size)
    report.seconds = time.perf_counter() - started
    for name, match in report.results.items():
        logger.info("%s: %s: exact match %s", task_id, CONDITION_TITLES[name], match.summary())
    return report


def markdown_table(reports: Sequence[TaskReport]) -> str:
    """One row per task, one column per condition that any task has."""
    present = [c for c in CONDITIONS if any(c in r.results for r in reports)]
    header = ["task", "held-out n"] + [CONDITION_TITLES[c] for c in present]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for report in reports:
        n = next(iter(report.results.values())).total if report.results else 0
        cells = [report.task_id, str(n)]
        for condition in present:
            match = report.results.get(condition)
            cells.append(f"{100 * match.accuracy:.1f}% ({match.correct}/{match.total})" if match else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
