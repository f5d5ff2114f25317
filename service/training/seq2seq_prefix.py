"""Prefix training on encoder-decoder models (T5, BART): PEFT's decoder prefix, and the paper's encoder prefix.

Li & Liang (2021) prefix an encoder-decoder model on both sides, z = [PREFIX; x; PREFIX'; y]: PREFIX steers how the
encoder reads x, PREFIX' how the decoder writes y. PEFT's SEQ_2_SEQ_LM prefix tuning only implements PREFIX': its
prefix becomes the decoder's self-attention cache (and the cross-attention part is thrown away). The *full* prefix
adds PREFIX, trained here by `TrainableEncoderPrefix` and applied through `service.seq2seq`'s attention plan, exactly
as the server applies it (the same function, the same layout, `encoder_prompt_embeddings_to_kv`).

What is trained is what is served (`service.seq2seq.Seq2SeqBatch`):
- encoder input: the prompt tokenized as `/generate` tokenizes `inputs` (with the tokenizer's special tokens, e.g.
  T5's trailing `</s>`), right-padded;
- decoder input: the served decoder start token, then the target tokens (teacher forcing), built here rather than
  by the model's `labels` shift so that the start token is the one the server reads (generation config first);
- labels: the completion's tokens + eos, the loss on them only. The completion's leading whitespace is dropped: it
  joins a decoder-only model's completion to its prompt, but a decoder's output starts a new text, where a
  SentencePiece-style tokenizer would spell it as a token of its own.

PEFT's prefix config is given `num_layers` = twice the decoder's depth, `token_dim` = heads x head size (PEFT's
default d_model is wrong for a T5 whose heads x d_kv != d_model) and the head count. Why twice: PEFT hands decoder
layer i rows (4i, 4i+1) mod 2L of its 2L rows, so with L = the decoder's (even) depth layers i and i + L/2 share one
prefix and half the rows are never read; with L = 2 x depth every layer reads rows of its own (half the rows are
still unread: PEFT's layout). PEFT's default, the encoder's depth, also breaks when the decoder is deeper. The file
stays a plain PEFT adapter (PEFT loads it and computes the same prefix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from peft import PrefixTuningConfig
from transformers import PreTrainedTokenizerBase

from service.geometry import PrefixGeometry
from service.prefix import encoder_prompt_embeddings_to_kv
from service.seq2seq_attention import EncoderPrefix
from service.training.data import Example
from service.training.encoding import IGNORE_INDEX, EncodedExample, encode_examples


def seq2seq_peft_config(
    geometry: PrefixGeometry, num_virtual_tokens: int, prefix_projection: bool
) -> PrefixTuningConfig:
    """PEFT's SEQ_2_SEQ_LM prefix config for the served model, with the decoder's shape set explicitly."""
    return PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM",
        num_virtual_tokens=num_virtual_tokens,
        num_layers=2 * geometry.num_layers,  # every decoder layer its own rows (module docstring)
        token_dim=geometry.token_dim,
        num_attention_heads=geometry.num_kv_heads,
        prefix_projection=prefix_projection,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Examples and batches


def encode_seq2seq_examples(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, *, max_tokens: int, source: str = "data"
) -> list[EncodedExample]:
    """Encoder input = the prompt as served, target = the completion (leading whitespace dropped) + eos; the same
    checks and DataError messages as the decoder-only encoding (`max_tokens` bounds prompt + target, as the server
    bounds prompt + prefix + new tokens by the model's context)."""
    trimmed = [replace(example, completion=example.completion.lstrip()) for example in examples]
    return encode_examples(trimmed, tokenizer, max_tokens=max_tokens, source=source)


@dataclass(frozen=True)
class EncoderDecoderBatch:
    input_ids: torch.Tensor  # (B, S) prompts, right-padded (as the server pads encoder inputs)
    attention_mask: torch.Tensor  # (B, S), 1 for real prompt tokens
    decoder_input_ids: torch.Tensor  # (B, T) start token + targets[:-1], right-padded
    labels: torch.Tensor  # (B, T) targets, IGNORE_INDEX on padding

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> EncoderDecoderBatch:
        return EncoderDecoderBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.decoder_input_ids.to(device),
            self.labels.to(device),
        )


def collate_seq2seq(
    items: Sequence[EncodedExample], pad_token_id: int, decoder_start_token_id: int
) -> EncoderDecoderBatch:
    """Right-padded encoder inputs and teacher-forced decoder inputs. The decoder's padding sits after every real
    token of its row, so the causal mask keeps it out of their attention and the labels keep it out of the loss: no
    decoder attention mask is needed (PEFT would prepend the prefix's ones to one)."""
    source = max(len(item.prompt_ids) for item in items)
    target = max(len(item.target_ids) for item in items)
    input_ids = torch.full((len(items), source), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), source), dtype=torch.long)
    decoder_input_ids = torch.full((len(items), target), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), target), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, : len(item.prompt_ids)] = torch.tensor(item.prompt_ids, dtype=torch.long)
        attention_mask[row, : len(item.prompt_ids)] = 1
        fed = [decoder_start_token_id, *item.target_ids[:-1]]
        decoder_input_ids[row, : len(fed)] = torch.tensor(fed, dtype=torch.long)
        labels[row, : len(item.target_ids)] = torch.tensor(item.target_ids, dtype=torch.long)
    return EncoderDecoderBatch(input_ids, attention_mask, decoder_input_ids, labels)


# ---------------------------------------------------------------------------------------------------------------------
# The encoder prefix


class TrainableEncoderPrefix(torch.nn.Module):
    """The full prefix's encoder half: Ve virtual tokens of keys and values for every encoder self-attention layer.

    Its output, (Ve, encoder_layers * 2 * token_dim), is what the adapter file stores as `encoder_prompt_embeddings`.
    With `prefix_projection` it is the paper's MLP reparameterisation, shaped like PEFT's PrefixEncoder:
    Embedding(Ve, token_dim) -> Linear(token_dim, hidden) -> Tanh -> Linear(hidden, width), trained for stability
    and only its output kept. Without, the parameters are the K/V themselves (PEFT's N(0, 1) embedding init).
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        geometry: PrefixGeometry,
        *,
        prefix_projection: bool,
        hidden_size: int | None = None,
    ) -> None:
        super().__init__()
        if not geometry.is_encoder_decoder:
            raise ValueError(f"{geometry.model_type} has no encoder to prefix")
        if num_virtual_tokens < 1:
            raise ValueError(f"an encoder prefix needs at least one virtual token, got {num_virtual_tokens}")
        self.geometry = geometry
        width = geometry.encoder_num_layers * 2 * geometry.token_dim
        self.transform: torch.nn.Sequential | None = None
        if prefix_projection:
            hidden = hidden_size or geometry.token_dim
            self.embedding = torch.nn.Embedding(num_virtual_tokens, geometry.token_dim)
            self.transform = torch.nn.Sequential(
                torch.nn.Linear(geometry.token_dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, width)
            )
        else:
            self.embedding = torch.nn.Embedding(num_virtual_tokens, width)

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embedding.num_embeddings)

    def forward(self) -> torch.Tensor:
        """The prefix in the file's layout, (Ve, encoder_layers * 2 * token_dim)."""
        rows = self.embedding.weight
        return self.transform(rows) if self.transform is not None else rows

    def prompt_embeddings(self) -> torch.Tensor:
        """What the adapter file stores: the output, float32 on CPU, detached."""
        with torch.no_grad():
            return self().detach().to("cpu", torch.float32)

    def plan_prefix(self, batch_size: int, *, dtype: torch.dtype, device: torch.device) -> EncoderPrefix:
        """The current prefix (with its autograd graph) for every row of a batch, as `service.seq2seq` takes it."""
        return expand_encoder_prefix(self(), self.geometry, batch_size, dtype=dtype, device=device)


def expand_encoder_prefix(
    encoder_prompt_embeddings: torch.Tensor,
    geometry: PrefixGeometry,
    batch_size: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> EncoderPrefix:
    """One task's encoder prefix for `batch_size` rows, through the server's own layout conversion (differentiable):
    what training attends to is what the registry will build from the saved tensor."""
    kv = encoder_prompt_embeddings_to_kv(encoder_prompt_embeddings, geometry, dtype=dtype, device=device)
    layers = range(geometry.encoder_num_layers)
    keys = [kv[layer, 0].unsqueeze(0).expand(batch_size, -1, -1, -1) for layer in layers]
    values = [kv[layer, 1].unsqueeze(0).expand(batch_size, -1, -1, -1) for layer in layers]
    mask = torch.ones((batch_size, kv.shape[3]), dtype=torch.bool, device=device)
    return EncoderPrefix(keys=keys, values=values, mask=mask)
