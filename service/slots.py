"""The running batch in the slot layout: rows in KV slots, one flat forward per step for decode and prefill alike.

`SlotBatch.execute(schedule)` runs a step that `service.scheduling.slot_schedule.schedule_step` decided (the next token
of every decoding row, then prompt chunks under the step's token budget): it builds one flat sequence, runs one forward
(the model reads its weights once for all of it) and selects each row's next token. Tokens sit at their PEFT
positions: a row with a V-token prefix has its prefix copied into columns [0, V) of its slot when it is admitted (from
the bank, where each task's prefix is held once), and its own token c at column and position V + c; it attends to its
slot's columns up to itself (see `service.attention`). Admission (by real memory: slots x width of the store plus the
bank's columns) is the scheduler's (`service.scheduling.slots`).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from service.attention import ChunkBatch, PrefillChunk, SlotCache, StepPlan, active_plan
from service.attention import register as register_slot_attention
from service.batch import DecodeBatch
from service.geometry import geometry_from_config
from service.kv_store import KVGeometry, PrefixBank, SlotStore
from service.llama_forward import llama_slot_forward
from service.prefix import TaskPrefix
from service.requests import GenerationRequest, SamplingParams
from service.runner import ModelRunner
from service.scheduling.slot_schedule import SlotLimits, SlotSchedule, schedule_step
from service.text_prefix import text_kv
from service.rows import Row, select_tokens
from service.sampler import RowSampler

logger = logging.getLogger(__name__)


class SlotBatch:
    def __init__(self, runner: ModelRunner, num_slots: int) -> None:
        self.runner = runner
        prefix_geometry = geometry_from_config(runner.model.config)
        geometry = KVGeometry(
            prefix_geometry.num_layers, prefix_geometry.num_kv_heads, prefix_geometry.head_dim, runner.dtype,
            runner.device,
        )
        self.store = SlotStore(geometry, num_slots, prefix_geometry.max_positions)
        self.bank = PrefixBank(geometry)
        self.rows: list[Row] = []  # admission order
        self._next_tokens: dict[int, int] = {}  # slot -> pending token (the last one sampled)
        self.last_plan: StepPlan | None = None  # kept for the start-up check and tests
        self.last_logits: torch.Tensor | None = None
        self._dummy_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=runner.device)
        self._own_forward = llama_slot_forward(runner.model)  # None: transformers' forward runs the step

    def __len__(self) -> int:
        return len(self.rows)

    # -- memory -----------------------------------------------------------------------------------------------------

    @property
    def kv_bytes_held(self) -> int:
        return self.store.nbytes + self.bank.nbytes

    # -- rows -------------------------------------------------------------------------------------------------------

    def add(self, request: GenerationRequest) -> Row:
        row = Row(request=request, sampler=RowSampler(request.params, self.runner.device))
        row.slot = self.store.allocate(request.reserved_kv_tokens)
        if request.prefix is not None:
            row.bank_entry = self.bank.acquire(request.prefix)
            self.store.write_prefix(row.slot, self.bank, row.bank_entry)
        self.rows.append(row)
        return row

    def remove(self, rows: Sequence[Row]) -> None:
        gone = set(map(id, rows))
        for row in rows:
            self.store.free(row.slot, written=row.next_column)
            self._next_tokens.pop(row.slot, None)
            if row.bank_entry is not None:
                self.bank.release(row.bank_entry)
        self.rows = [r for r in self.rows if id(r) not in gone]
        self.store.shrink_if_oversized()

    # -- one step ---------------------------------------------------------------------------------------------------

    def execute(self, schedule: SlotSchedule) -> list[Row]:
        """Run one step the scheduler decided: the inputs for its decode tokens and prompt chunks, one forward, one
        token per row that reached its next token. Returns those rows (decoding rows, and rows whose prefill completed
        in this step)."""
        decoding, chunks = schedule.decoding, schedule.chunks
        token_ids: list[int] = []
        positions: list[int] = []
        write_slots: list[int] = []  # each token's K/V goes to (its row's slot, its position)
        logit_rows: list[tuple[Row, int]] = []  # (row, flat index whose logits pick its next token)
        # A token's slot column is its position: its prefix fills the columns before its own tokens.
        for row in decoding:
            logit_rows.append((row, len(token_ids)))
            token_ids.append(self._next_tokens[row.slot])
            positions.append(row.next_column)
            write_slots.append(row.slot)
        plan_chunks: list[PrefillChunk] = []
        for row, n in chunks:
            start = len(token_ids)
            token_ids.extend(row.request.prompt_ids[row.cached : row.cached + n])
            first = row.next_column
            positions.extend(range(first, first + n))
            write_slots.extend([row.slot] * n)
            plan_chunks.append(PrefillChunk(row.slot, start, n, first))
            if row.cached + n == len(row.request.prompt_ids):
                logit_rows.append((row, start + n - 1))

        plan = self._plan(decoding, plan_chunks, write_slots, write_columns=positions)
        logits = self._forward(token_ids, positions, [i for _, i in logit_rows], plan)
        self.last_plan, self.last_logits = plan, logits

        for row in decoding:
            row.cached += 1
        for row, n in chunks:
            row.cached += n
        stepped = [row for row, _ in logit_rows]
        chosen = select_tokens(stepped, logits, self.runner.device)
        for row, token in zip(stepped, chosen):
            if row.finished:  # its logits were not finite (select_tokens failed it): no token
                continue
            row.accept(token, self.runner.eos_token_ids)
            self._next_tokens[row.slot] = token
        return stepped

    def _plan(
        self, decoding: list[Row], chunks: list[PrefillChunk], write_slots: list[int], write_columns: list[int]
    ) -> StepPlan:
        device = self.runner.device
        decode_ends = [r.next_column + 1 for r in decoding]  # columns each row sees, itself included
        decode_width = max(decode_ends, default=0)
        decode_visible = None
        if decoding:
            visible = torch.arange(decode_width) < torch.tensor(decode_ends)[:, None]
            decode_visible = visible[:, None, None, :].to(device)
        decode_slots = [r.slot for r in decoding]
        return StepPlan(
            num_decode=len(decoding),
            decode_slots=torch.tensor(decode_slots, dtype=torch.long, device=device),
            decode_dense=decode_slots == list(range(len(decode_slots))),
            decode_width=decode_width,
            decode_visible=decode_visible,
            chunk_batch=_chunk_batch(chunks, device) if chunks else None,
            write_slots=torch.tensor(write_slots, dtype=torch.long, device=device),
            write_columns=torch.tensor(write_columns, dtype=torch.long, device=device),
            store=self.store,
        )

    @torch.inference_mode()
    def _forward(self, token_ids: list[int], positions: list[int], logit_index: list[int], plan: StepPlan) -> torch.Tensor:
        runner = self.runner
        device = runner.device
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=device)
        position_ids = torch.tensor([positions], dtype=torch.long, device=device)
        index = torch.tensor(logit_index, dtype=torch.long, device=device)
        if self._own_forward is not None:
            with active_plan(plan):
                return self._own_forward(input_ids, position_ids, index, SlotCache(plan))
        kwargs: dict[str, object] = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            # A ready 4-D mask makes transformers skip building one: the plan is the mask.
            "attention_mask": self._dummy_mask,
            runner.cache_arg: SlotCache(plan),
            "use_cache": True,
        }
        if runner.accepts_logits_to_keep:
            kwargs["logits_to_keep"] = index
        with active_plan(plan):
            logits = runner.model(**kwargs).logits[0]
        if not runner.accepts_logits_to_keep:
            logits = logits.index_select(0, index)
        return logits  # the model's dtype: greedy argmax is exact on it; samplers upcast their own row


def _chunk_batch(chunks: list[PrefillChunk], device: torch.device) -> ChunkBatch:
    """Pad the step's prompt chunks into one attention call: chunk c's query i sees columns 0..first_column+i of its
    slot (its prefix, its earlier prompt tokens, this chunk up to itself); padding queries' output is dropped, padding
    keys are seen by nobody."""
    n = max(c.length for c in chunks)
    width = max(c.first_column + c.length for c in chunks)
    steps = torch.arange(n)
    query_valid = steps[None, :] < torch.tensor([c.length for c in chunks])[:, None]
    query_index = torch.where(query_valid, torch.tensor([c.start for c in chunks])[:, None] + steps[None, :], 0)
    last_visible = torch.tensor([c.first_column for c in chunks])[:, None] + steps[None, :]  # (C, n)
    mask = torch.arange(width)[None, None, :] <= last_visible[:, :, None]  # (C, n, O); column 0 is always seen
    return ChunkBatch(
        query_index=query_index.to(device),
        query_valid=query_valid.to(device),
        slots=torch.tensor([c.slot for c in chunks], device=device),
        width=width,
        mask=mask[:, None].to(device),
    )


def slot_layout_supported(runner: ModelRunner) -> bool:
    """Switch the model to slot attention if it can take it, once per runner; False (model untouched) otherwise.

    The model must run sdpa through transformers' attention registry and accept explicit positions; then a
    start-up check runs the same random-prefix requests through the padded layout (transformers' own cache and
    sdpa) and through the slot layout and requires the same logits, so an architecture whose attention has
    anything this path does not reproduce (ALiBi, softcapping, a module that bypasses the registry) falls back
    to the padded layout instead of serving different numbers.
    """
    model = runner.model
    if runner.is_encoder_decoder:
        return False  # the encoder-decoder batch (`service.seq2seq`) is padded
    cached = getattr(model, "_prefix_serve_slot_layout", None)  # per model: several runners may share one
    if cached is None:
        cached = _check_slot_layout(runner)
        model._prefix_serve_slot_layout = cached
    return cached


def slot_attention_installed(runner: ModelRunner) -> bool:
    """Whether `slot_layout_supported` already passed on this runner's model (no forward: the flag it leaves)."""
    return getattr(runner.model, "_prefix_serve_slot_layout", None) is True and not runner.is_encoder_decoder


def _own_kv_prefix(runner: ModelRunner, tokens: list[int], name: str) -> TaskPrefix:
    """The model's own keys/values for `tokens` at positions 0.. as a task prefix (what a task made from text holds)."""
    kv = text_kv(runner.model, tokens, geometry_from_config(runner.model.config))
    return TaskPrefix(name, kv.float().cpu(), name)


def _check_slot_layout(runner: ModelRunner) -> bool:
    config = runner.model.config
    original = config._attn_implementation
    if original != "sdpa" or not runner.accepts_position_ids:
        logger.warning(
            "%s: attention %r / positions %s: using the padded layout (left-padded rows, prefill apart)",
            config.model_type, original, "accepted" if runner.accepts_position_ids else "not accepted",
        )
        return False
    geometry = geometry_from_config(config)
    vocab = int(getattr(config.get_text_config(decoder=True), "vocab_size", 64) or 64)
    # Prefixes of a realistic scale: the model's own K/V for a few tokens (random unit-scale K/V can push a model
    # into a regime where half precision alone changes the logits wholesale, which would say nothing here).
    prefixes = [_own_kv_prefix(runner, [(11 * v + 3 * j) % vocab for j in range(v)], f"check-{v}") for v in (3, 5)]
    prompts = [[(7 * i + j) % vocab for j in range(n)] for i, n in enumerate((4, 2, 6))]
    requests = [
        GenerationRequest(p, prefixes[i % 2] if i != 2 else None, SamplingParams(max_new_tokens=3))
        for i, p in enumerate(prompts)
    ]
    try:
        padded = DecodeBatch.prefill(runner, requests)
        reference = [padded.last_logits]
        padded.step()
        reference.append(padded.last_logits)

        config._attn_implementation = register_slot_attention()
        limits = SlotLimits(num_slots=4, max_kv_tokens=1 << 16, step_token_budget=64)
        batch = SlotBatch(runner, limits.num_slots)
        rows = [batch.add(r) for r in requests]
        observed = []
        for _ in range(2):
            batch.execute(schedule_step(batch.rows, limits))
            observed.append(batch.last_logits)
        calls_ok = batch.last_plan is not None and batch.last_plan.calls == geometry.num_layers
        # Two attention implementations round differently; half precision far more so. A path that is wrong
        # (prefix ignored, positions shifted, another row's KV) is off by the logits' own scale.
        tolerance = max(1e-3, 8 * torch.finfo(runner.dtype).eps)
        same = all(
            torch.allclose(a.float(), b.float(), rtol=tolerance, atol=tolerance * float(a.float().abs().max()))
            for a, b in zip(reference, observed)
        )
        del rows
    except Exception:  # any failure means this path cannot serve the model: keep the proven one
        logger.exception("%s: slot attention failed its start-up check", config.model_type)
        calls_ok = same = False
    if calls_ok and same:
        logger.info("%s: slot layout (in-place KV, a row reads its own slot, fused prefill)", config.model_type)
        return True
    config._attn_implementation = original
    logger.warning(
        "%s: slot attention %s; using the padded layout (left-padded rows, prefill apart)",
        config.model_type, "was bypassed by the model" if not calls_ok else "gave different logits",
    )
    return False
