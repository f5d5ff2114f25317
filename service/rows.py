"""One request's decode state, shared by both batch layouts (`service.slots` and the fallback `service.batch`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from service.errors import NonFiniteLogitsError, ServiceError
from service.kv_store import BankEntry
from service.requests import FinishReason, GenerationRequest, GenerationResult
from service.sampler import RowSampler


@dataclass(eq=False)
class Row:
    """Decode state of one request. Compared by identity: two rows are never the same request."""

    request: GenerationRequest
    sampler: RowSampler
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    emitted: int = 0  # generated tokens already handed to the caller
    # Slot layout only (service.slots): the row's slot, how many of its own tokens are in the KV store, and its
    # prefix's bank entry (its prefix is copied from there into the slot's first columns).
    slot: int = -1
    cached: int = 0
    bank_entry: BankEntry | None = None
    # Encoder-decoder rows (service.seq2seq): the decoder's ids start with this token, and the ids a logits processor
    # sees (a repetition penalty) are the decoder's, as in transformers' generate; the prompt went to the encoder.
    decoder_start_token_id: int | None = None
    # Why the row failed (its logits became non-finite): the engine answers its request with this, not a result.
    error: ServiceError | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.request.prompt_ids)

    @property
    def next_column(self) -> int:
        """Slot layout: the column of its slot, and the position, of its next token (its prefix fills the first
        columns, its cached tokens the next ones); every column before it is written."""
        return self.request.num_virtual_tokens + self.cached

    def history(self, device: torch.device) -> torch.Tensor:
        if self.decoder_start_token_id is not None:
            return torch.tensor([[self.decoder_start_token_id, *self.generated]], dtype=torch.long, device=device)
        return torch.tensor([self.request.prompt_ids + self.generated], dtype=torch.long, device=device)

    def accept(self, token: int, eos_token_ids: frozenset[int]) -> None:
        """Record a generated token and finish the row on EOS or length. Stop sequences are text, matched by the
        caller's output processor, which retires the row itself."""
        self.generated.append(token)
        params = self.request.params
        if token in eos_token_ids and not params.ignore_eos:
            self.finish_reason = FinishReason.EOS_TOKEN
        elif len(self.generated) >= params.max_new_tokens:
            self.finish_reason = FinishReason.LENGTH

    def result(self, text: str = "") -> GenerationResult:
        if self.error is not None:
            raise self.error
        assert self.finish_reason is not None
        return GenerationResult(
            token_ids=list(self.generated),
            text=text,
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.request.prompt_ids),
            seed=self.sampler.seed,
        )


class PaddedRows(ABC):
    """What the padded batch values (`service.batch.DecodeBatch`, `service.seq2seq.Seq2SeqBatch`) share: rows leave
    through `filter`, which each implements for its own tensors."""

    rows: list[Row]

    @abstractmethod
    def filter(self, keep: list[int]) -> None:
        """Keep only the rows at indices `keep` (in that order), and the tensors of those rows only."""

    def pop_finished(self) -> list[Row]:
        """Remove finished rows (freeing their KV) and return them."""
        done = [row for row in self.rows if row.finished]
        if done:
            self.filter([i for i, row in enumerate(self.rows) if not row.finished])
        return done


def padded_to(t: torch.Tensor, size: int, dim_from_end: int, *, left: bool) -> torch.Tensor:
    """`t` zero-padded along its dimension `-dim_from_end` to `size`, on the left or the right (batch concatenation:
    masked columns, which attention ignores)."""
    missing = size - t.shape[-dim_from_end]
    if not missing:
        return t
    return F.pad(t, (0, 0) * (dim_from_end - 1) + ((missing, 0) if left else (0, missing)))


_NO_TOKEN = -1  # marks a row whose logits are unusable, in the batch's one host sync


def select_tokens(rows: list[Row], logits: torch.Tensor, device: torch.device) -> list[int]:
    """The next token of each row from its logits row (one per row, any float dtype), with one host sync for the
    batch: greedy rows take the argmax (exact in the model's dtype: upcasting changes no order), other rows run
    their own processors and generator in float32 on the device.

    A row whose logits hold NaN or inf, or collapsed to one value, gets no token: it fails with NonFiniteLogitsError,
    and its place in the returned list holds a placeholder id the caller must not accept (the row is finished). Both
    come from an overflow inside the forward (a prefix's values too large for the computation): NaN/inf reach the
    logits, or a norm whose variance became inf zeroes the state and every logit is equal. An argmax would
    otherwise pick token 0, again and again."""
    # One pass gives each row's top logit and its index (NaN propagates into the max); with the row minimum that is
    # enough to tell unusable rows (NaN/inf, or every logit equal) without a third pass over the vocabulary: a full
    # isfinite() pass cost ~10% of a 32-row bf16 step on the CPU.
    top, chosen = logits.max(dim=-1)
    bottom = logits.amin(dim=-1)
    special = [i for i, row in enumerate(rows) if not row.sampler.is_plain_greedy]
    if special:
        picks = [
            rows[i].sampler.select_tensor(rows[i].history(device), logits[i : i + 1].float()) for i in special
        ]
        chosen = chosen.index_put((torch.tensor(special, device=chosen.device),), torch.stack(picks))
    usable = torch.isfinite(top) & torch.isfinite(bottom) & (top > bottom)
    tokens = torch.where(usable, chosen, _NO_TOKEN).tolist()
    for index, (row, token) in enumerate(zip(rows, tokens)):
        if token == _NO_TOKEN:
            if not row.finished:  # a row already done keeps its result whatever its leftover logits
                row.error = NonFiniteLogitsError(row.request.task_id, len(row.generated))
            tokens[index] = 0  # a valid id for the step's tensors; the row leaves before the next forward
    return tokens
