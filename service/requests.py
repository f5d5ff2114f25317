"""Engine-level request and result values: what the HTTP layer hands the scheduler and gets back."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from service.prefix import TaskPrefix


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)


@dataclass
class GenerationRequest:
    """One prompt for one task. `prefix` is resolved from the registry when the request is accepted, so a later
    replace or delete of the task never changes a request already in flight."""

    prompt_ids: list[int]
    prefix: TaskPrefix | None  # None = the bare base model (used by benchmarks)
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""

    @property
    def task_id(self) -> str | None:
        return self.prefix.task_id if self.prefix is not None else None

    @property
    def num_virtual_tokens(self) -> int:
        """Its task prefix's length V (0 for the bare base model)."""
        return self.prefix.num_virtual_tokens if self.prefix is not None else 0

    @property
    def reserved_kv_tokens(self) -> int:
        """KV tokens the request needs if it ran alone (prefix + prompt + max_new_tokens): what must fit the
        engine's budget for it ever to run, and the slot columns it may reach in the slot layout."""
        return self.num_virtual_tokens + len(self.prompt_ids) + self.params.max_new_tokens


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    seed: int | None = None
    queue_s: float = 0.0  # accepted -> admitted into a batch
    ttft_s: float = 0.0  # accepted -> first token
