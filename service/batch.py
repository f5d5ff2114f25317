"""A batch of rows decoding together, as a value: build (prefill), step, filter, concatenate.

Layout of every row's KV sequence (and of the 2-D attention mask over it):

    [ masked pad | task prefix (V_i) | masked pad | prompt | generated ... ]

Prefixes of different lengths are left-padded to the longest with masked slots; prompts are left-padded likewise.
Each row's positions are `cumsum(mask) - 1`, so the real tokens of row i sit at positions V_i, V_i+1, ... exactly
as PEFT trains and generates them, whatever the padding. Masked slots are ignored by attention (and by ALiBi,
which bloom computes from the same mask), so rows of different tasks can share a forward pass.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache

from service import seq2seq
from service.errors import InvalidPrefixError, UnsupportedModelError
from service.geometry import PrefixGeometry
from service.prefix import TaskPrefix, left_padded_kv
from service.requests import GenerationRequest, GenerationResult, SamplingParams
from service.rows import PaddedRows, Row, padded_to, select_tokens
from service.runner import ModelRunner
from service.sampler import RowSampler

logger = logging.getLogger(__name__)


class DecodeBatch(PaddedRows):
    """Rows with their KV cache, attention mask and next positions. Every row always has one pending token."""

    def __init__(
        self,
        runner: ModelRunner,
        rows: list[Row],
        cache: DynamicCache,
        attention_mask: torch.Tensor,
        next_positions: torch.Tensor,
        next_tokens: torch.Tensor,
    ) -> None:
        self.runner = runner
        self.rows = rows
        self.cache = cache
        self.attention_mask = attention_mask  # (B, T) over everything in the cache
        self.next_positions = next_positions  # (B,) position of the token to feed next
        self.next_tokens = next_tokens  # (B,) token to feed next (the last one sampled)
        self.last_logits: torch.Tensor | None = None  # of the latest forward (the slot layout's start-up check)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def kv_tokens(self) -> int:
        """KV slots held, padding included: the batch's memory footprint in tokens."""
        return int(self.attention_mask.numel())

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))

    # -- building -------------------------------------------------------------------------------------------------

    @classmethod
    def prefill(cls, runner: ModelRunner, requests: Sequence[GenerationRequest]) -> DecodeBatch:
        """Build a fresh cache from the rows' prefixes, run the prompts through the model and pick each row's first
        token. A fresh cache every time: the model mutates it, so one must never be shared between batches."""
        if not requests:
            raise ValueError("prefill needs at least one request")
        device = runner.device
        batch_size = len(requests)
        prefix_lengths = [r.num_virtual_tokens for r in requests]
        prompt_lengths = [len(r.prompt_ids) for r in requests]
        max_prefix, max_prompt = max(prefix_lengths), max(prompt_lengths)

        input_ids = torch.full((batch_size, max_prompt), runner.pad_token_id, dtype=torch.long)
        mask = torch.zeros((batch_size, max_prefix + max_prompt), dtype=torch.long)
        for i, request in enumerate(requests):
            input_ids[i, max_prompt - prompt_lengths[i] :] = torch.tensor(request.prompt_ids, dtype=torch.long)
            mask[i, max_prefix - prefix_lengths[i] : max_prefix] = 1
            mask[i, max_prefix + max_prompt - prompt_lengths[i] :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)

        cache = cls._prefix_cache(runner, requests, max_prefix)
        logits = runner.forward(input_ids, mask, positions[:, max_prefix:], cache)
        rows = [Row(request=r, sampler=RowSampler(r.params, device)) for r in requests]
        batch = cls(runner, rows, cache, mask, positions[:, -1] + 1, torch.zeros(batch_size, dtype=torch.long))
        batch._accept(logits)
        return batch

    @staticmethod
    def _prefix_cache(runner: ModelRunner, requests: Sequence[GenerationRequest], max_prefix: int) -> DynamicCache:
        if max_prefix == 0:
            return DynamicCache()
        kvs = [r.prefix.kv if r.prefix is not None else None for r in requests]  # (L, 2, H, V, D) each
        layers, _, heads, _, head_dim = next(kv for kv in kvs if kv is not None).shape
        keys, values, _ = left_padded_kv(kvs, (layers, heads, head_dim), device=runner.device, dtype=runner.dtype)
        return DynamicCache(list(zip(keys, values)))

    # -- decoding -------------------------------------------------------------------------------------------------

    def step(self) -> None:
        """Feed every unfinished row its pending token and pick the next one."""
        ones = torch.ones((len(self.rows), 1), dtype=self.attention_mask.dtype, device=self.attention_mask.device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        logits = self.runner.forward(
            self.next_tokens.unsqueeze(1), self.attention_mask, self.next_positions.unsqueeze(1), self.cache
        )
        self.next_positions = self.next_positions + 1
        self._accept(logits)

    def _accept(self, logits: torch.Tensor) -> None:
        """Choose a token for each row from its logits, record it, and mark rows that are now finished."""
        self.last_logits = logits
        chosen = select_tokens(self.rows, logits, self.runner.device)
        for row, token in zip(self.rows, chosen):
            if not row.finished:
                row.accept(token, self.runner.eos_token_ids)
        self.next_tokens = torch.tensor(chosen, dtype=torch.long, device=self.runner.device)

    # -- batch algebra --------------------------------------------------------------------------------------------

    def filter(self, keep: list[int]) -> None:
        """Keep only rows `keep`, and drop leading KV columns no remaining row attends to."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = DynamicCache()
            self.attention_mask = self.attention_mask[:0]
            self.next_positions = self.next_positions[:0]
            self.next_tokens = self.next_tokens[:0]
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.attention_mask.device)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.next_positions = self.next_positions.index_select(0, index)
        self.next_tokens = self.next_tokens.index_select(0, index)
        first_used = int(self.attention_mask.any(dim=0).long().argmax())
        self.attention_mask = self.attention_mask[:, first_used:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first_used:]
            layer.values = layer.values.index_select(0, index)[:, :, first_used:]

    @classmethod
    def concatenate(cls, batches: Sequence[DecodeBatch]) -> DecodeBatch:
        """Merge batches into one, left-padding shorter KV sequences with masked slots."""
        batches = [b for b in batches if len(b)]
        if not batches:
            raise ValueError("nothing to concatenate")
        if len(batches) == 1:
            return batches[0]
        runner = batches[0].runner
        width = max(b.attention_mask.shape[1] for b in batches)

        def pad_left(t: torch.Tensor, seq_dim_from_end: int) -> torch.Tensor:
            return padded_to(t, width, seq_dim_from_end, left=True)

        mask = torch.cat([pad_left(b.attention_mask, 1) for b in batches])
        cache = DynamicCache(
            [
                (
                    torch.cat([pad_left(b.cache.layers[i].keys, 2) for b in batches]),
                    torch.cat([pad_left(b.cache.layers[i].values, 2) for b in batches]),
                )
                for i in range(len(batches[0].cache.layers))
            ]
        )
        return cls(
            runner,
            [row for b in batches for row in b.rows],
            cache,
            mask,
            torch.cat([b.next_positions for b in batches]),
            torch.cat([b.next_tokens for b in batches]),
        )


def generate(runner: ModelRunner, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    """Run requests as one static batch to completion (rows leave the batch as they finish)."""
    batch_type = seq2seq.Seq2SeqBatch if runner.is_encoder_decoder else DecodeBatch
    batch: DecodeBatch | seq2seq.Seq2SeqBatch = batch_type.prefill(runner, requests)
    results: dict[int, GenerationResult] = {}
    order = {id(r): i for i, r in enumerate(requests)}
    while True:
        for row in batch.pop_finished():
            results[order[id(row.request)]] = row.result(runner.decode(row.generated))
        if not len(batch):
            break
        batch.step()
    return [results[i] for i in range(len(requests))]


_PROBE_LOCK = threading.Lock()  # probes run beside the engine's thread: one at a time, like text tasks


def probe_prefix(runner: ModelRunner, prefix: TaskPrefix) -> None:
    """Refuse (422) a prefix the model cannot compute with: one forward with it and a one-token prompt, as the
    engine would run it, must give usable logits (finite and not all equal, `service.rows.select_tokens`). Finite
    values can still overflow inside the forward in the serving dtype (1e30 in float32: an RMSNorm's variance
    becomes inf and zeroes the state; every request would answer token 0), and no bound derived from the dtype
    alone covers every architecture's attention and norms, so the upload runs the computation itself."""
    with _PROBE_LOCK:
        unusable = _unusable_rows(runner, [prefix])[0]
    if unusable:
        raise _probe_refusal(runner, prefix)


def _unusable_rows(runner: ModelRunner, prefixes: Sequence[TaskPrefix]) -> list[bool]:
    """One forward of a one-token prompt per prefix (a row each, in one batch); True where a row's logits are
    unusable. The caller holds _PROBE_LOCK."""
    batch_type = seq2seq.Seq2SeqBatch if runner.is_encoder_decoder else DecodeBatch
    requests = [GenerationRequest([runner.pad_token_id], p, SamplingParams(max_new_tokens=1)) for p in prefixes]
    return [row.error is not None for row in batch_type.prefill(runner, requests).rows]


def _probe_refusal(runner: ModelRunner, prefix: TaskPrefix) -> InvalidPrefixError:
    dtype = str(runner.dtype).removeprefix("torch.")
    largest = float(prefix.kv.abs().max())
    return InvalidPrefixError(
        "prompt_embeddings", f"values the served model computes usable logits with ({dtype})",
        f"values up to {largest:.3g}, with which a probe forward gave NaN/inf or all-equal logits",
        message=(
            f"prompt_embeddings: a probe forward with this prefix gave NaN/inf or all-equal logits: values up to "
            f"{largest:.3g} overflow the served model's {dtype} computation (attention or norms), so every "
            "request of the task would answer garbage; scale the prefix's values down"
        ),
    )  # fmt: skip


@dataclass
class _PendingProbe:
    prefix: TaskPrefix
    unusable: bool | None = None  # None until probed
    failure: BaseException | None = None  # the batch's forward raised


class PrefixProber:
    """`probe_prefix` for uploads that arrive together (a bulk import stores tasks from several threads): probes
    waiting while another runs are taken together, up to `max_rows` rows in one forward, whose cost on a small batch
    is mostly reading the weights once. A row is independent of the others (its own prefix, mask and positions);
    a prefix refused in a batch is probed again alone, so a refusal is exactly the one a single upload gets.

    One waiting caller at a time leads: it takes the queue, runs the forward with the queue unlocked, and wakes
    everyone when done. A caller whose row was probed returns at once; it never waits for the next forward (a lock
    every caller had to take again after its row was done made each forward a single row: 20 tasks/s)."""

    def __init__(self, runner: ModelRunner, max_rows: int = 64) -> None:
        self.runner = runner
        self.max_rows = max_rows
        self._changed = threading.Condition()
        self._pending: list[_PendingProbe] = []
        self._leading = False  # a caller is running a forward

    def __call__(self, prefix: TaskPrefix) -> None:
        item = _PendingProbe(prefix)
        with self._changed:
            self._pending.append(item)
            while item.unusable is None and item.failure is None:
                if self._leading:
                    self._changed.wait()
                else:
                    self._lead()
        if item.failure is not None:
            raise item.failure
        if item.unusable:
            raise _probe_refusal(self.runner, prefix)

    def _lead(self) -> None:
        """Probe the first `max_rows` waiting prefixes. Called holding `_changed`; releases it for the forward."""
        batch, self._pending = self._pending[: self.max_rows], self._pending[self.max_rows :]
        self._leading = True
        self._changed.release()
        try:
            with _PROBE_LOCK:  # probes run beside the engine's thread, one at a time (probe_prefix, text tasks)
                self._probe(batch)
        finally:
            self._changed.acquire()
            self._leading = False
            self._changed.notify_all()

    def _probe(self, batch: list[_PendingProbe]) -> None:
        try:
            unusable = _unusable_rows(self.runner, [p.prefix for p in batch])
            if len(batch) > 1 and any(unusable):
                unusable = [bad and _unusable_rows(self.runner, [p.prefix])[0] for p, bad in zip(batch, unusable)]
        except BaseException as exc:  # noqa: BLE001 - each waiting upload raises it
            for pending in batch:
                pending.failure = exc
            return
        for pending, bad in zip(batch, unusable):
            pending.unusable = bad


def verify_prefix_support(runner: ModelRunner, geometry: PrefixGeometry) -> None:
    """Start-up check that the model really attends to a prefix of `geometry`'s shape.

    A model whose forward silently ignores the cache it is given (or expects other KV shapes) would serve base-model
    output under every task; refuse to start instead. Encoder-decoder models get their own check
    (`service.seq2seq.verify_seq2seq_support`).
    """
    if runner.is_encoder_decoder:
        seq2seq.verify_seq2seq_support(runner, geometry)
        return
    _check_cache_shape(runner, geometry)
    generator = torch.Generator().manual_seed(0)
    shape = (geometry.num_layers, 2, geometry.num_kv_heads, 2, geometry.head_dim)
    prompt = [1, 2, 3]
    input_ids = torch.tensor([prompt], device=runner.device)
    mask = torch.ones((1, 2 + len(prompt)), dtype=torch.long, device=runner.device)
    positions = torch.arange(2, 2 + len(prompt), device=runner.device).unsqueeze(0)
    outputs = []
    for _ in range(2):
        kv = torch.randn(shape, generator=generator)
        request = GenerationRequest(prompt_ids=prompt, prefix=TaskPrefix("self-check", kv, ""))
        cache = DecodeBatch._prefix_cache(runner, [request], 2)
        try:
            outputs.append(runner.forward(input_ids, mask, positions, cache))
        except Exception as exc:  # shapes the model rejects surface as assorted errors deep in attention code
            raise UnsupportedModelError(
                f"{geometry.model_type}: a forward pass with a prefix of shape {shape} failed: {exc}"
            ) from exc
        if cache.get_seq_length() != mask.shape[1]:
            raise UnsupportedModelError(
                f"{geometry.model_type}: the model kept {cache.get_seq_length()} KV slots, "
                f"not prefix + prompt = {mask.shape[1]}"
            )
    if torch.allclose(outputs[0], outputs[1]):
        raise UnsupportedModelError(f"{geometry.model_type}: the model's output ignores the prefix KV")


def model_cache_shape(runner: ModelRunner) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the KV cache the model itself builds for a short prompt."""
    input_ids = torch.tensor([[1, 2, 3]], device=runner.device)
    with torch.inference_mode():
        output = runner.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True)
    cache = output.get("cache", None)  # transformers >= 5.24; `past_key_values` before
    if cache is None:
        cache = output.get("past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers:
        raise UnsupportedModelError(f"{runner.model.config.model_type}: the model returned no per-layer KV cache")
    shapes = {(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in layers}
    if len(shapes) != 1:
        raise UnsupportedModelError(
            f"{runner.model.config.model_type}: layers cache different KV shapes {sorted(shapes)}; "
            "one PEFT prefix cannot fit every layer"
        )
    heads, head_dim = shapes.pop()
    return len(layers), heads, head_dim


def _check_cache_shape(runner: ModelRunner, geometry: PrefixGeometry) -> None:
    """A PEFT prefix has the shape PEFT derives from the config; the model must cache exactly that shape, or the
    prefix would be reshaped into something PEFT never trained (or fail deep inside attention)."""
    cached = model_cache_shape(runner)
    peft = (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    if cached != peft:
        raise UnsupportedModelError(
            f"{geometry.model_type}: the model caches (layers, kv_heads, head_dim) = {cached} but a PEFT prefix for "
            f"its config has {peft}; PEFT's prefix cannot be applied to this model as trained"
        )
