"""The slot layout's own forward for llama-family decoders: transformers' weights and modules, fewer GEMMs and calls.

transformers' `LlamaForCausalLM` runs seven projections a layer, each its own GEMM, behind several layers of module
calls. A decode step of a small model at 32 rows spends a third of its time in Python between kernels, and one GEMM
for q|k|v plus one for gate|up instead of five saves ~7% of the step on its own
(`experiments/fused_projections.py`). This forward is gpt-fast's generate loop over the same model: the norms,
rotary embedding, activation, o/down projections and LM head are the model's own modules and functions; q/k/v and
gate/up are one `F.linear` each over weights concatenated once, which the original `nn.Linear` modules then view
(no second copy of the weights; any other forward of the model still runs transformers' code on the same values).
Attention is the slot layout's (`service.attention.slot_attention`, under the step's plan).

It serves a model only when its modules are exactly llama's (checked by class, not by config name), and the slot
layout's start-up check (`service.slots._check_slot_layout`) compares its logits with transformers' padded layout
before the engine uses either.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    apply_rotary_pos_emb,
)

from service.attention import SlotCache, slot_attention

logger = logging.getLogger(__name__)


class _FusedLinear:
    """Several `nn.Linear` of one input as one GEMM: their weights (and biases) concatenated once; the modules' own
    parameters become views of the concatenation, so the model holds its weights once."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.sizes = [linear.out_features for linear in linears]
        with torch.no_grad():
            self.weight = torch.cat([linear.weight for linear in linears]).contiguous()
            biases = [linear.bias for linear in linears]
            self.bias = torch.cat(biases).contiguous() if all(b is not None for b in biases) else None
            if self.bias is None and any(b is not None for b in biases):
                raise ValueError("some of the fused projections have a bias and some do not")
            start = 0
            for linear, size in zip(linears, self.sizes):
                linear.weight = nn.Parameter(self.weight[start : start + size], requires_grad=False)
                if self.bias is not None:
                    linear.bias = nn.Parameter(self.bias[start : start + size], requires_grad=False)
                start += size

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


class _Layer:
    def __init__(self, layer: LlamaDecoderLayer) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.attention, self.mlp = attention, mlp
        self.input_norm, self.post_attention_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = _FusedLinear([attention.q_proj, attention.k_proj, attention.v_proj])
        self.gate_up = _FusedLinear([mlp.gate_proj, mlp.up_proj])
        self.head_dim = attention.head_dim

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        tokens = hidden.shape[1]
        heads = (1, tokens, -1, self.head_dim)
        query, key, value = self.qkv(self.input_norm(hidden))
        query, key = apply_rotary_pos_emb(query.view(heads).transpose(1, 2), key.view(heads).transpose(1, 2), cos, sin)
        keys, values = cache.update(key, value.view(heads).transpose(1, 2), self.attention.layer_idx)
        attended, _ = slot_attention(self.attention, query, keys, values, None, scaling=self.attention.scaling)
        hidden = hidden + self.attention.o_proj(attended.reshape(1, tokens, -1))
        gate, up = self.gate_up(self.post_attention_norm(hidden))
        return hidden + self.mlp.down_proj(self.mlp.act_fn(gate) * up)


class LlamaSlotForward:
    """One slot-layout step through a llama model: token ids and positions of the flat sequence in, the logits of
    `logit_index`'s tokens out, K/V written through `cache` (the step's `SlotCache`)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model
        self.layers = [_Layer(layer) for layer in model.model.layers[: model.config.num_hidden_layers]]

    @torch.inference_mode()
    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, logit_index: torch.Tensor, cache: SlotCache
    ) -> torch.Tensor:
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, cache)
        # Norm and head only for the tokens whose logits are used (both act per token: the same values).
        return self.model.lm_head(inner.norm(hidden[:, logit_index]))[0]


def llama_slot_forward(model: nn.Module) -> LlamaSlotForward | None:
    """The model's `LlamaSlotForward` (built once per model: it re-points the projections' weights), or None when its
    modules are not exactly transformers' llama ones."""
    cached = getattr(model, "_prefix_serve_llama_forward", None)
    if cached is not None:
        return cached
    inner = getattr(model, "model", None)
    layers = list(getattr(inner, "layers", []))
    exact = (
        type(model) is LlamaForCausalLM
        and type(inner) is LlamaModel
        and all(
            type(layer) is LlamaDecoderLayer
            and type(layer.self_attn) is LlamaAttention
            and type(layer.mlp) is LlamaMLP
            for layer in layers
        )
    )
    if not exact:
        return None
    forward = LlamaSlotForward(model)
    model._prefix_serve_llama_forward = forward
    logger.info("llama: the slot layout's own forward (fused q|k|v and gate|up projections)")
    return forward
