"""The slot layout's step schedule as a value, and the pure function that computes it (no model, no tensors).

Each step carries the next token of every decoding row, then prompt chunks of rows still prefilling, as many prompt
tokens as the step's token budget leaves (chunked prefill, vLLM's scheduling). Kept apart from `scheduling.slots`
so that the batch that executes a schedule (`service.slots.SlotBatch`) can name it without an import circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from service.rows import Row
from service.settings import setting_default


@dataclass(frozen=True)
class SlotLimits:
    """The slot layout's budgets. The engine derives them from its EngineLimits (`EngineLimits.slot_limits()`); the
    defaults are Settings' own, so a SlotLimits() built directly (tests, bench) runs the server's budgets."""

    num_slots: int = setting_default("max_running_rows")  # most rows running at once
    max_kv_tokens: int = setting_default("max_kv_tokens")  # store (slots x width) + bank columns, in tokens
    step_token_budget: int = setting_default("step_token_budget")  # most tokens in one forward while rows are decoding
    # Most prompt tokens in one forward when no row is decoding (None: 8 x step_token_budget). It bounds how long one
    # step can take, so how far past its deadline a long prompt can run and how long a new request may wait behind
    # another's prefill.
    idle_token_budget: int | None = setting_default("idle_token_budget")

    @property
    def idle_budget(self) -> int:
        return self.idle_token_budget or 8 * self.step_token_budget


@dataclass(frozen=True)
class SlotSchedule:
    """One step: the decoding rows (by slot) and the prompt chunks (row, tokens) it carries, under `token_budget`."""

    decoding: list[Row]
    chunks: list[tuple[Row, int]]
    token_budget: int  # the step's limit: decode tokens + prompt tokens <= it (a decode row always gets its token)

    @property
    def empty(self) -> bool:
        return not self.decoding and not self.chunks

    @property
    def num_tokens(self) -> int:
        return len(self.decoding) + sum(n for _, n in self.chunks)


def schedule_step(rows: Sequence[Row], limits: SlotLimits) -> SlotSchedule:
    """Decode first: every decoding row's next token; then prompt chunks of prefilling rows in admission order, a long
    prompt split across steps, until the budget is spent (at least one prompt token per step, so prefill always
    advances)."""
    decoding = sorted((r for r in rows if not r.prefilling and not r.finished), key=lambda r: r.slot)
    # The budget protects decoding rows' inter-token latency; with none decoding, nobody waits on this step, so
    # prefill as much as the idle budget allows (a burst of arrivals is then one forward, like a static batch).
    limit = limits.step_token_budget if decoding else limits.idle_budget
    budget = max(limit - len(decoding), 1)
    chunks: list[tuple[Row, int]] = []
    for row in rows:
        if budget <= 0:
            break
        if row.prefilling and not row.finished:
            n = min(len(row.request.prompt_ids) - row.cached, budget)
            chunks.append((row, n))
            budget -= n
    return SlotSchedule(decoding, chunks, limit)
