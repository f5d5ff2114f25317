"""The prefix-tuning loop: PEFT `PrefixTuningConfig` on a frozen base model, AdamW with linear warmup and decay, loss
on the completion tokens only, periodic held-out loss and exact match, NaN guard.

Initialisation (Li & Liang 2021, section 7.2): `prefix_projection=True` (the default) trains the paper's
reparameterisation MLP from PEFT's random init. With `prefix_projection=False` the prefix parameters *are* the
per-layer K/V: they start random (PEFT's N(0, 1) embedding) or, given `init_embeddings`, from the activations of real
words (`service.text_prefix.text_prompt_embeddings` of an init text, or a stored task's prefix). The MLP variant
cannot start from given activations (its output is an MLP of a learnt embedding, not a free tensor), so real-word
initialisation always trains the K/V directly (decoder-only models).

Encoder-decoder models (T5, BART) train PEFT's SEQ_2_SEQ_LM prefix: the prompt goes through the encoder, the
completion is teacher-forced through the decoder after the served decoder start token (`service.training.
seq2seq_prefix`). The paper prefixes both sides, z = [PREFIX; x; PREFIX'; y], but PEFT only prefixes the decoder
(PREFIX'), so the decoder alone has to steer how a frozen encoder's reading of x is used. `prefix_sites=
"encoder,decoder"` trains the *full* prefix: besides PEFT's prompt encoder, an encoder prefix of
`encoder_virtual_tokens` tokens (its own MLP reparameterisation, or the K/V directly) that every encoder
self-attention attends to, through the attention plan the server itself uses (`service.seq2seq`). It is saved into
the same adapter directory: PEFT's files plus an `encoder_prompt_embeddings` tensor and an
`encoder_num_virtual_tokens` config key (`service.prefix_format`), and evaluated during training as served, both
halves together.

The base model is never modified: PEFT's prompt-learning wrapper adds a prompt encoder (embedding + the paper's
reparameterisation MLP) and feeds its output to the model as the key/value cache. The base model stays in eval mode:
it is not trained, and serving runs it in eval mode.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save_file as save_safetensors_file
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import get_linear_schedule_with_warmup

from service.model_loader import LoadedModel
from service.prefix_format import ENCODER_LENGTH_FIELD, ENCODER_WEIGHTS_TENSOR_NAME, validate_adapter
from service.registry import CONFIG_FILE, TASK_FILE, WEIGHTS_FILE, TaskInfo
from service.runner import ModelRunner
from service.training.data import Example
from service.training.encoding import EncodedExample, encode_examples
from service.training.errors import TrainingDivergedError
from service.training.evaluate import EvalItem, ExactMatch, exact_match
from service.training.objectives import (
    CausalObjective,
    Seq2SeqObjective,
    TrainingObjective,
    mean_target_loss,
    peft_prompt_embeddings,
)
from service.training.prefix_sites import DECODER_SITES, FULL_SITES, PREFIX_SITES
from service.training.seq2seq_prefix import TrainableEncoderPrefix, encode_seq2seq_examples, seq2seq_peft_config

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 100  # the example tasks peak on held-out data by ~75-100 steps; more only overfits them
TRAINING_LOG_FILE = "training_log.json"


@dataclass
class TrainConfig:
    num_virtual_tokens: int = 20
    prefix_projection: bool = True  # the paper's MLP reparameterisation; False trains the K/V directly
    init: str = "random"  # label for the log: "random", "text" (--init-text), "task:<id>" (--init-task)
    steps: int | None = None  # optimizer steps; exclusive with epochs; DEFAULT_STEPS when both are None
    epochs: float | None = None  # passes over the training examples
    lr: float = 1e-3  # NOTES: 1e-3 trains SmolLM2 in ~20 steps; 1e-2 and 3e-2 diverge
    batch_size: int = 8
    warmup_steps: int | None = None  # None: 5% of the steps, at least 1
    weight_decay: float = 0.01  # torch AdamW's default
    max_grad_norm: float = 1.0  # clip: one bad batch early on must not throw the MLP far off
    seed: int = 0
    eval_every: int = 50  # steps between held-out evaluations (and once at the end); 0 = only at the end
    eval_batch_size: int = 16
    progress: bool = True  # tqdm bar on stderr
    # Encoder-decoder models: "decoder" (PEFT's prefix) or "encoder,decoder" (the paper's full prefix).
    prefix_sites: str = DECODER_SITES
    encoder_virtual_tokens: int | None = None  # the full prefix's encoder length Ve; None: num_virtual_tokens

    @property
    def trains_encoder_prefix(self) -> bool:
        return self.prefix_sites == FULL_SITES

    def encoder_length(self) -> int:
        """Ve of the encoder prefix, 0 when none is trained."""
        if not self.trains_encoder_prefix:
            return 0
        return self.encoder_virtual_tokens if self.encoder_virtual_tokens is not None else self.num_virtual_tokens

    def validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(self.num_virtual_tokens >= 1, f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        check(self.steps is None or self.epochs is None, "give steps or epochs, not both")
        check(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        check(
            self.epochs is None or (math.isfinite(self.epochs) and self.epochs > 0),
            f"epochs must be > 0, got {self.epochs}",
        )
        check(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(
            self.warmup_steps is None or self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"
        )
        check(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        check(
            self.prefix_sites in PREFIX_SITES, f"prefix_sites must be one of {PREFIX_SITES}, got {self.prefix_sites!r}"
        )
        check(
            self.encoder_virtual_tokens is None or self.trains_encoder_prefix,
            f"encoder_virtual_tokens is the length of an encoder prefix; prefix_sites {self.prefix_sites!r} has none",
        )
        check(
            self.encoder_virtual_tokens is None or self.encoder_virtual_tokens >= 1,
            f"encoder_virtual_tokens must be >= 1, got {self.encoder_virtual_tokens}",
        )

    def total_steps(self, num_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * num_examples / self.batch_size))
        return DEFAULT_STEPS

    def warmup(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return max(1, round(0.05 * total_steps))


@dataclass
class EvalPoint:
    step: int
    train_loss: float
    eval_loss: float
    exact_match: dict[str, Any]


@dataclass
class TrainResult:
    peft_model: PeftModel
    task_id: str
    config: TrainConfig
    total_steps: int
    losses: list[float] = field(default_factory=list)  # training loss of every step
    evals: list[EvalPoint] = field(default_factory=list)
    seconds: float = 0.0
    trainable_params: int = 0
    all_params: int = 0
    final_exact_match: ExactMatch | None = None
    encoder_prefix: TrainableEncoderPrefix | None = None  # the full prefix's encoder half; None for PEFT's kind

    def prompt_embeddings(self) -> torch.Tensor:
        """What `save_pretrained` writes: (V, L*2*token_dim), the MLP already applied."""
        return peft_prompt_embeddings(self.peft_model)

    def encoder_prompt_embeddings(self) -> torch.Tensor | None:
        """The full prefix's `encoder_prompt_embeddings`: (Ve, encoder_layers*2*token_dim) float32, or None."""
        return self.encoder_prefix.prompt_embeddings() if self.encoder_prefix is not None else None

    def log_json(self) -> dict[str, Any]:
        config = asdict(self.config)
        config["encoder_virtual_tokens"] = self.config.encoder_length() or None  # the length trained, resolved
        return {
            "task_id": self.task_id,
            "config": config,
            "total_steps": self.total_steps,
            "seconds": round(self.seconds, 1),
            "trainable_params": self.trainable_params,
            "all_params": self.all_params,
            "losses": [round(x, 5) for x in self.losses],
            "evals": [asdict(e) for e in self.evals],
        }


def train_prefix(
    loaded: LoadedModel,
    train_examples: Sequence[Example],
    config: TrainConfig,
    *,
    eval_examples: Sequence[Example] = (),
    task_id: str = "task",
    init_embeddings: torch.Tensor | None = None,
) -> TrainResult:
    """Train a prefix for `loaded`'s (frozen) model. Raises TrainingDivergedError on a NaN/inf loss, DataError
    (from encoding) on examples that do not fit the context and ValueError on a config the model cannot take (e.g.
    an encoder prefix for a decoder-only model).

    Encoder-decoder models get PEFT's SEQ_2_SEQ_LM prefix, and with `config.prefix_sites="encoder,decoder"` the full
    prefix (see the module docstring).

    `init_embeddings`: PEFT-layout (num_virtual_tokens, L*2*token_dim) values the prefix starts from (real-word
    initialisation); needs `config.prefix_projection=False` and a decoder-only model."""
    config.validate()
    check_prefix_sites(config, loaded)
    if init_embeddings is not None:
        _check_init(init_embeddings, config, loaded)
    max_tokens = loaded.geometry.max_positions - config.num_virtual_tokens
    encode = encode_seq2seq_examples if loaded.geometry.is_encoder_decoder else encode_examples
    train_set = encode(train_examples, loaded.tokenizer, max_tokens=max_tokens, source="training data")
    eval_set = encode(eval_examples, loaded.tokenizer, max_tokens=max_tokens, source="eval data")
    pad_id = int(loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0)
    total_steps = config.total_steps(len(train_set))

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # PEFT 0.21 passes the prefix as `past_key_values`, renamed `cache` in transformers 5.24; its training
        # forward still works through the deprecated alias (NOTES), so the warning is noise here.
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        # Raised by PEFT 0.21's get_peft_model calling a transformers API renamed in 5.x; harmless.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        torch.manual_seed(config.seed)  # the prompt encoder's initialisation (then the encoder prefix's)
        peft_model = _wrap(loaded, config, init_embeddings)
        encoder_prefix = _encoder_prefix(loaded, config, peft_model)
        trainable, everything = peft_model.get_nb_trainable_parameters()
        if encoder_prefix is not None:
            extra = sum(p.numel() for p in encoder_prefix.parameters())
            trainable, everything = trainable + extra, everything + extra
        # The seed's print_trainable_parameters line, as a log line (stdout is the CLI's result output).
        logger.info(
            "trainable params: %s || all params: %s || trainable%%: %.4f",
            f"{trainable:,}",
            f"{everything:,}",
            100 * trainable / everything,
        )
        result = TrainResult(
            peft_model=peft_model,
            task_id=task_id,
            config=config,
            total_steps=total_steps,
            trainable_params=trainable,
            all_params=everything,
            encoder_prefix=encoder_prefix,
        )
        runner = ModelRunner(loaded.model, loaded.tokenizer)
        objective = _objective(loaded, peft_model, runner, encoder_prefix, pad_id)
        started = time.perf_counter()
        _run(loaded, objective, runner, train_set, eval_set, config, result)
        result.seconds = time.perf_counter() - started
    logger.info("trained %s: %d steps in %.1f s", task_id, total_steps, result.seconds)
    return result


def check_prefix_sites(config: TrainConfig, loaded: LoadedModel) -> None:
    """ValueError when the config asks for an encoder prefix the model has no encoder for."""
    if config.trains_encoder_prefix and not loaded.geometry.is_encoder_decoder:
        raise ValueError(
            f"prefix sites {config.prefix_sites!r} need an encoder-decoder model (T5, BART); {loaded.name} "
            f"({loaded.geometry.model_type}) is decoder-only: its prefix is {DECODER_SITES!r}"
        )


def require_decoder_only(loaded: LoadedModel, what: str) -> None:
    """Real-word initialisation computes a decoder-only model's K/V of a text; it has no encoder-decoder form."""
    if loaded.geometry.is_encoder_decoder:
        raise ValueError(
            f"{what} is implemented for decoder-only models; {loaded.name} ({loaded.geometry.model_type}) is an "
            "encoder-decoder model: train from a random init"
        )


def _check_init(init_embeddings: torch.Tensor, config: TrainConfig, loaded: LoadedModel) -> None:
    require_decoder_only(loaded, "real-word initialisation")
    if config.prefix_projection:
        raise ValueError(
            "a prefix initialised from real words trains the K/V directly (prefix_projection=False): the MLP "
            "reparameterisation cannot start from given activations"
        )
    expected = (config.num_virtual_tokens, loaded.geometry.numbers_per_virtual_token)
    if tuple(init_embeddings.shape) != expected:
        raise ValueError(f"init embeddings have shape {tuple(init_embeddings.shape)}, expected {expected}")
    if not bool(torch.isfinite(init_embeddings).all()):
        raise ValueError("init embeddings hold NaN/inf values")


def _wrap(loaded: LoadedModel, config: TrainConfig, init_embeddings: torch.Tensor | None = None) -> PeftModel:
    if loaded.geometry.is_encoder_decoder:
        peft_config = seq2seq_peft_config(loaded.geometry, config.num_virtual_tokens, config.prefix_projection)
    else:
        peft_config = PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=config.num_virtual_tokens,
            prefix_projection=config.prefix_projection,
        )
    peft_model = get_peft_model(loaded.model, peft_config)
    if init_embeddings is not None:
        # prefix_projection=False: PEFT's PrefixEncoder is one Embedding(V, L*2*token_dim) whose rows are the
        # saved prompt_embeddings, in the same layout; copying the activations there makes them the initial prefix.
        with torch.no_grad():
            weight = peft_model.prompt_encoder["default"].embedding.weight
            weight.copy_(init_embeddings.to(device=weight.device, dtype=weight.dtype))
    # PEFT records the model's name_or_path, for the embedded model a path under the user's home; the served name is
    # what the registry compares against, and keeps local paths out of shared artifacts.
    peft_model.peft_config["default"].base_model_name_or_path = loaded.name
    peft_model.prompt_encoder.to(loaded.device)
    return peft_model


def _encoder_prefix(
    loaded: LoadedModel, config: TrainConfig, peft_model: PeftModel
) -> TrainableEncoderPrefix | None:
    """The full prefix's encoder half, shaped like PEFT's prompt encoder (same MLP width), or None."""
    if not config.trains_encoder_prefix:
        return None
    hidden = peft_model.peft_config["default"].encoder_hidden_size
    module = TrainableEncoderPrefix(
        config.encoder_length(), loaded.geometry, prefix_projection=config.prefix_projection, hidden_size=hidden
    )
    return module.to(loaded.device)


def _objective(
    loaded: LoadedModel,
    peft_model: PeftModel,
    runner: ModelRunner,
    encoder_prefix: TrainableEncoderPrefix | None,
    pad_id: int,
) -> TrainingObjective:
    if loaded.geometry.is_encoder_decoder:
        return Seq2SeqObjective(peft_model, loaded, runner, encoder_prefix)
    return CausalObjective(peft_model, loaded, pad_id)


def _run(
    loaded: LoadedModel,
    objective: TrainingObjective,
    runner: ModelRunner,
    train_set: list[EncodedExample],
    eval_set: list[EncodedExample],
    config: TrainConfig,
    result: TrainResult,
) -> None:
    params = objective.parameters()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = result.total_steps
    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup(total), total)
    batches = _batch_stream(train_set, config.batch_size, config.seed)
    eval_items = [EvalItem(prompt=e.example.prompt, prompt_ids=e.prompt_ids, answer=e.example.answer) for e in eval_set]

    objective.train()
    loaded.model.eval()  # frozen: serving runs it in eval mode, so train against exactly that
    with (
        logging_redirect_tqdm(),
        tqdm(
            total=total, desc=f"train {result.task_id}", unit="step", disable=not config.progress, dynamic_ncols=True
        ) as bar,
    ):
        for step in range(1, total + 1):
            loss, _ = objective.loss(next(batches))
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                bar.close()
                raise TrainingDivergedError(
                    f"training stopped at step {step}/{total}: the loss became {loss_value} "
                    f"(lr {scheduler.get_last_lr()[0]:.3g} of --lr {config.lr:g}); nothing was saved. "
                    "Lower --lr (1e-3 suits the embedded SmolLM2), check the data, or train in float32."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            result.losses.append(loss_value)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
            bar.update(1)

            due = config.eval_every and step % config.eval_every == 0
            if eval_set and (due or step == total):
                point = _evaluate(objective, runner, eval_set, eval_items, config, result, step)
                bar.set_postfix(loss=f"{loss_value:.4f}", em=f"{point.exact_match['accuracy']:.2f}")
                objective.train()


def _evaluate(
    objective: TrainingObjective,
    runner: ModelRunner,
    eval_set: list[EncodedExample],
    eval_items: list[EvalItem],
    config: TrainConfig,
    result: TrainResult,
    step: int,
) -> EvalPoint:
    """Held-out loss (teacher forcing) and exact match of the prefix as served, every part of it included."""
    objective.eval()
    eval_loss = mean_target_loss(objective, eval_set, config.eval_batch_size)
    prefix = objective.serving_prefix(result.task_id)
    match = exact_match(runner, eval_items, prefix, batch_size=config.eval_batch_size)
    recent = result.losses[-min(len(result.losses), 10) :]
    point = EvalPoint(
        step=step,
        train_loss=round(sum(recent) / len(recent), 5),
        eval_loss=round(eval_loss, 5),
        exact_match=match.to_json(max_errors=3),
    )
    result.evals.append(point)
    result.final_exact_match = match
    logger.info(
        "step %d/%d: train loss %.4f (last %d steps), eval loss %.4f, exact match %s",
        step,
        result.total_steps,
        point.train_loss,
        len(recent),
        eval_loss,
        match.summary(),
    )
    return point


def _batch_stream(items: list[EncodedExample], batch_size: int, seed: int) -> Iterator[list[EncodedExample]]:
    """Endless full batches from seeded reshuffles of the data (a batch may span two passes)."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order.extend(torch.randperm(len(items), generator=generator).tolist())
        chosen, order = order[:batch_size], order[batch_size:]
        yield [items[i] for i in chosen]


def save_adapter(
    result: TrainResult, out_dir: Path | str, loaded: LoadedModel, info: TaskInfo | None = None
) -> Path:
    """Write the PEFT adapter directory (uploadable as is) plus training_log.json, and task.json (prompt template,
    description) when `info` says anything; check it like an upload. A full prefix's encoder half goes into the same
    files (`add_encoder_prefix`)."""
    out_dir = Path(out_dir)
    embeddings = result.prompt_embeddings()
    encoder_embeddings = result.encoder_prompt_embeddings()
    for tensor in (embeddings, encoder_embeddings):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise TrainingDivergedError("the trained prefix holds NaN/inf values; nothing was saved")
    out_dir.mkdir(parents=True, exist_ok=True)
    # save_embedding_layers=False: the default "auto" looks the base model's name up on the Hub.
    result.peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
    if encoder_embeddings is not None:
        add_encoder_prefix(out_dir, encoder_embeddings)
    validate_adapter(
        (out_dir / CONFIG_FILE).read_bytes(),
        (out_dir / WEIGHTS_FILE).read_bytes(),
        loaded.geometry,
        served_model_name=loaded.name,
        max_virtual_tokens=max(256, result.config.num_virtual_tokens, result.config.encoder_length()),
        max_prefix_bytes=1 << 30,
        max_config_bytes=1 << 20,
    )
    (out_dir / TRAINING_LOG_FILE).write_text(json.dumps(result.log_json(), indent=2) + "\n", encoding="utf-8")
    if info is not None and not info.is_empty:
        (out_dir / TASK_FILE).write_text(json.dumps(info.to_json(), indent=2) + "\n", encoding="utf-8")
    logger.info("saved adapter to %s", out_dir)
    return out_dir


def add_encoder_prefix(adapter_dir: Path | str, encoder_prompt_embeddings: torch.Tensor) -> None:
    """Turn a saved PEFT SEQ_2_SEQ_LM prefix into a full prefix: the encoder half (Ve, encoder_layers*2*token_dim)
    joins `prompt_embeddings` in adapter_model.safetensors (float32, PEFT's {"format": "pt"} metadata) and
    adapter_config.json gains `encoder_num_virtual_tokens` = Ve (written as PEFT writes the file)."""
    adapter_dir = Path(adapter_dir)
    weights_path, config_path = adapter_dir / WEIGHTS_FILE, adapter_dir / CONFIG_FILE
    tensors = load_safetensors_file(str(weights_path))
    tensors[ENCODER_WEIGHTS_TENSOR_NAME] = encoder_prompt_embeddings.detach().to("cpu", torch.float32).contiguous()
    save_safetensors_file(tensors, str(weights_path), metadata={"format": "pt"})
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config[ENCODER_LENGTH_FIELD] = int(encoder_prompt_embeddings.shape[0])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def init_from_text(loaded: LoadedModel, text: str, *, max_tokens: int = 4096) -> torch.Tensor:
    """Real-word initialisation: the frozen model's K/V of `text` in PEFT's layout, (V, L*2*token_dim) float32,
    V = the text's token count."""
    from service.text_prefix import text_prompt_embeddings, text_token_ids

    require_decoder_only(loaded, "initialisation from a text")
    ids = text_token_ids(loaded.tokenizer, text, max_tokens=min(max_tokens, loaded.geometry.max_positions - 1))
    return text_prompt_embeddings(loaded.model, ids, loaded.geometry)


def init_from_adapter_dir(adapter_dir: Path | str, loaded: LoadedModel) -> torch.Tensor:
    """A stored prefix (any PEFT prefix adapter directory, e.g. a task in the prefix store or one downloaded with
    GET /prefixes/{task_id}/adapter) as initial values, validated like an upload."""
    require_decoder_only(loaded, "initialisation from a stored prefix")
    adapter_dir = Path(adapter_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (adapter_dir / name).is_file():
            raise FileNotFoundError(f"{adapter_dir / name} not found (expected a PEFT prefix adapter directory)")
    validated = validate_adapter(
        (adapter_dir / CONFIG_FILE).read_bytes(),
        (adapter_dir / WEIGHTS_FILE).read_bytes(),
        loaded.geometry,
        served_model_name=loaded.name,
        max_virtual_tokens=loaded.geometry.max_positions - 1,
        max_prefix_bytes=1 << 34,
        max_config_bytes=1 << 20,
    )
    return validated.prompt_embeddings
