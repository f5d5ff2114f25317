"""Seeded benchmark workloads, random task prefixes in PEFT's saved format, and a synthetic tokenizer."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PrefixTuningConfig
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from service.geometry import PrefixGeometry

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
    special = set(tokenizer.all_special_ids)
    items = []
    for i in range(num_requests):
        length = rng.randint(*prompt_tokens)
        text = " ".join(rng.choice(_WORDS) for _ in range(length * 2))
        ids = [t for t in tokenizer(text, add_special_tokens=False)["input_ids"] if t not in special][:length]
        while len(ids) < length:  # a tokenizer that merges words heavily: pad with more words
            ids += tokenizer(" " + rng.choice(_WORDS), add_special_tokens=False)["input_ids"][: length - len(ids)]
        items.append(WorkItem(tasks[i % num_tasks], ids, rng.randint(*new_tokens)))
    rng.shuffle(items)
    return items


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
