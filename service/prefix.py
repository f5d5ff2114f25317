"""A task prefix held in device memory in the per-layer KV layout the model's cache takes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from service.geometry import PrefixGeometry


@dataclass(frozen=True)
class TaskPrefix:
    """One task's prefix, ready to be copied into a fresh cache.

    `kv` has shape (num_layers, 2, kv_heads, V, head_dim): kv[l, 0] are layer l's keys, kv[l, 1] its values (for an
    encoder-decoder model: the decoder's self-attention layers). `encoder_kv`, of the same layout over the encoder's
    layers and its own length, is the encoder half of a full (encoder + decoder) prefix; None for PEFT's prefixes.
    Instances are immutable; replacing a task's prefix swaps the registry's reference, so a batch already
    running keeps the tensor it started with. In the slot layout the registry hands out host-memory prefixes (read
    from the store: a float32 view of the file's values, not necessarily contiguous); the engine's prefix bank
    converts and copies them to the device.
    """

    task_id: str
    kv: torch.Tensor
    sha256: str
    encoder_kv: torch.Tensor | None = None

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.kv.shape[3])

    @property
    def encoder_virtual_tokens(self) -> int:
        return int(self.encoder_kv.shape[3]) if self.encoder_kv is not None else 0

    def to(
        self, device: torch.device | str, dtype: torch.dtype | None = None, *, non_blocking: bool = False
    ) -> TaskPrefix:
        """A copy on `device` (and `dtype`). `non_blocking`: from pinned host memory to a GPU, the copy is queued on
        the current stream (which orders it before any step that reads it) instead of stalling the caller."""

        def moved(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype or t.dtype, non_blocking=non_blocking).contiguous()

        return self._copied(moved)

    def to_host(self, *, pinned: bool) -> TaskPrefix:
        """A copy in host memory; `pinned` (page-locked, CUDA only) lets the way back be an asynchronous DMA."""

        def moved(t: torch.Tensor) -> torch.Tensor:
            if not pinned:
                return t.to("cpu").contiguous()
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
            return host.copy_(t)

        return self._copied(moved)

    def _copied(self, move: Callable[[torch.Tensor], torch.Tensor]) -> TaskPrefix:
        """The same prefix with `move` applied to each of its tensors (the encoder half too, where there is one)."""
        encoder_kv = move(self.encoder_kv) if self.encoder_kv is not None else None
        return TaskPrefix(self.task_id, move(self.kv), self.sha256, encoder_kv)

    @property
    def nbytes(self) -> int:
        encoder = self.encoder_kv.numel() * self.encoder_kv.element_size() if self.encoder_kv is not None else 0
        return self.kv.numel() * self.kv.element_size() + encoder


def prompt_embeddings_to_kv(
    prompt_embeddings: torch.Tensor, geometry: PrefixGeometry, *, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """PEFT's saved (V, L*2*token_dim) tensor -> (L, 2, kv_heads, V, head_dim), the layout of PEFT's `get_prompt`.

    PEFT views the tensor as (V, 2L, H, D) and permutes to (2L, H, V, D); row 2l holds layer l's keys and row
    2l+1 its values.

    For an encoder-decoder model (SEQ_2_SEQ_LM, `num_transformer_submodules=2`) PEFT doubles the 2L rows to 4L and
    splits them in groups of four per layer, (self key, self value, cross key, cross value), then empties the cross
    part: decoder layer i reads key row (4i) mod 2L and value row (4i+1) mod 2L, where L is the adapter's
    `num_layers` (which may exceed the decoder's depth: PEFT's default is the encoder's). Reproduced here exactly.
    """
    num_virtual_tokens = prompt_embeddings.shape[0]
    g = geometry
    adapter_layers = prompt_embeddings.shape[1] // (2 * g.token_dim)
    rows = prompt_embeddings.reshape(num_virtual_tokens, 2 * adapter_layers, g.num_kv_heads, g.head_dim)
    rows = rows.permute(1, 2, 0, 3)  # (2L, H, V, D)
    if g.is_encoder_decoder:
        layers = torch.arange(g.num_layers)
        keys, values = (4 * layers) % (2 * adapter_layers), (4 * layers + 1) % (2 * adapter_layers)
        kv = torch.stack([rows[keys], rows[values]], dim=1)  # (L_decoder, 2, H, V, D)
    else:
        kv = prompt_embeddings_kv_view(prompt_embeddings, geometry)
    return kv.to(device=device, dtype=dtype).contiguous()


def prompt_embeddings_kv_view(prompt_embeddings: torch.Tensor, geometry: PrefixGeometry) -> torch.Tensor:
    """A decoder-only model's (V, L*2*token_dim) tensor seen as (L, 2, kv_heads, V, head_dim), without a copy: no
    kernel runs, so a thread that is not the engine's can make it without starting an OpenMP team of its own (see
    `service.compute_thread`); the prefix bank copies it into its columns on the engine thread."""
    g = geometry
    num_virtual_tokens = prompt_embeddings.shape[0]
    rows = prompt_embeddings.reshape(num_virtual_tokens, 2 * g.num_layers, g.num_kv_heads, g.head_dim)
    return rows.permute(1, 2, 0, 3).reshape(g.num_layers, 2, g.num_kv_heads, num_virtual_tokens, g.head_dim)


def encoder_prompt_embeddings_to_kv(
    encoder_prompt_embeddings: torch.Tensor, geometry: PrefixGeometry, *, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """A full prefix's encoder tensor (Ve, L_encoder*2*token_dim) -> (L_encoder, 2, H, Ve, D), row 2l = keys of
    encoder layer l and 2l+1 its values (the decoder-only layout of PEFT, over the encoder's layers)."""
    length = encoder_prompt_embeddings.shape[0]
    g = geometry
    kv = encoder_prompt_embeddings.reshape(length, 2 * g.encoder_num_layers, g.num_kv_heads, g.head_dim)
    kv = kv.permute(1, 2, 0, 3).reshape(g.encoder_num_layers, 2, g.num_kv_heads, length, g.head_dim)
    return kv.to(device=device, dtype=dtype).contiguous()


def left_padded_kv(
    kvs: Sequence[torch.Tensor | None], shape: tuple[int, int, int], *, device: torch.device, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Rows' (layers, 2, H, V_i, D) prefixes (None: no prefix) as per-layer keys and values (B, H, V_max, D), each
    row's prefix flush right (left-padded with zeros), and the (B, V_max) bool mask of its real columns."""
    layers, heads, head_dim = shape
    lengths = [kv.shape[3] if kv is not None else 0 for kv in kvs]
    longest = max(lengths, default=0)
    padded = torch.zeros((len(kvs), layers, 2, heads, longest, head_dim), device=device, dtype=dtype)
    mask = torch.zeros((len(kvs), longest), dtype=torch.bool, device=device)
    for i, (kv, length) in enumerate(zip(kvs, lengths)):
        if kv is not None and length:
            padded[i, :, :, :, longest - length :] = kv.to(device=device, dtype=dtype)
            mask[i, longest - length :] = True
    return [padded[:, layer, 0] for layer in range(layers)], [padded[:, layer, 1] for layer in range(layers)], mask
