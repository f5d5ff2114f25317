"""Encoder-decoder models (T5, BART): the padded batch as a value, PEFT's decoder prefix and the paper's encoder prefix.

Each row's encoder runs once, at admission (batched with the rows admitted together); the decoder's cross-attention
K/V of its output are computed on the row's first decoder step and kept for the row's life. The decoder's
self-attention cache starts with the row's prefix, exactly as PEFT's SEQ_2_SEQ_LM prefix tuning hands it to the model
(`service.prefix.prompt_embeddings_to_kv` maps PEFT's rows to decoder layers; the cross-attention part starts empty).

Layout per row, as in `service.batch`:

    decoder self-attention:  [ masked pad | prefix (V_i) | decoder start token | generated ... ]   (right-aligned)
    encoder states / cross:  [ prompt | masked pad ]                                                (left-aligned)

PEFT's decoder tokens sit at positions V_i, V_i+1, ... (the prefix occupies the first V_i). T5's relative position
bias depends only on distances, which right-alignment keeps; BART's learned decoder positions are set per row by a
forward hook on its position embedding while a plan is active. The encoder is right-padded, so BART's encoder
positions start at 0 for every row.

The full prefix (Li & Liang: z = [PREFIX; x; PREFIX'; y]) adds per-layer K/V in front of the encoder's self-attention:
`seq2seq_attention` (registered in transformers' `AttentionInterface`, with sdpa's mask function) prepends the plan's
encoder prefix to every encoder self-attention call and delegates to sdpa. T5's relative bias for the prefix columns
puts the prefix at the positions just before x, like the decoder-side convention; BART's encoder positions of x stay
0.., as in the paper's implementation. With no plan active the function is sdpa itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache, EncoderDecoderCache, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_outputs import BaseModelOutput

from service.errors import UnsupportedModelError
from service.geometry import PrefixGeometry
from service.prefix import TaskPrefix, left_padded_kv
from service.requests import GenerationRequest
from service.rows import PaddedRows, Row, padded_to, select_tokens
from service.sampler import RowSampler

if TYPE_CHECKING:  # service.batch imports this module (the padded layout's batch for encoder-decoder models)
    from service.batch import ModelRunner

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "prefix_serve_seq2seq"


# -- the plan: per-forward state the attention function and the position hook read --------------------------------


@dataclass
class EncoderPrefix:
    """Encoder prefix K/V of a batch: per encoder layer (B, H, Ve_max, D), left-padded; `mask` (B, Ve_max) bool."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    relative_bias: torch.Tensor | None = None  # T5: the prefix columns' bias, computed by the first layer that can

    @classmethod
    def of(cls, prefixes: Sequence[TaskPrefix | None], *, device: torch.device, dtype: torch.dtype) -> EncoderPrefix | None:
        kvs = [p.encoder_kv if p is not None else None for p in prefixes]
        template = next((kv for kv in kvs if kv is not None), None)
        if template is None:
            return None
        layers, _, heads, _, head_dim = template.shape
        return cls(*left_padded_kv(kvs, (layers, heads, head_dim), device=device, dtype=dtype))


@dataclass
class Seq2SeqPlan:
    encoder_prefix: EncoderPrefix | None = None
    decoder_positions: torch.Tensor | None = None  # (B, q): each row's own decoder positions (V_i + t)


_local = threading.local()


@contextmanager
def active_plan(plan: Seq2SeqPlan) -> Iterator[Seq2SeqPlan]:
    """Make `plan` visible to the attention function and position hook of forwards run by this thread."""
    previous = getattr(_local, "plan", None)
    _local.plan = plan
    try:
        yield plan
    finally:
        _local.plan = previous


def _current_plan() -> Seq2SeqPlan | None:
    return getattr(_local, "plan", None)


def seq2seq_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """sdpa, with the active plan's encoder prefix prepended to every encoder self-attention."""
    plan = _current_plan()
    prefix = plan.encoder_prefix if plan is not None else None
    if prefix is None or getattr(module, "is_decoder", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # type: ignore[arg-type]
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    batch, _, q_len, _ = query.shape
    key = torch.cat([prefix.keys[layer].to(key.dtype), key], dim=2)
    value = torch.cat([prefix.values[layer].to(value.dtype), value], dim=2)
    own = attention_mask if attention_mask is not None else torch.ones(
        (batch, 1, q_len, key.shape[2] - prefix.mask.shape[1]), dtype=torch.bool, device=query.device
    )
    if own.dtype != torch.bool:  # an additive float mask (eager-style): 0 where attended
        own = own == 0
    prefix_mask = prefix.mask[:, None, None, :].expand(batch, 1, q_len, prefix.mask.shape[1])
    attention_mask = torch.cat([prefix_mask, own.expand(batch, 1, q_len, own.shape[-1])], dim=-1)
    position_bias = kwargs.get("position_bias")
    if isinstance(position_bias, torch.Tensor):
        kwargs["position_bias"] = torch.cat([_prefix_bias(module, prefix, q_len, position_bias), position_bias], dim=-1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # type: ignore[arg-type]


def _prefix_bias(module: torch.nn.Module, prefix: EncoderPrefix, q_len: int, own_bias: torch.Tensor) -> torch.Tensor:
    """T5's relative bias from x's queries to the prefix columns, the prefix sitting just before x: with the
    prefix left-padded to Ve_max, column j of every row is at distance j - Ve_max - i from query i."""
    longest = prefix.mask.shape[1]
    if getattr(module, "has_relative_attention_bias", False):
        full = module.compute_bias(q_len, longest + q_len, device=own_bias.device, past_seen_tokens=longest)  # type: ignore[operator]
        prefix.relative_bias = full[..., :longest]
    if prefix.relative_bias is None:  # a model whose first layer has no bias of its own: no positions at all
        prefix.relative_bias = torch.zeros((1, own_bias.shape[1], q_len, longest), dtype=own_bias.dtype, device=own_bias.device)
    return prefix.relative_bias.to(own_bias.dtype).expand(own_bias.shape[0], -1, -1, -1)


def _decoder_position_hook(module: torch.nn.Module, args: tuple[object, ...], output: torch.Tensor) -> torch.Tensor:
    """BART's learned decoder positions, per row, while a plan says where each row's tokens are."""
    plan = _current_plan()
    if plan is None or plan.decoder_positions is None:
        return output
    offset = int(getattr(module, "offset", 0))
    return F.embedding(plan.decoder_positions + offset, module.weight)  # type: ignore[arg-type]


def install(model: PreTrainedModel) -> None:
    """Route the model's attention through `seq2seq_attention` and hook its learned decoder positions. Idempotent;
    without an active plan the model computes exactly what sdpa computes."""
    if getattr(model, "_prefix_serve_seq2seq", False):
        return
    AttentionInterface.register(ATTN_IMPLEMENTATION, seq2seq_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    positions = getattr(model.get_decoder(), "embed_positions", None)
    if positions is not None:
        if not hasattr(positions, "weight") or not hasattr(positions, "offset"):
            raise UnsupportedModelError(f"{model.config.model_type}: decoder positions of an unknown kind")
        positions.register_forward_hook(_decoder_position_hook)
    model._prefix_serve_seq2seq = True


# -- the batch ----------------------------------------------------------------------------------------------------


@dataclass
class _State:
    """Tensors of a batch, one row per row."""

    self_keys: list[torch.Tensor]  # per decoder layer (B, H, W, D)
    self_values: list[torch.Tensor]
    cross_keys: list[torch.Tensor]  # per decoder layer (B, H, S, D)
    cross_values: list[torch.Tensor]
    self_mask: torch.Tensor  # (B, W) long
    encoder_states: torch.Tensor  # (B, S, d_model)
    encoder_mask: torch.Tensor  # (B, S) long
    next_positions: torch.Tensor  # (B,) decoder position of the token fed next
    next_tokens: torch.Tensor  # (B,)


@dataclass
class Seq2SeqBatch(PaddedRows):
    """Rows of an encoder-decoder model decoding together: prefill, step, filter, concatenate (as `DecodeBatch`)."""

    runner: ModelRunner
    rows: list[Row]
    state: _State
    last_logits: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def kv_tokens(self) -> int:
        return int(self.state.self_mask.numel() + self.state.encoder_mask.numel())

    @property
    def kv_bytes(self) -> int:
        s = self.state
        tensors = [*s.self_keys, *s.self_values, *s.cross_keys, *s.cross_values, s.encoder_states]
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- building -------------------------------------------------------------------------------------------------

    @classmethod
    def prefill(cls, runner: ModelRunner, requests: Sequence[GenerationRequest]) -> Seq2SeqBatch:
        """Encode the prompts (with any encoder prefixes), then run every row's decoder start token over its prefix."""
        if not requests:
            raise ValueError("prefill needs at least one request")
        model: PreTrainedModel = runner.model
        device, dtype = runner.device, runner.dtype
        prefixes = [r.prefix for r in requests]
        encoder_states, encoder_mask = _encode(model, [r.prompt_ids for r in requests], prefixes, runner)

        start = runner.decoder_start_token_id
        shape = (runner.decoder_layers, *runner.decoder_kv_shape)
        keys, values, prefix_mask = left_padded_kv(
            [p.kv if p is not None else None for p in prefixes], shape, device=device, dtype=dtype
        )
        start_column = torch.ones((len(requests), 1), dtype=torch.long, device=device)  # the decoder start token
        state = _State(
            self_keys=keys,
            self_values=values,
            cross_keys=[],
            cross_values=[],
            self_mask=torch.cat([prefix_mask.long(), start_column], dim=1),
            encoder_states=encoder_states,
            encoder_mask=encoder_mask,
            next_positions=prefix_mask.sum(dim=1),  # PEFT: a row's first decoder token sits at position V_i
            next_tokens=torch.full((len(requests),), start, dtype=torch.long, device=device),
        )
        rows = [Row(request=r, sampler=RowSampler(r.params, device), decoder_start_token_id=start) for r in requests]
        batch = cls(runner, rows, state)
        batch._forward()
        return batch

    # -- decoding -------------------------------------------------------------------------------------------------

    def step(self) -> None:
        """Feed every row its pending token and pick the next one."""
        s = self.state
        s.self_mask = torch.cat([s.self_mask, torch.ones_like(s.self_mask[:, :1])], dim=1)
        self._forward()

    def _forward(self) -> None:
        """One decoder step over the pending tokens (the self mask already covers them); appends their K/V."""
        s = self.state
        model: PreTrainedModel = self.runner.model
        cross = DynamicCache([(k, v) for k, v in zip(s.cross_keys, s.cross_values)]) if s.cross_keys else DynamicCache()
        cache = EncoderDecoderCache(DynamicCache(list(zip(s.self_keys, s.self_values))), cross)
        plan = Seq2SeqPlan(decoder_positions=s.next_positions.unsqueeze(1))
        with torch.inference_mode(), active_plan(plan):
            output = model(
                encoder_outputs=BaseModelOutput(last_hidden_state=s.encoder_states),
                attention_mask=s.encoder_mask,
                decoder_input_ids=s.next_tokens.unsqueeze(1),
                decoder_attention_mask=s.self_mask,
                cache=cache,
                use_cache=True,
            )
        layers = cache.self_attention_cache.layers
        s.self_keys = [layer.keys for layer in layers]
        s.self_values = [layer.values for layer in layers]
        if not s.cross_keys:
            s.cross_keys = [layer.keys for layer in cache.cross_attention_cache.layers]
            s.cross_values = [layer.values for layer in cache.cross_attention_cache.layers]
        s.next_positions = s.next_positions + 1
        self._accept(output.logits[:, -1, :])

    def _accept(self, logits: torch.Tensor) -> None:
        self.last_logits = logits
        device = self.runner.device
        chosen = select_tokens(self.rows, logits, device)
        for row, token in zip(self.rows, chosen):
            if not row.finished:
                row.accept(token, self.runner.eos_token_ids)
        self.state.next_tokens = torch.tensor(chosen, dtype=torch.long, device=device)

    # -- batch algebra --------------------------------------------------------------------------------------------

    def filter(self, keep: list[int]) -> None:
        """Keep rows `keep`; drop leading self-attention and trailing encoder columns no remaining row uses."""
        self.rows = [self.rows[i] for i in keep]
        s = self.state
        index = torch.tensor(keep, dtype=torch.long, device=s.self_mask.device)
        self_mask = s.self_mask.index_select(0, index)
        encoder_mask = s.encoder_mask.index_select(0, index)
        first = int(self_mask.any(dim=0).long().argmax()) if keep else 0
        last = int(encoder_mask.any(dim=0).nonzero().max()) + 1 if keep else 0

        def rows_of(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index)

        self.state = _State(
            self_keys=[rows_of(t)[:, :, first:] for t in s.self_keys],
            self_values=[rows_of(t)[:, :, first:] for t in s.self_values],
            cross_keys=[rows_of(t)[:, :, :last] for t in s.cross_keys],
            cross_values=[rows_of(t)[:, :, :last] for t in s.cross_values],
            self_mask=self_mask[:, first:],
            encoder_states=rows_of(s.encoder_states)[:, :last],
            encoder_mask=encoder_mask[:, :last],
            next_positions=rows_of(s.next_positions),
            next_tokens=rows_of(s.next_tokens),
        )

    @classmethod
    def concatenate(cls, batches: Sequence[Seq2SeqBatch]) -> Seq2SeqBatch:
        """Merge batches: self-attention columns left-padded, encoder columns right-padded, both masked."""
        batches = [b for b in batches if len(b)]
        if not batches:
            raise ValueError("nothing to concatenate")
        if len(batches) == 1:
            return batches[0]
        states = [b.state for b in batches]
        width = max(s.self_mask.shape[1] for s in states)
        source = max(s.encoder_mask.shape[1] for s in states)

        def left(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            return padded_to(t, width, dim_from_end, left=True)

        def right(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            return padded_to(t, source, dim_from_end, left=False)

        layers = range(len(states[0].self_keys))
        state = _State(
            self_keys=[torch.cat([left(s.self_keys[i], 2) for s in states]) for i in layers],
            self_values=[torch.cat([left(s.self_values[i], 2) for s in states]) for i in layers],
            cross_keys=[torch.cat([right(s.cross_keys[i], 2) for s in states]) for i in layers],
            cross_values=[torch.cat([right(s.cross_values[i], 2) for s in states]) for i in layers],
            self_mask=torch.cat([left(s.self_mask, 1) for s in states]),
            encoder_states=torch.cat([right(s.encoder_states, 2) for s in states]),
            encoder_mask=torch.cat([right(s.encoder_mask, 1) for s in states]),
            next_positions=torch.cat([s.next_positions for s in states]),
            next_tokens=torch.cat([s.next_tokens for s in states]),
        )
        return cls(batches[0].runner, [row for b in batches for row in b.rows], state)


def _encode(
    model: PreTrainedModel, prompts: Sequence[Sequence[int]], prefixes: Sequence[TaskPrefix | None], runner: ModelRunner
) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's output for right-padded prompts (BART's encoder positions start at 0 for every row)."""
    device, dtype = runner.device, runner.dtype
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), runner.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        mask[i, : len(prompt)] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    plan = Seq2SeqPlan(encoder_prefix=EncoderPrefix.of(prefixes, device=device, dtype=dtype))
    with torch.inference_mode(), active_plan(plan):
        states = model.get_encoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return states, mask


# How far batched may differ from alone, in multiples of the model's own rounding noise (`_rounding_noise`). Measured
# in float32 (issue 18): correct models stay within 0.2-6.2x of it (tiny T5s, gated-gelu T5, BART, a relu T5 whose
# sharp attention amplifies rounding ~10^4-fold); a T5 whose decoder bias counts padded columns is 210-235x over it,
# BART with its per-row positions removed 5e6x.
ROUNDING_NOISE_MARGIN = 32.0


def verify_seq2seq_support(runner: ModelRunner, geometry: PrefixGeometry) -> None:
    """Start-up check: the decoder attends to a prefix, the encoder to an encoder prefix, and two rows with prefixes
    of different lengths (and prompts of different lengths) decode in one batch exactly as each does alone.

    "Exactly" is up to rounding: padding changes the shapes, hence the summation order, of every matmul, and a model
    whose attention is sharp amplifies that rounding far beyond any fixed tolerance (a plain relu T5 differs by 1e-3 of
    its logits' scale in float32, 4e-12 in float64). So each row may differ by what the model's own rounding noise
    explains: `ROUNDING_NOISE_MARGIN` times the change of its logits when every linear layer's output is perturbed by
    about one rounding step. Wrong positions change the logits by orders of magnitude more."""
    generator = torch.Generator().manual_seed(0)

    def kv(layers: int, length: int) -> torch.Tensor:
        shape = (layers, 2, geometry.num_kv_heads, length, geometry.head_dim)
        return torch.randn(shape, generator=generator)

    decoder_kv, encoder_kv = kv(geometry.num_layers, 5), kv(geometry.encoder_num_layers, 3)
    prefixes = [
        TaskPrefix("short", kv(geometry.num_layers, 2), ""),
        TaskPrefix("full", decoder_kv, "", encoder_kv),
        TaskPrefix("decoder-only", decoder_kv, ""),
        TaskPrefix("other", kv(geometry.num_layers, 5), ""),
    ]
    prompts = [[3, 4, 5, 6, 7], [5, 6, 3], [5, 6, 3], [5, 6, 3]]
    requests = [GenerationRequest(prompt_ids=p, prefix=x) for p, x in zip(prompts, prefixes)]
    try:
        together = _second_step_logits(runner, requests)
        alone = [_second_step_logits(runner, [request])[0] for request in requests]
        noise = [_rounding_noise(runner, r, logits, seed=i) for i, (r, logits) in enumerate(zip(requests, alone))]
    except Exception as exc:  # shapes the model rejects surface as assorted errors deep in attention code
        raise UnsupportedModelError(f"{geometry.model_type}: a forward pass with a prefix failed: {exc}") from exc
    # Differences below this share of the logits' scale pass whatever the noise (half precision: as before).
    floor = 1e-5 if runner.dtype == torch.float32 else 5e-2
    for i, logits in enumerate(alone):
        scale = float(logits.abs().max()) or 1.0
        difference = float((together[i] - logits).abs().max())
        allowed = max(floor * scale, ROUNDING_NOISE_MARGIN * noise[i])
        logger.debug(
            "seq2seq start-up check, row %d: batched vs alone %.3g, rounding noise %.3g, allowed %.3g",
            i, difference, noise[i], allowed,
        )
        if difference > allowed:
            raise UnsupportedModelError(
                f"{geometry.model_type}: rows with prefixes of different lengths decode differently batched than "
                f"alone (by {difference:.3g}, {difference / max(noise[i], 1e-30):.3g}x the model's rounding noise); "
                "this model's positions are not handled"
            )
    if torch.allclose(alone[1], alone[2]):
        raise UnsupportedModelError(f"{geometry.model_type}: the model's output ignores the encoder prefix")
    if torch.allclose(alone[2], alone[3]):
        raise UnsupportedModelError(f"{geometry.model_type}: the model's output ignores the decoder prefix")


def _second_step_logits(runner: ModelRunner, requests: Sequence[GenerationRequest]) -> torch.Tensor:
    """Float32 logits of the rows' second decoder step (the first one that reads a generated token)."""
    batch = Seq2SeqBatch.prefill(runner, requests)
    batch.step()
    assert batch.last_logits is not None
    return batch.last_logits.float()


def _rounding_noise(runner: ModelRunner, request: GenerationRequest, logits: torch.Tensor, *, seed: int) -> float:
    """How much the row's logits move when every linear layer's output is perturbed by about one rounding step of the
    serving dtype (relative eps x N(0, 1)): the model's own amplification of rounding, which is what padding changes."""
    eps = torch.finfo(runner.dtype).eps
    generator = torch.Generator().manual_seed(seed)

    def perturb(module: torch.nn.Module, args: tuple[object, ...], output: torch.Tensor) -> torch.Tensor:
        jitter = torch.randn(output.shape, generator=generator).to(device=output.device, dtype=output.dtype)
        return output + output.abs() * eps * jitter

    hooks = [m.register_forward_hook(perturb) for m in runner.model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        perturbed = _second_step_logits(runner, [request])[0]
    finally:
        for hook in hooks:
            hook.remove()
    return float((perturbed - logits).abs().max())
