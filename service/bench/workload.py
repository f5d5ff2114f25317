"""Seeded benchmark workloads, random task prefixes in PEFT's saved format, and a synthetic tokenizer."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PrefixTuningConfig
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from service.geometry import PrefixGeometry
from service.text_prefix import adapter_config, text_prompt_embeddings

# Plain words for prompts on a real tokenizer; the exact text does not matter, only its token count.
_WORDS = (
    "the a service model prefix task batch token user request fast slow river mountain city garden music paper "
    "light morning evening question answer story report weather market school friend family travel window "
    "quiet bright happy careful simple early late green blue small large open closed write read build learn"
).split()


@dataclass(frozen=True)
class WorkItem:
    task_id: str | None
    prompt_ids: list[int]
    max_new_tokens: int


def task_ids(num_tasks: int) -> list[str]:
    return [f"bench-task-{i}" for i in range(num_tasks)]


def token_range(text: str) -> tuple[int, int]:
    """A command line's token range: "20-34" -> (20, 34), "32" -> (32, 32)."""
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def make_workload(
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_requests: int,
    num_tasks: int,
    prompt_tokens: tuple[int, int] = (20, 60),
    new_tokens: tuple[int, int] = (32, 64),
    seed: int = 0,
) -> list[WorkItem]:
    """`num_requests` prompts of prompt_tokens[0]..[1] tokens, spread round-robin over the tasks (shuffled)."""
    rng = random.Random(seed)
    tasks = task_ids(num_tasks)
    items = []
    for i in range(num_requests):
        ids = _word_ids(tokenizer, rng, rng.randint(*prompt_tokens))
        items.append(WorkItem(tasks[i % num_tasks], ids, rng.randint(*new_tokens)))
    rng.shuffle(items)
    return items


def _word_ids(tokenizer: PreTrainedTokenizerBase, rng: random.Random, length: int) -> list[int]:
    """Exactly `length` token ids of plain words (no special tokens). A tokenizer that knows none of the words (the
    synthetic one of random-init models maps them all to its unknown token) gets random ordinary ids instead."""
    special = set(tokenizer.all_special_ids)
    text = " ".join(rng.choice(_WORDS) for _ in range(length * 2))
    ids = [t for t in tokenizer(text, add_special_tokens=False)["input_ids"] if t not in special][:length]
    if not ids:
        ordinary = [t for t in range(len(tokenizer)) if t not in special]
        return [rng.choice(ordinary) for _ in range(length)]
    while len(ids) < length:  # a tokenizer that merges words heavily: pad with more words
        ids += tokenizer(" " + rng.choice(_WORDS), add_special_tokens=False)["input_ids"][: length - len(ids)]
    return ids


def write_random_prefixes(
    out_dir: Path, geometry: PrefixGeometry, *, num_tasks: int, num_virtual_tokens: int, model_name: str, seed: int = 0
) -> dict[str, Path]:
    """Random task prefixes saved exactly as PEFT saves a prefix adapter (config + `prompt_embeddings`), so both
    PEFT's `PeftModel.from_pretrained` and this service's registry load the same files."""
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for task in task_ids(num_tasks):
        adapter_dir = out_dir / task
        config = PrefixTuningConfig(
            task_type="SEQ_2_SEQ_LM" if geometry.is_encoder_decoder else "CAUSAL_LM",
            num_virtual_tokens=num_virtual_tokens,
            num_layers=geometry.num_layers,
            token_dim=geometry.token_dim,
            num_attention_heads=geometry.num_kv_heads,
            base_model_name_or_path=model_name,
            inference_mode=True,
        )
        config.save_pretrained(str(adapter_dir))
        embeddings = torch.randn((num_virtual_tokens, geometry.numbers_per_virtual_token), generator=generator)
        save_file({"prompt_embeddings": embeddings}, str(adapter_dir / "adapter_model.safetensors"), {"format": "pt"})
        adapters[task] = adapter_dir
    return adapters


def synthetic_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over "t3".."t{n-1}" (ids 3..n-1; <pad>=0, <s>=1, </s>=2) for randomly initialised
    models, which come with no tokenizer. Text "t5 t6" is ids [5, 6] and decodes back with single spaces."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"t{i}": i for i in range(3, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def write_text_prefixes(
    out_dir: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    geometry: PrefixGeometry,
    *,
    num_tasks: int,
    num_virtual_tokens: int,
    model_name: str,
    seed: int = 0,
) -> tuple[dict[str, Path], dict[str, list[int]]]:
    """Tasks made from text, saved in PEFT's format: each task's text is `num_virtual_tokens` tokens of plain words,
    its prefix the model's own K/V of those tokens (`service.text_prefix`), so a prompt served with the task computes
    what the task's tokens followed by the prompt compute. Returns the adapter dirs and each task's token ids (what a
    server without stored prefixes is sent in front of every prompt)."""
    rng = random.Random(seed + 7919)  # not the workload's stream: task texts differ from the prompts
    adapters: dict[str, Path] = {}
    token_ids: dict[str, list[int]] = {}
    for task in task_ids(num_tasks):
        ids = _word_ids(tokenizer, rng, num_virtual_tokens)
        embeddings = text_prompt_embeddings(model, ids, geometry)
        adapter_dir = out_dir / task
        adapter_dir.mkdir(parents=True, exist_ok=True)
        config = adapter_config(geometry, len(ids), model_name)
        (adapter_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file({"prompt_embeddings": embeddings}, str(adapter_dir / "adapter_model.safetensors"), {"format": "pt"})
        adapters[task] = adapter_dir
        token_ids[task] = ids
    return adapters, token_ids
