"""`prefix-serve train`, `prefix-serve eval` and `prefix-serve examples {make-data,train,eval}`.

Only argparse and the standard library are imported at module level: `prefix-serve serve` imports this module to
build its parser and should start fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.model_loader import LoadedModel
    from service.training.report import TaskReport

logger = logging.getLogger("service.training.cli")

_EXIT_BAD_INPUT = 2
_EXIT_FAILED = 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add the training subcommands to `prefix-serve`'s subparsers."""
    from service.training.data import DEFAULT_TEMPLATE

    train = sub.add_parser(
        "train",
        help="Train a prefix-tuning adapter on a JSONL file.",
        description=(
            "Train a PEFT prefix (prefix_projection=True) on a frozen base model and save an adapter directory that "
            'POST /prefixes accepts. Data: JSONL lines {"prompt", "completion"} or {"text", "label"} '
            "(turned into a prompt by --template). Clients send the prompt text verbatim as /generate `inputs`; "
            "no chat template is applied. Decoder-only models learn to continue the prompt with the completion. "
            "Encoder-decoder models (T5, BART) read the prompt with the encoder and learn to write the completion "
            "with the decoder (PEFT's SEQ_2_SEQ_LM prefix); --prefix-sites encoder,decoder also prefixes the "
            "encoder (Li & Liang's full prefix)."
        ),
    )
    train.add_argument("--data", type=Path, required=True, help="Training JSONL file.")
    train.add_argument("--task-id", required=True, help="Task id the prefix will be served under.")
    train.add_argument("--out", type=Path, required=True, help="Output adapter directory.")
    train.add_argument("--eval-data", type=Path, help="Held-out JSONL for periodic loss and exact-match accuracy.")
    train.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        help=f'Prompt for {{"text", "label"}} records (default {DEFAULT_TEMPLATE!r}).',
    )
    train.add_argument(
        "--prompt-template",
        help="The served task's template ({inputs} slot), written to task.json. Default: --template with {text} -> "
        "{inputs} for {\"text\", \"label\"} data; none for {\"prompt\", \"completion\"} data.",
    )
    train.add_argument("--description", help="A short description of the task, written to task.json.")
    train.add_argument(
        "--num-virtual-tokens",
        type=int,
        help="Prefix length V, on encoder-decoder models the decoder prefix's (default 20; with --init-*: theirs).",
    )
    init = train.add_mutually_exclusive_group()
    init.add_argument(
        "--init-text",
        help="Start the prefix from the frozen model's K/V of this text (real-word initialisation, Li & Liang 7.2); "
        "V = its token count. Trains the K/V directly (no MLP).",
    )
    init.add_argument(
        "--init-task",
        help="Start from a stored task's prefix (a folder in --prefix-dir, e.g. a task made from text, or an "
        "unzipped GET /prefixes/{id}/adapter). Trains the K/V directly (no MLP).",
    )
    train.add_argument("--prefix-dir", type=Path, help="With --init-task: the prefix store (default ./prefixes).")
    train.add_argument(
        "--no-prefix-projection",
        action="store_true",
        help="Train the K/V directly from a random init instead of through the MLP reparameterisation.",
    )
    train.add_argument(
        "--prefix-sites",
        type=_prefix_sites,
        default="decoder",
        metavar="SITES",
        help="Encoder-decoder models (T5, BART): where the prefix goes. 'decoder' (default): PEFT's SEQ_2_SEQ_LM "
        "prefix in front of the decoder's self-attention, a plain PEFT adapter. 'encoder,decoder': the paper's full "
        "prefix z = [PREFIX; x; PREFIX'; y], which also puts trained K/V in front of every encoder self-attention "
        "layer, so the prefix also steers how the prompt is read (PEFT only prefixes the decoder); saved in the "
        "same adapter files as an extra tensor (encoder_prompt_embeddings) and config key "
        "(encoder_num_virtual_tokens); this server serves both halves, PEFT's own loader only the decoder's. "
        "Decoder-only models: 'decoder' only.",
    )
    train.add_argument(
        "--encoder-virtual-tokens",
        type=int,
        help="With --prefix-sites encoder,decoder: the encoder prefix's length (default: --num-virtual-tokens).",
    )
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="Optimizer steps (default 100).")
    length.add_argument("--epochs", type=float, help="Passes over the training data (instead of --steps).")
    train.add_argument("--lr", type=float, default=1e-3, help="Peak learning rate (default 1e-3).")
    train.add_argument("--batch-size", type=int, default=8, help="Examples per step (default 8).")
    train.add_argument("--warmup-steps", type=int, help="Linear warmup steps (default 5%% of the steps).")
    train.add_argument("--eval-every", type=int, default=50, help="Steps between evaluations; 0 = at the end only.")
    train.add_argument("--seed", type=int, default=0, help="Seed of the initialisation and the batch order.")
    train.add_argument("--upload", metavar="URL", help="After training, upload the adapter to this server.")
    train.add_argument("--replace", action="store_true", help="With --upload: overwrite the task's existing prefix.")
    train.add_argument("--api-key", help="With --upload: an admin API key (default: $PREFIX_SERVE_API_KEY).")
    train.add_argument("--no-progress", action="store_true", help="No progress bar.")
    _model_args(train, dtype_default="float32")
    train.set_defaults(func=_guarded(_train))

    evaluate = sub.add_parser(
        "eval",
        help="Exact-match accuracy of a prefix on a JSONL file, against the zero-shot base model.",
        description="Greedy-decode every example with and without the prefix and compare with its completion.",
    )
    evaluate.add_argument("--data", type=Path, required=True, help="JSONL file (same formats as train).")
    evaluate.add_argument("--task-id", help="Task to evaluate (its prefix in --prefix-dir, or the name for --adapter).")
    evaluate.add_argument("--adapter", type=Path, help="Evaluate this saved adapter directory instead.")
    evaluate.add_argument("--prefix-dir", type=Path, help="Prefix store (default ./prefixes).")
    evaluate.add_argument("--template", default=DEFAULT_TEMPLATE, help='Prompt for {"text", "label"} records.')
    evaluate.add_argument("--json", type=Path, help="Also write the results here.")
    evaluate.add_argument("--no-zero-shot", action="store_true", help="Skip the zero-shot baseline.")
    evaluate.add_argument("--batch-size", type=int, default=16, help="Prompts per decode batch (default 16).")
    _model_args(evaluate, dtype_default=None)
    evaluate.set_defaults(func=_guarded(_eval))

    examples = sub.add_parser("examples", help="The shipped example tasks: generate data, train, evaluate.")
    ex_sub = examples.add_subparsers(dest="examples_command", required=True)

    make_data = ex_sub.add_parser("make-data", help="Write each example task's train/held-out JSONL into DIR.")
    make_data.add_argument("dir", type=Path)
    make_data.add_argument("--tasks", nargs="+", help="Only these tasks (default: all).")
    make_data.set_defaults(func=_guarded(_examples_make_data))

    ex_train = ex_sub.add_parser("train", help="Train every example task and store the prefixes in --prefix-dir.")
    ex_train.add_argument(
        "--prefix-dir", type=Path, default=Path("prefixes"), help="Prefix store (default ./prefixes)."
    )
    ex_train.add_argument("--tasks", nargs="+", help="Only these tasks (default: all).")
    ex_train.add_argument("--steps", type=int, default=100, help="Steps per task (default 100).")
    ex_train.add_argument("--lr", type=float, default=1e-3)
    ex_train.add_argument("--batch-size", type=int, default=8)
    ex_train.add_argument("--num-virtual-tokens", type=int, default=20)
    ex_train.add_argument("--seed", type=int, default=0)
    ex_train.add_argument("--eval-every", type=int, default=25)
    ex_train.add_argument("--eval-limit", type=int, default=48, help="Held-out examples used while training.")
    ex_train.add_argument("--no-progress", action="store_true")
    _model_args(ex_train, dtype_default="float32")
    ex_train.set_defaults(func=_guarded(_examples_train))

    ex_eval = ex_sub.add_parser("eval", help="Held-out exact match per example task: zero-shot vs prefix.")
    ex_eval.add_argument("--prefix-dir", type=Path, default=Path("prefixes"), help="Prefix store (default ./prefixes).")
    ex_eval.add_argument("--tasks", nargs="+", help="Only these tasks (default: all).")
    ex_eval.add_argument("--json", type=Path, default=Path("examples-eval.json"), help="Results file.")
    ex_eval.add_argument("--limit", type=int, help="Only the first N held-out examples per task.")
    ex_eval.add_argument("--batch-size", type=int, default=16)
    _model_args(ex_eval, dtype_default=None)
    ex_eval.set_defaults(func=_guarded(_examples_eval))

    sweep = ex_sub.add_parser(
        "sweep",
        help="Low-data sweep: held-out exact match for random, MLP and real-word initialisation.",
        description="For each task, training-set size and initialisation (random K/V, the MLP reparameterisation, the "
        "K/V of the task's instruction) train the same number of steps from scratch and measure held-out exact match.",
    )
    sweep.add_argument("--tasks", nargs="+", help="Only these tasks (default: all).")
    sweep.add_argument("--sizes", nargs="+", type=int, default=[8, 32, 128], help="Training-set sizes (8 32 128).")
    sweep.add_argument("--inits", nargs="+", default=["random", "mlp", "text"], help="random mlp text (all).")
    sweep.add_argument("--steps", type=int, default=20, help="Steps per run, the same for every run (default 20).")
    sweep.add_argument("--lr-mlp", type=float, default=1e-3, help="Peak lr of the MLP variant (default 1e-3).")
    sweep.add_argument("--lr-kv", type=float, default=1e-2, help="Peak lr when the K/V are trained directly (1e-2).")
    sweep.add_argument("--batch-size", type=int, default=8)
    sweep.add_argument("--eval-limit", type=int, default=32, help="Held-out examples per task (default 32).")
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--json", type=Path, default=Path("sweep.json"), help="Results file.")
    sweep.add_argument("--no-progress", action="store_true")
    _model_args(sweep, dtype_default="float32")
    sweep.set_defaults(func=_guarded(_examples_sweep))


def _prefix_sites(text: str) -> str:
    """argparse type of --prefix-sites: the canonical spelling, or argparse's usage error with the reason."""
    from service.training.prefix_sites import parse_prefix_sites

    try:
        return parse_prefix_sites(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_args(parser: argparse.ArgumentParser, *, dtype_default: str | None) -> None:
    group = parser.add_argument_group("base model")
    group.add_argument("--model", help="Local HF model directory or .gguf file (default: embedded SmolLM2-135M).")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    dtype_help = "float32 by default: the prefix is trained in full precision" if dtype_default else "as serve"
    group.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=dtype_default or "auto",
                       help=dtype_help)  # fmt: skip
    group.add_argument("--cache-dir", type=Path, help="Model cache (default ~/.cache/prefix-serve).")
    group.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's choice). On a busy shared machine 1 can be "
        "several times faster: threads waiting for each other's core cost more than they gain.",
    )
    group.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")


# ---------------------------------------------------------------------------------------------------------------------
# Error handling shared by the commands


def _guarded(
    handler: Callable[[argparse.Namespace], int]
) -> Callable[[argparse.Namespace], int]:
    """Turn the expected failures into one clear line on stderr and an exit code; let bugs raise."""

    def run(args: argparse.Namespace) -> int:
        from service.errors import ServiceError
        from service.extras import extra_of_missing_module, needs_extra_message
        from service.logging_setup import configure_logging
        from service.training.errors import DataError, TrainingDivergedError

        configure_logging(getattr(args, "log_level", "info"), "text")  # a person reads these, not a log shipper
        try:
            return handler(args)
        except ModuleNotFoundError as exc:  # peft / tqdm: the `train` extra, which a serving install leaves out
            if not extra_of_missing_module(exc.name, "train"):
                raise
            print(f"error: {needs_extra_message(args.command, 'train', [str(exc.name)])}", file=sys.stderr)
            return _EXIT_BAD_INPUT
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return _EXIT_BAD_INPUT
        except TrainingDivergedError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return _EXIT_FAILED
        except ServiceError as exc:  # invalid task id, unsupported model, prefix that does not fit
            print(f"error: {exc.message}", file=sys.stderr)
            return _EXIT_BAD_INPUT
        except (FileNotFoundError, ValueError) as exc:  # model path, bad numbers (lr, steps, ...), unknown task
            logger.debug("failed", exc_info=True)  # --log-level debug shows where
            print(f"error: {exc}", file=sys.stderr)
            return _EXIT_BAD_INPUT

    return run


def _set_threads(args: argparse.Namespace) -> None:
    """--threads, checked, as torch's CPU thread count."""
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def _load_model(args: argparse.Namespace) -> LoadedModel:
    from service.model_loader import load_base_model
    from service.settings import Settings

    _set_threads(args)

    overrides: dict[str, Any] = {"model": args.model, "device": args.device, "dtype": args.dtype}
    if args.cache_dir is not None:
        overrides["cache_dir"] = args.cache_dir
    return load_base_model(Settings(**overrides))


# ---------------------------------------------------------------------------------------------------------------------
# train


def _train(args: argparse.Namespace) -> int:
    from service.registry import TaskInfo, validate_task_id
    from service.settings import Settings
    from service.training.data import load_examples, serving_template, validate_template
    from service.training.trainer import TrainConfig, save_adapter, train_prefix

    validate_task_id(args.task_id)  # before minutes of training, not at upload time
    validate_template(args.template)
    if args.prompt_template:
        from service.templates import validate_template as validate_prompt_template

        validate_prompt_template(args.prompt_template, max_chars=1 << 16)
    if args.init_task:
        validate_task_id(args.init_task)
    _check_encoder_prefix_args(args)
    direct = bool(args.init_text or args.init_task or args.no_prefix_projection)
    config = TrainConfig(
        num_virtual_tokens=args.num_virtual_tokens or 20,
        prefix_projection=not direct,
        init="text" if args.init_text else f"task:{args.init_task}" if args.init_task else "random",
        steps=args.steps,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        warmup_steps=args.warmup_steps,
        eval_every=args.eval_every,
        seed=args.seed,
        progress=not args.no_progress,
        prefix_sites=args.prefix_sites,
        encoder_virtual_tokens=args.encoder_virtual_tokens,
    )
    config.validate()
    train_examples = load_examples(args.data, args.template)
    eval_examples = load_examples(args.eval_data, args.template) if args.eval_data else []

    loaded = _load_model(args)
    _check_model_takes(args, loaded)
    init_embeddings = None
    if args.init_text or args.init_task:
        from service.training.trainer import init_from_adapter_dir, init_from_text

        if args.init_text:
            init_embeddings = init_from_text(loaded, args.init_text)
        else:
            init_embeddings = init_from_adapter_dir((args.prefix_dir or Settings().prefix_dir) / args.init_task, loaded)
        length = int(init_embeddings.shape[0])
        if args.num_virtual_tokens is not None and args.num_virtual_tokens != length:
            raise ValueError(
                f"--num-virtual-tokens {args.num_virtual_tokens} differs from the initial prefix's length {length} "
                "(the init text's token count / the task's V); leave it out"
            )
        config.num_virtual_tokens = length
        logger.info("initial prefix: %d virtual tokens from %s", length, config.init)
    result = train_prefix(
        loaded, train_examples, config, eval_examples=eval_examples, task_id=args.task_id,
        init_embeddings=init_embeddings,
    )  # fmt: skip
    prompt_template = args.prompt_template
    if prompt_template is None and all(e.templated for e in train_examples):
        prompt_template = serving_template(args.template)
    info = TaskInfo(prompt_template=prompt_template, description=args.description)
    out = save_adapter(result, args.out, loaded, info)

    weights = out / "adapter_model.safetensors"
    lengths = f"V={config.num_virtual_tokens}"
    if config.trains_encoder_prefix:
        lengths += f", encoder V={config.encoder_length()}"
    print(f"saved the prefix of task '{args.task_id}' to {out} ({lengths}, "
          f"{weights.stat().st_size:,} bytes): {result.total_steps} steps in {result.seconds:.1f} s, "
          f"final loss {result.losses[-1]:.4f}")  # fmt: skip
    if result.evals:
        last = result.evals[-1]
        em = last.exact_match
        print(f"held-out: loss {last.eval_loss:.4f}, exact match {em['correct']}/{em['total']} "
              f"({100 * em['accuracy']:.1f}%)")  # fmt: skip
    if prompt_template:
        print(f"task.json holds its prompt template {prompt_template!r}: send plain inputs, e.g. "
              f"POST /generate {json.dumps({'task_id': args.task_id, 'inputs': 'your text'})}")  # fmt: skip
    else:
        example = train_examples[0].prompt
        print(f"prompt it with the training prompt verbatim, e.g. "
              f"POST /generate {json.dumps({'task_id': args.task_id, 'inputs': example})}")  # fmt: skip

    if args.upload:
        return _upload(out, args)
    return 0


def _check_encoder_prefix_args(args: argparse.Namespace) -> None:
    """Flags that only make sense together, checked before any model is loaded."""
    from service.training.prefix_sites import FULL_SITES

    if args.encoder_virtual_tokens is not None and args.prefix_sites != FULL_SITES:
        raise ValueError(
            f"--encoder-virtual-tokens sets the encoder prefix's length: it needs --prefix-sites {FULL_SITES}"
        )
    if args.encoder_virtual_tokens is not None and args.encoder_virtual_tokens < 1:
        raise ValueError(f"--encoder-virtual-tokens must be >= 1, got {args.encoder_virtual_tokens}")


def _check_model_takes(args: argparse.Namespace, loaded: LoadedModel) -> None:
    """What the loaded model cannot train, named by the flag that asked for it (before minutes of training)."""
    from service.training.prefix_sites import FULL_SITES

    kind = loaded.geometry.model_type
    if args.prefix_sites == FULL_SITES and not loaded.geometry.is_encoder_decoder:
        raise ValueError(
            f"--prefix-sites {FULL_SITES} needs an encoder-decoder model (T5, BART): {loaded.name} ({kind}) is "
            "decoder-only and has no encoder to prefix; leave --prefix-sites out (its prefix is 'decoder')"
        )
    if loaded.geometry.is_encoder_decoder and (args.init_text or args.init_task):
        flag = "--init-text" if args.init_text else "--init-task"
        raise ValueError(
            f"{flag}: real-word initialisation is implemented for decoder-only models; {loaded.name} ({kind}) is an "
            "encoder-decoder model: train from a random init"
        )


def _upload(adapter_dir: Path, args: argparse.Namespace) -> int:
    """`prefix-serve upload` of the saved adapter: the same function that command runs, with its defaults."""
    from service.upload import upload_task

    return upload_task(args.upload, args.task_id, adapter_dir=adapter_dir, replace=args.replace, api_key=args.api_key)


# ---------------------------------------------------------------------------------------------------------------------
# eval


def _eval(args: argparse.Namespace) -> int:
    from service.runner import ModelRunner
    from service.settings import Settings
    from service.training.data import load_examples
    from service.training.evaluate import open_registry, prefix_from_adapter_dir
    from service.training.report import compare, markdown_table

    if args.adapter is None and args.task_id is None:
        raise ValueError("give --task-id (a task in --prefix-dir) or --adapter DIR")
    examples = load_examples(args.data, args.template)
    loaded = _load_model(args)
    if args.adapter is not None:
        task_id = args.task_id or "adapter"
        prefix = prefix_from_adapter_dir(args.adapter, task_id, loaded)
    else:
        task_id = args.task_id
        prefix = open_registry(args.prefix_dir or Settings().prefix_dir, loaded).get(task_id)
    runner = ModelRunner(loaded.model, loaded.tokenizer)
    report = compare(runner, task_id, examples, prefix, zero_shot=not args.no_zero_shot, batch_size=args.batch_size)
    print(markdown_table([report]))
    if args.json:
        _write_json(args.json, {"model": loaded.name, "data": str(args.data), "tasks": [report.to_json()]})
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# examples


def _selected_tasks(names: list[str] | None) -> list[Any]:
    from service.training.examples import EXAMPLE_TASKS, get_task

    return [get_task(n) for n in names] if names else list(EXAMPLE_TASKS.values())


def _examples_make_data(args: argparse.Namespace) -> int:
    from service.training.data import write_examples

    for task in _selected_tasks(args.tasks):
        for split in ("train", "heldout"):
            path = args.dir / task.task_id / f"{split}.jsonl"
            count = write_examples(path, task.records(split))
            print(f"wrote {count} examples to {path}")
        template = f" --template {json.dumps(task.template)}" if task.template else ""
        print(f"  train it: prefix-serve train --data {args.dir / task.task_id / 'train.jsonl'} "
              f"--eval-data {args.dir / task.task_id / 'heldout.jsonl'}{template} "
              f"--task-id {task.task_id} --out adapters/{task.task_id}")  # fmt: skip
    return 0


def _examples_train(args: argparse.Namespace) -> int:
    from service.registry import TaskInfo
    from service.training.evaluate import open_registry
    from service.training.trainer import TrainConfig, save_adapter, train_prefix

    tasks = _selected_tasks(args.tasks)
    loaded = _load_model(args)
    registry = open_registry(args.prefix_dir, loaded)
    rows = []
    for task in tasks:
        config = TrainConfig(
            num_virtual_tokens=args.num_virtual_tokens,
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            eval_every=args.eval_every,
            seed=args.seed,
            progress=not args.no_progress,
        )
        heldout = task.examples("heldout")[: args.eval_limit] if args.eval_limit else []
        result = train_prefix(loaded, task.examples("train"), config, eval_examples=heldout, task_id=task.task_id)
        with tempfile.TemporaryDirectory(prefix=f"prefix-serve-{task.task_id}-") as scratch:
            out = save_adapter(result, Path(scratch), loaded)
            # Stored through the registry itself, so the folder is exactly what an upload would have written.
            registry.put(
                task.task_id,
                (out / "adapter_config.json").read_bytes(),
                (out / "adapter_model.safetensors").read_bytes(),
                replace=True,
                info=TaskInfo(prompt_template=task.prompt_template, description=task.description),
            )
        em = result.final_exact_match
        rows.append((task.task_id, result.total_steps, result.seconds, result.losses[-1], em.summary() if em else "-"))
    print("| task | steps | seconds | final loss | held-out exact match (while training) |")
    print("|---|---|---|---|---|")
    for task_id, steps, seconds, loss, em in rows:
        print(f"| {task_id} | {steps} | {seconds:.0f} | {loss:.4f} | {em} |")
    print(f"stored in {args.prefix_dir}")
    return 0


def _examples_eval(args: argparse.Namespace) -> int:
    from service.runner import ModelRunner
    from service.training.evaluate import open_registry
    from service.training.report import compare, instructed_items, markdown_table

    tasks = _selected_tasks(args.tasks)
    loaded = _load_model(args)
    registry = open_registry(args.prefix_dir, loaded)
    runner = ModelRunner(loaded.model, loaded.tokenizer)
    reports: list[TaskReport] = []
    for task in tasks:
        records = task.records("heldout")[: args.limit]
        examples = task.examples("heldout")[: args.limit]
        instructed = instructed_items(
            runner, task.instruction, [task.raw_input(r) for r in records], [e.answer for e in examples]
        )
        reports.append(
            compare(
                runner,
                task.task_id,
                examples,
                registry.get(task.task_id),
                instructed=instructed,
                batch_size=args.batch_size,
            )
        )
    print(markdown_table(reports))
    _write_json(
        args.json, {"model": loaded.name, "prefix_dir": str(args.prefix_dir), "tasks": [r.to_json() for r in reports]}
    )
    print(f"wrote {args.json}")
    return 0


def _examples_sweep(args: argparse.Namespace) -> int:
    import time

    from service.training.sweep import markdown_table, run_sweep, write_json

    tasks = _selected_tasks(args.tasks)
    loaded = _load_model(args)
    started = time.perf_counter()
    rows = run_sweep(
        loaded,
        tasks,
        sizes=args.sizes,
        inits=args.inits,
        steps=args.steps,
        lr_mlp=args.lr_mlp,
        lr_kv=args.lr_kv,
        batch_size=args.batch_size,
        eval_limit=args.eval_limit,
        seed=args.seed,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - started
    print(markdown_table(rows, args.inits))
    meta = {"model": loaded.name, "argv": sys.argv[1:], "seconds": round(seconds, 1)}
    write_json(args.json, rows, meta)
    print(f"wrote {args.json} ({seconds:.0f} s)")
    return 0


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
