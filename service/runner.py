"""The frozen model plus what every forward needs to call it the same way: one `ModelRunner` per served model.

Shared by both batch layouts (`service.slots`, the padded `service.batch` and `service.seq2seq`), training and the
bench. Holds no batch state."""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from service.errors import UnsupportedModelError
from service.geometry import geometry_from_config
from service.seq2seq_attention import install as install_seq2seq_attention


class ModelRunner:
    """The frozen model plus what is needed to call its forward the same way for every batch."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.device
        self.dtype = model.dtype
        forward_params = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed `past_key_values` to `cache`; support both spellings.
        self.cache_arg = "cache" if "cache" in forward_params else "past_key_values"
        self.accepts_position_ids = "position_ids" in forward_params
        self.accepts_logits_to_keep = "logits_to_keep" in forward_params
        self.pad_token_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        )
        self.eos_token_ids = self._eos_token_ids(model, tokenizer)
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        if self.is_encoder_decoder:
            self._init_encoder_decoder(model)

    def _init_encoder_decoder(self, model: PreTrainedModel) -> None:
        """What `service.seq2seq` needs: the decoder start token and the decoder's KV shape (mT5 and BART set the
        start token in their configs; a T5 config only in its generation config)."""
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
        if start is None:
            start = getattr(model.config, "decoder_start_token_id", None)
        if not isinstance(start, int):
            raise UnsupportedModelError(
                f"{model.config.model_type}: neither the generation config nor the config sets decoder_start_token_id"
            )
        self.decoder_start_token_id = start
        geometry = geometry_from_config(model.config)
        self.decoder_layers = geometry.num_layers
        self.decoder_kv_shape = (geometry.num_kv_heads, geometry.head_dim)
        install_seq2seq_attention(model)

    @staticmethod
    def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
        ids: set[int] = set()
        config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for value in (config_eos, tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """One forward pass that appends to `cache` in place; returns float32 logits of the last position."""
        kwargs: dict[str, object] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            self.cache_arg: cache,
            "use_cache": True,
        }
        if self.accepts_position_ids:
            kwargs["position_ids"] = position_ids
        if self.accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        output = self.model(**kwargs)
        return output.logits[:, -1, :].float()

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
