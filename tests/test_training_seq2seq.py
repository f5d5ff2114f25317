"""Prefix training on encoder-decoder models: PEFT's decoder prefix (a real PEFT SEQ_2_SEQ_LM file) and the paper's
full prefix (encoder + decoder), through `train_prefix` and `prefix-serve train`.

Tiny random T5 and BART models (2 encoder, 3 decoder layers) and the word-level test tokenizer ("t5 t6" <-> [5, 6]);
every training run is a few dozen steps, so the file runs in seconds on CPU.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from service.batch import generate
from service.cli import main as cli_main
from service.model_loader import LoadedModel, wrap_model
from service.prefix import TaskPrefix
from service.prefix_format import ENCODER_LENGTH_FIELD, ENCODER_WEIGHTS_TENSOR_NAME, WEIGHTS_TENSOR_NAME
from service.registry import CONFIG_FILE, WEIGHTS_FILE
from service.requests import GenerationRequest, SamplingParams
from service.runner import ModelRunner
from service.seq2seq_attention import Seq2SeqPlan, active_plan
from service.training.data import Example
from service.training.encoding import IGNORE_INDEX
from service.training.evaluate import open_registry, prefix_from_adapter_dir
from service.training.prefix_sites import FULL_SITES, parse_prefix_sites
from service.training.seq2seq_prefix import collate_seq2seq, encode_seq2seq_examples
from service.training.trainer import TrainConfig, TrainResult, save_adapter, train_prefix
from tests.helpers import (
    EOS,
    peft_seq2seq_greedy,
    read_adapter,
    tiny_bart,
    tiny_llama,
    tiny_t5,
    tiny_tokenizer,
)

MODELS: dict[str, Callable[[], torch.nn.Module]] = {"t5": tiny_t5, "bart": tiny_bart}
NEW_TOKENS = 6
# lr 0.05: a tiny random model and a handful of examples; the MLP learns them in a few dozen steps at this rate.
FAST = {"num_virtual_tokens": 4, "lr": 0.05, "batch_size": 4, "eval_every": 0, "progress": False}


def loaded_seq2seq(kind: str) -> LoadedModel:
    return wrap_model(MODELS[kind](), tiny_tokenizer(128), f"tiny-{kind}")


def prompt_to_answer_task(n: int = 4, seed: int = 0) -> list[Example]:
    """n random prompts, each with its own two-word answer (" t10 t30", " t11 t31", ...): the prefix must make the
    decoder read the prompt, not just learn one constant output."""
    rng = random.Random(seed)
    prompts = [" ".join(f"t{rng.randint(40, 120)}" for _ in range(rng.randint(2, 5))) for _ in range(n)]
    return [Example(prompt, f" t{10 + i} t{30 + i}", line=i + 1) for i, prompt in enumerate(prompts)]


def served_tokens(loaded: LoadedModel, prefix: TaskPrefix | None, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of `prompts` through the server's batched decode (`service.batch.generate`)."""
    runner = ModelRunner(loaded.model, loaded.tokenizer)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    results = generate(runner, [GenerationRequest(prompt_ids=p, prefix=prefix, params=params) for p in prompts])
    return [r.token_ids for r in results]


def prompt_ids(loaded: LoadedModel, examples: list[Example]) -> list[list[int]]:
    return [loaded.tokenizer(e.prompt, add_special_tokens=True)["input_ids"] for e in examples]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads; on a busy CPU two threads waiting for each other are much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------------
# Encoding


def test_seq2seq_batches_feed_the_served_start_token_and_learn_the_completion() -> None:
    tokenizer = tiny_tokenizer(128)
    (item,) = encode_seq2seq_examples([Example("t5 t6 t7", "  t9 t10")], tokenizer, max_tokens=32)
    assert (item.prompt_ids, item.target_ids) == ([5, 6, 7], [9, 10, EOS])  # leading whitespace dropped, eos added
    (short,) = encode_seq2seq_examples([Example("t8", " t11")], tokenizer, max_tokens=32)

    batch = collate_seq2seq([item, short], pad_token_id=0, decoder_start_token_id=42)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]  # right-padded, as the server pads encoder inputs
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.decoder_input_ids.tolist() == [[42, 9, 10], [42, 11, 0]]  # teacher forcing after the start token
    assert batch.labels.tolist() == [[9, 10, EOS], [11, EOS, IGNORE_INDEX]]
    assert batch.target_tokens == 5


def test_training_feeds_the_served_decoder_start_token() -> None:
    """BART's decoder starts from eos, not from pad (T5's start): training must start where serving starts."""
    loaded = loaded_seq2seq("bart")
    starts: list[int] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        starts.extend(kwargs["decoder_input_ids"][:, 0].tolist())

    handle = loaded.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        train_prefix(loaded, prompt_to_answer_task(), TrainConfig(steps=1, **FAST))
    finally:
        handle.remove()
    served_start = ModelRunner(loaded.model, loaded.tokenizer).decoder_start_token_id
    assert served_start == EOS and starts and set(starts) == {served_start}


def test_prefix_sites_parse_and_check() -> None:
    assert parse_prefix_sites("decoder") == "decoder"
    assert parse_prefix_sites("decoder, encoder") == parse_prefix_sites("encoder,decoder") == FULL_SITES
    for bad, needle in (("encoder", "always trained"), ("cross", "must be one of"), ("", "must be one of")):
        with pytest.raises(ValueError, match=needle):
            parse_prefix_sites(bad)
    with pytest.raises(ValueError, match="encoder_virtual_tokens"):
        TrainConfig(encoder_virtual_tokens=3).validate()  # a length for an encoder prefix that is not trained
    assert TrainConfig(prefix_sites=FULL_SITES, num_virtual_tokens=5).encoder_length() == 5
    assert TrainConfig().encoder_length() == 0


# ---------------------------------------------------------------------------------------------------------------------
# PEFT's decoder prefix: a real PEFT file


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_peft_prefix_loads_in_peft_and_decodes_as_served(kind: str, tmp_path: Path) -> None:
    loaded = loaded_seq2seq(kind)
    examples = prompt_to_answer_task()
    result = train_prefix(loaded, examples, TrainConfig(steps=30, **FAST), task_id="peft-kind")
    out = save_adapter(result, tmp_path / "adapter", loaded)

    config = json.loads((out / CONFIG_FILE).read_text())
    assert (config["task_type"], config["num_transformer_submodules"]) == ("SEQ_2_SEQ_LM", 2)
    # The decoder's depth and heads x head size, not PEFT's defaults (the encoder's depth 2; T5's d_model 32).
    token_dim = {"t5": 4 * 16, "bart": 32}[kind]
    assert (config["num_layers"], config["token_dim"], config["num_attention_heads"]) == (6, token_dim, 4)  # 2 x the decoder depth: every layer its own rows
    assert ENCODER_LENGTH_FIELD not in config
    assert set(load_file(out / WEIGHTS_FILE)) == {WEIGHTS_TENSOR_NAME}

    peft_model = PeftModel.from_pretrained(MODELS[kind](), str(out)).eval()  # PEFT itself, on a fresh copy
    start = ModelRunner(loaded.model, loaded.tokenizer).decoder_start_token_id
    prompts = prompt_ids(loaded, examples)
    reference = [peft_seq2seq_greedy(peft_model, p, NEW_TOKENS, decoder_start_token_id=start) for p in prompts]
    served = served_tokens(loaded, prefix_from_adapter_dir(out, "peft-kind", loaded), prompts)
    assert served == reference
    assert served != served_tokens(loaded, None, prompts)  # the prefix is what made the difference


# ---------------------------------------------------------------------------------------------------------------------
# The full prefix (encoder + decoder)


@dataclass
class FullPrefixRun:
    loaded: LoadedModel
    examples: list[Example]
    result: TrainResult
    out: Path


@pytest.fixture(scope="module", params=["t5", "bart"])
def full_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FullPrefixRun:
    """A full prefix (V=4, Ve=3) trained on the prompt -> answer task, evaluated on its own training set."""
    loaded = loaded_seq2seq(request.param)
    examples = prompt_to_answer_task()
    config = TrainConfig(steps=60, prefix_sites=FULL_SITES, encoder_virtual_tokens=3, **FAST)
    result = train_prefix(loaded, examples, config, eval_examples=examples, task_id="full")
    out = save_adapter(result, tmp_path_factory.mktemp(f"full-{request.param}") / "full", loaded)
    return FullPrefixRun(loaded, examples, result, out)


def test_full_prefix_is_saved_in_one_adapter_that_validates(full_run: FullPrefixRun, tmp_path: Path) -> None:
    loaded, out = full_run.loaded, full_run.out
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config[ENCODER_LENGTH_FIELD] == 3 and config["num_virtual_tokens"] == 4
    assert config["task_type"] == "SEQ_2_SEQ_LM" and config["base_model_name_or_path"] == loaded.name
    tensors = load_file(out / WEIGHTS_FILE)
    g = loaded.geometry
    assert tensors[WEIGHTS_TENSOR_NAME].shape == (4, 2 * g.num_layers * 2 * g.token_dim)
    assert tensors[ENCODER_WEIGHTS_TENSOR_NAME].shape == (3, g.encoder_num_layers * 2 * g.token_dim)
    assert tensors[ENCODER_WEIGHTS_TENSOR_NAME].dtype == torch.float32
    assert torch.equal(tensors[ENCODER_WEIGHTS_TENSOR_NAME], full_run.result.encoder_prompt_embeddings())

    registry = open_registry(tmp_path / "store", loaded)
    record, created, warnings = registry.put("full", *read_adapter(out))
    assert created and warnings == []
    assert registry.get("full").encoder_virtual_tokens == 3 and registry.get("full").num_virtual_tokens == 4

    log = json.loads((out / "training_log.json").read_text())
    assert log["config"]["prefix_sites"] == FULL_SITES and log["config"]["encoder_virtual_tokens"] == 3


def test_full_prefix_fits_its_training_set(full_run: FullPrefixRun) -> None:
    result, loaded = full_run.result, full_run.loaded
    first, last = result.losses[0], sum(result.losses[-10:]) / 10
    assert last < 0.5 * first, result.losses
    assert result.final_exact_match is not None and result.final_exact_match.accuracy == 1.0, (
        result.final_exact_match.to_json()
    )
    # The same through the registry's prefix, and the encoder half carries weight: served without it, the decoder
    # half alone answers differently.
    full = prefix_from_adapter_dir(full_run.out, "full", loaded)
    prompts = prompt_ids(loaded, full_run.examples)
    answers = [loaded.tokenizer.decode(t, skip_special_tokens=True) for t in served_tokens(loaded, full, prompts)]
    assert answers == [e.answer for e in full_run.examples]
    decoder_half = TaskPrefix("decoder-half", full.kv, "")
    assert served_tokens(loaded, decoder_half, prompts) != served_tokens(loaded, full, prompts)


def test_training_forward_is_what_the_server_computes(full_run: FullPrefixRun) -> None:
    """Greedy decoding with the training forward (PEFT's decoder prefix, the encoder prefix through the attention
    plan) gives the server's tokens for the saved adapter."""
    loaded, result = full_run.loaded, full_run.result
    assert result.encoder_prefix is not None
    start = ModelRunner(loaded.model, loaded.tokenizer).decoder_start_token_id
    prompts = prompt_ids(loaded, full_run.examples)
    result.peft_model.eval()
    plan = Seq2SeqPlan(result.encoder_prefix.plan_prefix(1, dtype=loaded.dtype, device=loaded.device))
    with torch.no_grad(), active_plan(plan):
        trained = [peft_seq2seq_greedy(result.peft_model, p, NEW_TOKENS, decoder_start_token_id=start) for p in prompts]
    assert trained == served_tokens(loaded, prefix_from_adapter_dir(full_run.out, "full", loaded), prompts)


@pytest.mark.parametrize("prefix_projection", [True, False], ids=["mlp", "direct"])
def test_gradients_reach_the_encoder_prefix(prefix_projection: bool) -> None:
    loaded = loaded_seq2seq("t5")
    config = TrainConfig(steps=1, prefix_sites=FULL_SITES, **{**FAST, "prefix_projection": prefix_projection})
    result = train_prefix(loaded, prompt_to_answer_task(), config)
    assert result.encoder_prefix is not None
    for name, param in result.encoder_prefix.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name  # the step's own backward
    encoder_params = sum(p.numel() for p in result.encoder_prefix.parameters())
    peft_params = sum(p.numel() for p in result.peft_model.prompt_encoder.parameters())
    assert result.trainable_params == encoder_params + peft_params


def test_full_prefix_training_is_reproducible() -> None:
    """One seed: the same PEFT prompt encoder and encoder prefix inits, batches and result."""
    config = {"steps": 3, "prefix_sites": FULL_SITES, **FAST}
    first = train_prefix(loaded_seq2seq("t5"), prompt_to_answer_task(), TrainConfig(**config))
    second = train_prefix(loaded_seq2seq("t5"), prompt_to_answer_task(), TrainConfig(**config))
    assert torch.equal(first.prompt_embeddings(), second.prompt_embeddings())
    assert torch.equal(first.encoder_prompt_embeddings(), second.encoder_prompt_embeddings())


def test_an_encoder_prefix_needs_an_encoder() -> None:
    llama = wrap_model(tiny_llama(seed=0), tiny_tokenizer(128), "tiny-llama")
    with pytest.raises(ValueError, match="need an encoder-decoder model"):
        train_prefix(llama, prompt_to_answer_task(), TrainConfig(steps=1, prefix_sites=FULL_SITES, **FAST))


# ---------------------------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def t5_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-t5")
    tiny_t5().save_pretrained(path)
    tiny_tokenizer(128).save_pretrained(path)
    return path


def write_task(path: Path, examples: list[Example]) -> Path:
    lines = [json.dumps({"prompt": e.prompt, "completion": e.completion}) for e in examples]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_cli_trains_a_full_prefix(t5_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_task(tmp_path / "train.jsonl", prompt_to_answer_task())
    out = tmp_path / "adapter"
    code = cli_main([
        "train", "--data", str(data), "--eval-data", str(data), "--task-id", "cli-full", "--out", str(out),
        "--model", str(t5_model_dir), "--prefix-sites", "encoder,decoder", "--encoder-virtual-tokens", "2",
        "--num-virtual-tokens", "4", "--steps", "20", "--lr", "0.05", "--batch-size", "4", "--no-progress",
        "--log-level", "warning",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "(V=4, encoder V=2," in printed

    from service.model_loader import load_base_model
    from service.settings import Settings

    loaded = load_base_model(Settings(model=str(t5_model_dir), device="cpu", dtype="float32"))
    prefix = prefix_from_adapter_dir(out, "cli-full", loaded)  # validated like an upload
    assert (prefix.num_virtual_tokens, prefix.encoder_virtual_tokens) == (4, 2)
    log = json.loads((out / "training_log.json").read_text())
    assert log["config"]["prefix_sites"] == FULL_SITES and log["config"]["encoder_virtual_tokens"] == 2


def test_cli_refuses_real_word_init_on_an_encoder_decoder_model(
    t5_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_task(tmp_path / "train.jsonl", prompt_to_answer_task())
    code = cli_main([
        "train", "--data", str(data), "--task-id", "t", "--out", str(tmp_path / "out"), "--model", str(t5_model_dir),
        "--init-text", "t5 t6 t7", "--steps", "1", "--no-progress", "--log-level", "error",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--init-text" in err and "decoder-only" in err, err


def test_cli_refuses_an_encoder_prefix_for_a_decoder_only_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "tiny-llama"
    tiny_llama(seed=0).save_pretrained(model_dir)
    tiny_tokenizer(128).save_pretrained(model_dir)
    data = write_task(tmp_path / "train.jsonl", prompt_to_answer_task())
    base = ["train", "--data", str(data), "--task-id", "t", "--out", str(tmp_path / "out"), "--steps", "1",
            "--no-progress", "--log-level", "error"]  # fmt: skip

    code = cli_main([*base, "--model", str(model_dir), "--prefix-sites", "encoder,decoder"])
    err = capsys.readouterr().err
    assert code == 2 and "--prefix-sites encoder,decoder needs an encoder-decoder model" in err, err
    assert not (tmp_path / "out").exists()

    code = cli_main([*base, "--model", str(model_dir), "--encoder-virtual-tokens", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "--encoder-virtual-tokens" in err and "--prefix-sites encoder,decoder" in err, err

    with pytest.raises(SystemExit) as exit_info:
        cli_main([*base, "--prefix-sites", "encoder"])
    assert exit_info.value.code == 2 and "--prefix-sites" in capsys.readouterr().err
