"""What the paper's encoder prefix buys: on a frozen seq2seq model, PEFT's decoder prefix vs the full prefix.

Li & Liang prefix an encoder-decoder model on both sides, z = [PREFIX; x; PREFIX'; y]; PEFT's SEQ_2_SEQ_LM prefix
tuning keeps only PREFIX' (the decoder's). For each task this trains, with the same steps, learning rate, batch
order and seed:

  - `decoder`        PEFT's prefix, V virtual tokens (what any PEFT user gets);
  - `decoder-long`   PEFT's prefix with V + Ve tokens: as many prefix tokens as the full prefix, all on the decoder,
                     so a gain of the full prefix is not just "more prefix";
  - `encoder+decoder` the full prefix, V decoder + Ve encoder tokens (`prefix-serve train --prefix-sites
                     encoder,decoder`);

and scores each on the task's held-out split, greedy through the serving engine, after the adapter went through the
same validation and conversion as an upload, and by its held-out loss (teacher forcing, per target token), which
still separates the arms where a weak base model leaves exact match near zero. The zero-shot base model (same
prompt) is the floor.

No model hub is reachable here, so the base model is the tiny T5 this project pretrains itself on synthetic text
(`experiments.seq2seq_base`); the script builds it when the directory does not hold one yet. Tasks: the base
module's extraction tasks (whose answers are held-out words the model must copy, hard for so small a base), and two
label tasks defined here (`LABEL_TASKS`) whose answers come from a fixed set but must be read off the right part of
a sentence with distractors: held-out sentences use other names, places, dates and sentence shapes.

An experiment, not part of the service (it is not in the wheel): run it from a checkout with the `train` extra,

    python -m experiments.seq2seq_compare --base seq2seq-base --steps 400 --seeds 0 1 2 3 4 --threads 1

(`--help` lists the flags; they are those of the former `prefix-serve examples seq2seq-compare`).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.seq2seq_base import (
    DEFAULT_STEPS, MONTHS, NAMES, PLACES, REPORT_FILE, SEQ2SEQ_TASKS, build_seq2seq_base, distinct_records,
)  # fmt: skip
from service.model_loader import LoadedModel
from service.runner import ModelRunner
from service.training.evaluate import ExactMatch, exact_match, max_new_tokens_for, prefix_from_adapter_dir
from service.training.examples import ExampleTask, Record, Split, split_pool
from service.training.report import eval_items
from service.training.trainer import TrainConfig, save_adapter, train_prefix

logger = logging.getLogger(__name__)

# -- two label tasks ------------------------------------------------------------------------------------------------

_MODES = {"flew": "plane", "drove": "car", "walked": "foot", "cycled": "bike", "sailed": "boat"}
_HABITS = {"plane": "flies", "car": "drives", "foot": "walks", "bike": "cycles", "boat": "sails"}
_MODE_SHAPES: dict[Split, list[str]] = {
    "train": [
        "{a} {verb} from {x} to {y} in {month}.",
        "{a}, who usually {habit}, {verb} from {x} to {y}.",
        "Last {month} {a} {verb} to {y}, although {b} {habit}.",
    ],
    "heldout": [
        "In {month}, {a} {verb} all the way to {y} from {x}.",
        "Although {a} always {habit}, this time {a} {verb} to {y}.",
    ],
}
_MONTH_SHAPES: dict[Split, list[str]] = {
    "train": [
        "{a}, born in {other}, moved to {x} on {day} {month} {year}.",
        "On {day} {month} {year} {a} opened a shop in {x}; {b} joined in {other}.",
        "{a} booked the trip in {other} and flew to {x} on {day} {month} {year}.",
    ],
    "heldout": [
        "{a} arrived in {x} on {day} {month} {year}, having left {y} in {other}.",
        "Planned since {other}, the move of {a} to {x} happened on {day} {month} {year}.",
    ],
}
_LABEL_POOL = {"name": NAMES, "place": PLACES, "year": [str(y) for y in range(1950, 2030)]}
_LABEL_WORDS = split_pool("seq2seq-label-tasks", _LABEL_POOL)


def _label_records(
    make: Callable[[random.Random, dict[str, list[str]], str], Record], shapes: dict[Split, list[str]]
) -> Callable[[Split, int, random.Random], list[Record]]:
    """A task generator: `size` distinct records of the split, each from a sentence shape of that split."""

    def generate(split: Split, size: int, rng: random.Random) -> list[Record]:
        return distinct_records(lambda: make(rng, _LABEL_WORDS[split], rng.choice(shapes[split])), size)

    return generate


def _mode(rng: random.Random, words: dict[str, list[str]], shape: str) -> Record:
    a, b = rng.sample(words["name"], 2)
    x, y = rng.sample(words["place"], 2)
    verb = rng.choice(list(_MODES))
    habit = _HABITS[rng.choice([m for m in _HABITS if m != _MODES[verb]])]  # a distractor: another way to travel
    text = shape.format(a=a, b=b, x=x, y=y, verb=verb, habit=habit, month=rng.choice(MONTHS))
    return {"prompt": f"Trip : {text} Mode :", "completion": f" {_MODES[verb]}"}


def _month(rng: random.Random, words: dict[str, list[str]], shape: str) -> Record:
    a, b = rng.sample(words["name"], 2)
    x, y = rng.sample(words["place"], 2)
    month, other = rng.sample(MONTHS, 2)  # the event's month and a distractor month
    text = shape.format(a=a, b=b, x=x, y=y, month=month, other=other, day=rng.randint(1, 28),
                        year=rng.choice(words["year"]))  # fmt: skip
    return {"prompt": f"Event : {text} Month :", "completion": f" {month}"}


LABEL_TASKS: dict[str, ExampleTask] = {
    task.task_id: task
    for task in (
        ExampleTask(
            task_id="travel-mode",
            description="how the trip in the sentence was made (plane/car/foot/bike/boat), past a habit distractor",
            template=None, prompt_template="Trip : {inputs} Mode :",
            instruction="How was this trip made? Answer plane, car, foot, bike or boat.",
            train_size=400, heldout_size=100, seed=0, _generate=_label_records(_mode, _MODE_SHAPES),
        ),
        ExampleTask(
            task_id="event-month",
            description="the month of the sentence's main event, past another month",
            template=None, prompt_template="Event : {inputs} Month :",
            instruction="In which month did the main event happen? Answer with the month only.",
            train_size=400, heldout_size=100, seed=0, _generate=_label_records(_month, _MONTH_SHAPES),
        ),
    )
}  # fmt: skip


ARMS = ("decoder", "decoder-long", "encoder+decoder")
ARM_TITLES = {
    "zero-shot": "zero-shot",
    "decoder": "PEFT decoder prefix (V)",
    "decoder-long": "PEFT decoder prefix (V+Ve)",
    "encoder+decoder": "full prefix (V + Ve)",
}


@dataclass(frozen=True)
class CompareConfig:
    steps: int = 300
    num_virtual_tokens: int = 10  # V
    encoder_virtual_tokens: int = 10  # Ve
    lr: float = 1e-2
    batch_size: int = 16
    seeds: tuple[int, ...] = (0,)
    prefix_projection: bool = True
    heldout_limit: int | None = None  # score only the first N held-out examples (quick runs)

    def train_config(self, arm: str, seed: int) -> TrainConfig:
        v, ve = self.num_virtual_tokens, self.encoder_virtual_tokens
        return TrainConfig(
            num_virtual_tokens=v + ve if arm == "decoder-long" else v,
            prefix_sites="encoder,decoder" if arm == "encoder+decoder" else "decoder",
            encoder_virtual_tokens=ve if arm == "encoder+decoder" else None,
            prefix_projection=self.prefix_projection,
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            eval_every=0,
            seed=seed,
            progress=False,
        )


@dataclass
class ArmResult:
    task_id: str
    arm: str
    seed: int
    heldout: ExactMatch
    final_loss: float | None = None
    heldout_loss: float | None = None
    seconds: float = 0.0
    trainable_params: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "arm": self.arm,
            "seed": self.seed,
            "exact_match": round(self.heldout.accuracy, 4),
            "correct": self.heldout.correct,
            "total": self.heldout.total,
            "final_loss": None if self.final_loss is None else round(self.final_loss, 4),
            "heldout_loss": None if self.heldout_loss is None else round(self.heldout_loss, 4),
            "train_seconds": round(self.seconds, 1),
            "trainable_params": self.trainable_params,
            "sample_errors": [
                {"prompt": p.prompt, "expected": p.expected, "got": p.generated} for p in self.heldout.predictions
                if not p.correct
            ][:3],
        }


def compare_prefix_sites(loaded: LoadedModel, tasks: Sequence[ExampleTask], config: CompareConfig) -> list[ArmResult]:
    """Train and score every arm of every task (and the zero-shot floor); the results in that order."""
    if not loaded.geometry.is_encoder_decoder:
        raise ValueError("the encoder prefix needs an encoder-decoder model")
    runner = ModelRunner(loaded.model, loaded.tokenizer)
    results: list[ArmResult] = []
    for task in tasks:
        heldout = task.examples("heldout")[: config.heldout_limit]
        items = eval_items(heldout, runner)
        max_new = max_new_tokens_for(items, runner)
        floor = exact_match(runner, items, None, max_new_tokens=max_new)
        results.append(ArmResult(task.task_id, "zero-shot", -1, floor))
        logger.info("%s: zero-shot %s", task.task_id, floor.summary())
        for seed in config.seeds:
            for arm in ARMS:
                results.append(_train_and_score(loaded, runner, task, arm, seed, config, heldout, items, max_new))
    return results


def _train_and_score(
    loaded: LoadedModel,
    runner: ModelRunner,
    task: ExampleTask,
    arm: str,
    seed: int,
    config: CompareConfig,
    heldout: Sequence[Any],
    items: list[Any],
    max_new: int,
) -> ArmResult:
    started = time.perf_counter()
    train_config = config.train_config(arm, seed)
    # eval_every=0 with held-out examples: one evaluation at the end, whose teacher-forced loss is reported.
    result = train_prefix(loaded, task.examples("train"), train_config, eval_examples=heldout, task_id=task.task_id)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="prefix-serve-compare-") as scratch:
        adapter_dir = save_adapter(result, Path(scratch), loaded)
        prefix = prefix_from_adapter_dir(adapter_dir, task.task_id, loaded)  # exactly what an upload serves
    heldout_match = exact_match(runner, items, prefix, max_new_tokens=max_new)
    logger.info("%s: %s (seed %d): %s in %.0f s", task.task_id, arm, seed, heldout_match.summary(), seconds)
    return ArmResult(
        task.task_id, arm, seed, heldout_match, result.losses[-1] if result.losses else None,
        result.evals[-1].eval_loss if result.evals else None, seconds, result.trainable_params,
    )  # fmt: skip


def markdown_table(results: Sequence[ArmResult]) -> str:
    """One row per task: held-out exact match of the floor and each arm (mean over seeds, with the range), and the
    arms' mean held-out loss."""
    columns = ["zero-shot", *ARMS]
    header = ["task", "held-out n"] + [ARM_TITLES[c] for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for task_id in dict.fromkeys(r.task_id for r in results):
        rows = [r for r in results if r.task_id == task_id]
        cells = [task_id, str(rows[0].heldout.total)]
        for column in columns:
            scores = [100 * r.heldout.accuracy for r in rows if r.arm == column]
            if not scores:
                cells.append("n/a")
            else:
                cell = f"{scores[0]:.1f}%" if len(scores) == 1 else (
                    f"{sum(scores) / len(scores):.1f}% ({min(scores):.0f}–{max(scores):.0f})"
                )  # fmt: skip
                losses = [r.heldout_loss for r in rows if r.arm == column and r.heldout_loss is not None]
                if losses:
                    cell += f", loss {sum(losses) / len(losses):.2f}"
                cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, results: Sequence[ArmResult], config: CompareConfig, base: dict[str, Any]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    payload = {
        "config": {**config.__dict__, "seeds": list(config.seeds)},
        "base_model": base,
        "results": [r.to_json() for r in results],
        "table": table,
    }
    (out / "seq2seq-compare.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "seq2seq-compare.md").write_text(table + "\n")
    return table


# -- command line ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.seq2seq_compare",
        description=(
            "On a frozen seq2seq model (default: the tiny T5 the project pretrains itself on synthetic text, built "
            "into --base on first use), train each synthetic seq2seq task with PEFT's decoder prefix (V and V+Ve "
            "tokens) and with the full prefix (V decoder + Ve encoder tokens), the same steps and seeds, and score "
            "held-out exact match as served (experiments/seq2seq_compare.py)."
        ),
    )
    parser.add_argument("--base", type=Path, default=Path("seq2seq-base"),
                     help="The base model directory; built there (a few CPU minutes) when it holds no model.")
    parser.add_argument("--base-steps", type=int, default=None, help="Pretraining steps when the base is built.")
    parser.add_argument("--tasks", nargs="+",
                     help="Tasks: travel-mode, event-month (the default pair) and the base module's trip-destination, "
                          "who-did-what.")
    parser.add_argument("--steps", type=int, default=300, help="Training steps of every arm (default 300).")
    parser.add_argument("--num-virtual-tokens", type=int, default=10, help="V of every prefix (default 10).")
    parser.add_argument("--encoder-virtual-tokens", type=int, default=10, help="Ve of the full prefix (default 10).")
    parser.add_argument("--lr", type=float, default=1e-2, help="Peak learning rate (default 1e-2).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Training seeds; the table shows their mean.")
    parser.add_argument("--limit", type=int, help="Score only the first N held-out examples of each task.")
    parser.add_argument("--out", type=Path, default=Path("seq2seq-compare"), help="Where the JSON and table go.")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice).")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    return parser


def _run(args: argparse.Namespace) -> int:
    import torch

    from service.model_loader import load_base_model
    from service.settings import Settings

    available = {**LABEL_TASKS, **SEQ2SEQ_TASKS}

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    unknown = sorted(set(args.tasks or []) - set(available))
    if unknown:
        raise ValueError(f"--tasks: unknown seq2seq tasks {unknown}; choose from {', '.join(available)}")
    if not (args.base / "config.json").is_file():
        logger.info("building the seq2seq base model into %s", args.base)
        build_seq2seq_base(args.base, steps=args.base_steps or DEFAULT_STEPS, threads=torch.get_num_threads())
    base_report = args.base / REPORT_FILE
    base = json.loads(base_report.read_text()) if base_report.is_file() else {"model": str(args.base)}
    loaded = load_base_model(Settings(model=str(args.base), device="cpu", dtype="float32"))
    config = CompareConfig(
        steps=args.steps, num_virtual_tokens=args.num_virtual_tokens, encoder_virtual_tokens=args.encoder_virtual_tokens,
        lr=args.lr, batch_size=args.batch_size, seeds=tuple(args.seeds), heldout_limit=args.limit,
    )  # fmt: skip
    tasks = [available[t] for t in (args.tasks or LABEL_TASKS)]
    results = compare_prefix_sites(loaded, tasks, config)
    print(write_report(args.out, results, config, base))
    print(f"wrote {args.out / 'seq2seq-compare.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Expected failures (an unknown task, a bad number, a missing model) are one line on stderr and exit code 2."""
    from service.errors import ServiceError
    from service.logging_setup import configure_logging
    from service.training.errors import TrainingDivergedError

    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, "text")  # a person reads these, not a log shipper
    try:
        return _run(args)
    except TrainingDivergedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:  # DataError is a ValueError
        logger.debug("failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
