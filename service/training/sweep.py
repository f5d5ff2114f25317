"""`prefix-serve examples sweep`: the low-data initialisation sweep (Li & Liang 2021, section 7.2) on the shipped tasks.

For every task, training-set size and initialisation the same number of steps is trained from scratch and the held-out
exact match is measured at the end:

- `random`: `prefix_projection=False`, the K/V parameters start from PEFT's random N(0, 1) init;
- `mlp`: `prefix_projection=True`, PEFT's reparameterisation MLP from its random init (what `prefix-serve train` does
  by default);
- `text`: `prefix_projection=False`, the K/V start from the frozen model's activations of the task's instruction
  (`--init-text`).

All three use V = the instruction's token count, so only the initialisation differs. The first N training examples
of each task are used (the generators emit them in seeded random order with the classes balanced).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.model_loader import LoadedModel
from service.training.examples import ExampleTask
from service.training.trainer import TrainConfig, init_from_text, train_prefix

logger = logging.getLogger(__name__)

INITS = ("random", "mlp", "text")


@dataclass(frozen=True)
class SweepRow:
    task_id: str
    examples: int
    init: str
    steps: int
    lr: float
    num_virtual_tokens: int
    correct: int
    total: int
    final_loss: float
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def run_sweep(
    loaded: LoadedModel,
    tasks: Sequence[ExampleTask],
    *,
    sizes: Sequence[int],
    inits: Sequence[str] = INITS,
    steps: int,
    lr_mlp: float,
    lr_kv: float,
    batch_size: int,
    eval_limit: int,
    seed: int = 0,
    progress: bool = False,
) -> list[SweepRow]:
    unknown = [i for i in inits if i not in INITS]
    if unknown:
        raise ValueError(f"unknown init(s) {unknown}; choose from {', '.join(INITS)}")
    rows: list[SweepRow] = []
    for task in tasks:
        init_embeddings = init_from_text(loaded, task.instruction)
        num_virtual_tokens = int(init_embeddings.shape[0])
        train_all = task.examples("train")
        heldout = task.examples("heldout")[:eval_limit]
        for size in sizes:
            if size > len(train_all):
                raise ValueError(f"task {task.task_id} has {len(train_all)} training examples, fewer than {size}")
            for init in inits:
                direct = init != "mlp"
                lr = lr_kv if direct else lr_mlp
                config = TrainConfig(
                    num_virtual_tokens=num_virtual_tokens,
                    prefix_projection=not direct,
                    init=init,
                    steps=steps,
                    lr=lr,
                    batch_size=min(batch_size, size),
                    eval_every=0,
                    eval_batch_size=16,
                    seed=seed,
                    progress=progress,
                )
                result = train_prefix(
                    loaded,
                    train_all[:size],
                    config,
                    eval_examples=heldout,
                    task_id=f"{task.task_id}-{size}-{init}",
                    init_embeddings=init_embeddings if init == "text" else None,
                )
                match = result.final_exact_match
                row = SweepRow(
                    task_id=task.task_id,
                    examples=size,
                    init=init,
                    steps=steps,
                    lr=lr,
                    num_virtual_tokens=num_virtual_tokens,
                    correct=match.correct if match else 0,
                    total=match.total if match else 0,
                    final_loss=round(result.losses[-1], 4),
                    seconds=round(result.seconds, 1),
                )
                logger.info(
                    "sweep %s n=%d %s: %d/%d held-out exact match (%.0f s)",
                    task.task_id, size, init, row.correct, row.total, row.seconds,
                )  # fmt: skip
                rows.append(row)
    return rows


def markdown_table(rows: Sequence[SweepRow], inits: Sequence[str] = INITS) -> str:
    """One line per (task, size), one column per initialisation: held-out exact match."""
    names = {"random": "random K/V", "mlp": "MLP (reparam.)", "text": "real words (instruction)"}
    lines = [
        "| task | train examples | " + " | ".join(names[i] for i in inits) + " |",
        "|---|---|" + "---|" * len(inits),
    ]
    keys = sorted({(r.task_id, r.examples) for r in rows}, key=lambda k: ([r.task_id for r in rows].index(k[0]), k[1]))
    for task_id, size in keys:
        cells = []
        for init in inits:
            match = [r for r in rows if r.task_id == task_id and r.examples == size and r.init == init]
            cells.append(f"{match[0].correct}/{match[0].total}" if match else "-")
        lines.append(f"| {task_id} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, rows: Sequence[SweepRow], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "rows": [{**asdict(r), "accuracy": round(r.accuracy, 4)} for r in rows]}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

