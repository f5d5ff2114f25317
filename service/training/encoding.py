"""Examples -> token ids, and right-padded training batches with the loss on the completion only.

The prompt is tokenized exactly as `POST /generate` tokenizes `inputs` (`add_special_tokens=True`, no chat
template), the completion separately without special tokens, then the tokenizer's end-of-sequence token, so the
model learns to stop where the server stops. Training pads on the right: the real tokens then sit at positions
V, V+1, ... after the V virtual tokens, as they do at serving time (see service/batch.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from service.training.data import Example
from service.training.errors import DataError

IGNORE_INDEX = -100  # label value the loss skips (PyTorch's cross-entropy default)


@dataclass(frozen=True)
class EncodedExample:
    prompt_ids: list[int]
    target_ids: list[int]  # completion tokens + eos
    example: Example

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a prompt, the same way the /generate route computes them."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_examples(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, *, max_tokens: int, source: str = "data"
) -> list[EncodedExample]:
    """Tokenize examples; DataError (naming lines) for ones that are empty or longer than `max_tokens`."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no end-of-sequence token; the model could not learn where to stop")
    encoded: list[EncodedExample] = []
    problems: list[str] = []
    for example in examples:
        where = f"line {example.line}" if example.line else f"example {len(encoded) + len(problems) + 1}"
        prompt_ids = encode_prompt(tokenizer, example.prompt)
        completion_ids = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
        if not prompt_ids:
            problems.append(f"{where}: the prompt encodes to zero tokens")
        elif not completion_ids:
            problems.append(f"{where}: the completion encodes to zero tokens")
        elif len(prompt_ids) + len(completion_ids) + 1 > max_tokens:
            problems.append(
                f"{where}: {len(prompt_ids) + len(completion_ids) + 1} tokens (prompt + completion + eos); "
                f"at most {max_tokens} fit next to the prefix in the model's context"
            )
        else:
            encoded.append(EncodedExample(prompt_ids, completion_ids + [eos], example))
    if problems:
        shown = problems[:20] + (["..."] if len(problems) > 20 else [])
        raise DataError(f"{source}: {len(problems)} unusable example(s):\n  " + "\n  ".join(shown))
    return encoded


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor  # (B, T), 1 for real tokens
    labels: torch.Tensor  # (B, T), IGNORE_INDEX outside the targets

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(items: Sequence[EncodedExample], pad_token_id: int) -> Batch:
    """Right-pad prompt + target; labels are the target tokens only (the model shifts them itself)."""
    width = max(item.length for item in items)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        ids = item.prompt_ids + item.target_ids
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        labels[row, len(item.prompt_ids) : len(ids)] = torch.tensor(item.target_ids, dtype=torch.long)
    return Batch(input_ids, attention_mask, labels)
