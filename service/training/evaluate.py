"""Exact-match evaluation through the serving engine's own batched greedy decode (`service.batch.generate`).

Why not `PeftModel.generate`: on transformers 5.24 it silently ignores the prefix (see NOTES). Evaluating through the
engine also means the accuracy measured here is the accuracy `/generate` serves: same tokenization, same prefix
layout (`prompt_embeddings_to_kv`, as the registry does), same positions and stop rule.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.batch import generate
from service.model_loader import LoadedModel
from service.prefix import TaskPrefix, prompt_embeddings_to_kv
from service.registry import CONFIG_FILE, WEIGHTS_FILE, PrefixRegistry
from service.requests import GenerationRequest, SamplingParams
from service.runner import ModelRunner

logger = logging.getLogger(__name__)

DEFAULT_EVAL_BATCH = 16
_EXTRA_NEW_TOKENS = 4  # beyond the longest expected answer: an answer that runs on must show up as wrong


@dataclass(frozen=True)
class EvalItem:
    prompt: str  # for reports
    prompt_ids: list[int]  # what the model sees
    answer: str  # expected output, whitespace-stripped


@dataclass(frozen=True)
class Prediction:
    prompt: str
    expected: str
    generated: str

    @property
    def correct(self) -> bool:
        return self.generated.strip() == self.expected


@dataclass
class ExactMatch:
    predictions: list[Prediction] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.predictions)

    @property
    def correct(self) -> int:
        return sum(p.correct for p in self.predictions)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> str:
        return f"{self.correct}/{self.total} ({100 * self.accuracy:.1f}%)"

    def to_json(self, max_errors: int = 10) -> dict[str, Any]:
        errors = [p for p in self.predictions if not p.correct][:max_errors]
        return {
            "correct": self.correct,
            "total": self.total,
            "accuracy": round(self.accuracy, 4),
            "errors": [{"prompt": p.prompt, "expected": p.expected, "generated": p.generated} for p in errors],
        }


def max_new_tokens_for(items: Sequence[EvalItem], runner: ModelRunner) -> int:
    longest = max(
        (len(runner.tokenizer(" " + i.answer, add_special_tokens=False)["input_ids"]) for i in items), default=1
    )
    return longest + _EXTRA_NEW_TOKENS


def exact_match(
    runner: ModelRunner,
    items: Sequence[EvalItem],
    prefix: TaskPrefix | None,
    *,
    max_new_tokens: int | None = None,
    batch_size: int = DEFAULT_EVAL_BATCH,
) -> ExactMatch:
    """Greedy-decode every item (with `prefix`, or the bare model when None) and compare with its answer."""
    if max_new_tokens is None:
        max_new_tokens = max_new_tokens_for(items, runner)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    result = ExactMatch()
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        requests = [GenerationRequest(prompt_ids=list(i.prompt_ids), prefix=prefix, params=params) for i in chunk]
        for item, output in zip(chunk, generate(runner, requests)):
            result.predictions.append(Prediction(prompt=item.prompt, expected=item.answer, generated=output.text))
    return result


def prefix_from_embeddings(task_id: str, prompt_embeddings: torch.Tensor, loaded: LoadedModel) -> TaskPrefix:
    """PEFT's saved (V, L*2*token_dim) tensor -> the TaskPrefix the registry would build from it."""
    kv = prompt_embeddings_to_kv(
        prompt_embeddings.detach().to("cpu", torch.float32), loaded.geometry, dtype=loaded.dtype, device=loaded.device
    )
    return TaskPrefix(task_id=task_id, kv=kv, sha256="")


def open_registry(root: Path, loaded: LoadedModel, *, max_virtual_tokens: int = 256) -> PrefixRegistry:
    """A registry over `root` for `loaded`, with every stored task loaded."""
    registry = PrefixRegistry(
        root,
        loaded.geometry,
        device=loaded.device,
        dtype=loaded.dtype,
        served_model_name=loaded.name,
        max_virtual_tokens=max_virtual_tokens,
        max_prefix_bytes=256 * 1024 * 1024,
        max_config_bytes=64 * 1024,
    )
    registry.load_all()
    return registry


def prefix_from_adapter_dir(adapter_dir: Path, task_id: str, loaded: LoadedModel) -> TaskPrefix:
    """Load a saved PEFT adapter directory through a throwaway registry: the exact validation and conversion an
    upload goes through."""
    adapter_dir = Path(adapter_dir)
    config_bytes = (adapter_dir / CONFIG_FILE).read_bytes()
    weights_bytes = (adapter_dir / WEIGHTS_FILE).read_bytes()
    with tempfile.TemporaryDirectory(prefix="prefix-serve-eval-") as scratch:
        registry = open_registry(Path(scratch), loaded)
        _, _, warnings = registry.put(task_id, config_bytes, weights_bytes)
        for text in warnings:
            logger.warning("%s: %s", adapter_dir, text)
        return registry.get(task_id)
