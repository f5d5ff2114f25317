"""Per-row token selection with transformers' own logits processors.

Each row keeps its own processors and its own random generator, so rows with different sampling parameters and
seeds can share one forward pass and a seeded row draws the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import secrets

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from service.requests import SamplingParams


class RowSampler:
    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.do_sample = params.do_sample
        self.processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        self.seed: int | None = None
        self.generator: torch.Generator | None = None
        if params.do_sample:
            if params.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k is not None and params.top_k > 0:
                self.processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p is not None and params.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(params.top_p))
            self.seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(self.seed)

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with no processors: the batch can take an argmax for this row without a per-row pass."""
        return not self.do_sample and len(self.processors) == 0

    def select_tensor(self, history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Pick the next token, without leaving the device (a 0-d long tensor, so a batch needs one host sync in
        all). `history` (1, n): the row's own prompt + generated ids, without padding. `logits` (1, vocab), float32."""
        scores = self.processors(history, logits) if len(self.processors) else logits
        if not self.do_sample:
            return scores[0].argmax()
        probs = torch.softmax(scores[0], dim=-1)
        # Extreme but valid parameters (temperature 1e-300, a penalty near 0) overflow the scores; sampling at a
        # temperature tending to 0 is greedy, so take that limit instead of failing the batch.
        finite = torch.isfinite(probs).all()
        safe = torch.where(finite, probs, torch.zeros_like(probs)).nan_to_num(0.0)
        safe[0] = torch.where(finite, safe[0], torch.ones((), dtype=safe.dtype, device=safe.device))
        drawn = torch.multinomial(safe, num_samples=1, generator=self.generator)[0]
        return torch.where(finite, drawn, logits[0].argmax())
