"""What a training step computes, per kind of model, behind one interface the training loop drives.

- `CausalObjective`: decoder-only models; prompt + completion in one sequence, PEFT's prefix as the KV cache.
- `Seq2SeqObjective`: encoder-decoder models; the prompt through the encoder (with the full prefix's encoder half,
  when one is trained, through `service.seq2seq`'s attention plan), the completion teacher-forced through the
  decoder with PEFT's prefix (see `service.training.seq2seq_prefix`).

Each objective also builds the `TaskPrefix` the registry would build from what `save_adapter` writes, so held-out
exact match measures the prefix exactly as it will be served.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from peft import PeftModel

from service.model_loader import LoadedModel
from service.prefix import TaskPrefix, encoder_prompt_embeddings_to_kv
from service.runner import ModelRunner
from service.seq2seq_attention import EncoderPrefix, Seq2SeqPlan, active_plan
from service.training.encoding import EncodedExample, collate
from service.training.evaluate import prefix_from_embeddings
from service.training.seq2seq_prefix import TrainableEncoderPrefix, collate_seq2seq


class TrainingObjective(Protocol):
    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters (the base model is frozen)."""
        ...

    def loss(self, items: Sequence[EncodedExample]) -> tuple[torch.Tensor, int]:
        """Mean per-token loss of one batch on its targets, and the number of target tokens."""
        ...

    def serving_prefix(self, task_id: str) -> TaskPrefix:
        """The current prefix as the registry would serve it from the saved adapter."""
        ...

    def train(self) -> None: ...

    def eval(self) -> None: ...


def peft_prompt_embeddings(peft_model: PeftModel) -> torch.Tensor:
    """What PEFT's `save_pretrained` writes: (V, L*2*token_dim), the MLP already applied, float32."""
    with torch.no_grad():
        return peft_model.get_prompt_embedding_to_save("default").float()


class CausalObjective:
    """Decoder-only models: PEFT's forward over prompt + completion (right-padded), loss on the completion."""

    def __init__(self, peft_model: PeftModel, loaded: LoadedModel, pad_id: int) -> None:
        self.peft_model = peft_model
        self.loaded = loaded
        self.pad_id = pad_id

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.peft_model.prompt_encoder.parameters() if p.requires_grad]

    def loss(self, items: Sequence[EncodedExample]) -> tuple[torch.Tensor, int]:
        batch = collate(items, self.pad_id).to(self.loaded.device)
        output = self.peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
        return output.loss, batch.target_tokens

    def serving_prefix(self, task_id: str) -> TaskPrefix:
        return prefix_from_embeddings(task_id, peft_prompt_embeddings(self.peft_model), self.loaded)

    def train(self) -> None:
        self.peft_model.prompt_encoder.train()

    def eval(self) -> None:
        self.peft_model.prompt_encoder.eval()


class Seq2SeqObjective:
    """Encoder-decoder models: PEFT's decoder prefix, plus the encoder prefix when `encoder_prefix` is given (the
    full prefix), applied by the same attention function that serves it."""

    def __init__(
        self,
        peft_model: PeftModel,
        loaded: LoadedModel,
        runner: ModelRunner,
        encoder_prefix: TrainableEncoderPrefix | None = None,
    ) -> None:
        if not runner.is_encoder_decoder:
            raise ValueError(f"{loaded.name} is not an encoder-decoder model")
        self.peft_model = peft_model
        self.loaded = loaded
        self.runner = runner  # its construction installed service.seq2seq's attention on the model
        self.encoder_prefix = encoder_prefix

    def parameters(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.peft_model.prompt_encoder.parameters() if p.requires_grad]
        if self.encoder_prefix is not None:
            params += [p for p in self.encoder_prefix.parameters() if p.requires_grad]
        return params

    def loss(self, items: Sequence[EncodedExample]) -> tuple[torch.Tensor, int]:
        runner = self.runner
        batch = collate_seq2seq(items, runner.pad_token_id, runner.decoder_start_token_id).to(self.loaded.device)
        plan = Seq2SeqPlan(encoder_prefix=self._plan_prefix(len(items)))
        with active_plan(plan):
            output = self.peft_model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                decoder_input_ids=batch.decoder_input_ids,
                labels=batch.labels,
            )
        return output.loss, batch.target_tokens

    def _plan_prefix(self, batch_size: int) -> EncoderPrefix | None:
        """Built afresh for every batch: it carries the graph back to the encoder prefix's parameters."""
        if self.encoder_prefix is None:
            return None
        return self.encoder_prefix.plan_prefix(batch_size, dtype=self.loaded.dtype, device=self.loaded.device)

    def serving_prefix(self, task_id: str) -> TaskPrefix:
        decoder = prefix_from_embeddings(task_id, peft_prompt_embeddings(self.peft_model), self.loaded)
        if self.encoder_prefix is None:
            return decoder
        loaded = self.loaded
        encoder_kv = encoder_prompt_embeddings_to_kv(
            self.encoder_prefix.prompt_embeddings(), loaded.geometry, dtype=loaded.dtype, device=loaded.device
        )
        return TaskPrefix(task_id=task_id, kv=decoder.kv, sha256="", encoder_kv=encoder_kv)

    def train(self) -> None:
        self.peft_model.prompt_encoder.train()
        if self.encoder_prefix is not None:
            self.encoder_prefix.train()

    def eval(self) -> None:
        self.peft_model.prompt_encoder.eval()
        if self.encoder_prefix is not None:
            self.encoder_prefix.eval()


@torch.no_grad()
def mean_target_loss(objective: TrainingObjective, items: Sequence[EncodedExample], batch_size: int) -> float:
    """Mean per-token loss on the targets (teacher forcing), weighted by target tokens across batches."""
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(items), batch_size):
        loss, tokens = objective.loss(items[start : start + batch_size])
        total_loss += float(loss) * tokens
        total_tokens += tokens
    return total_loss / max(total_tokens, 1)
