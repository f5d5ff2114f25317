"""A task prefix held in device memory in the per-layer KV layout the model's cache takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.geometry import PrefixGeometry


@dataclass(frozen=True)
class TaskPrefix:
    """One task's prefix, ready to be copied into a fresh cache.

    `kv` has shape (num_layers, 2, kv_heads, V, head_dim): kv[l, 0] are layer l's keys, kv[l, 1] its values.
    Instances are immutable; replacing a task's prefix swaps the registry's reference, so a batch already
    running keeps the tensor it started with.
    """

    task_id: str
    kv: torch.Tensor
    sha256: str

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.kv.shape[3])

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def prompt_embeddings_to_kv(
    prompt_embeddings: torch.Tensor, geometry: PrefixGeometry, *, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """PEFT's saved (V, L*2*token_dim) tensor -> (L, 2, kv_heads, V, head_dim), the layout of PEFT's `get_prompt`.

    PEFT views the tensor as (V, 2L, H, D) and permutes to (2L, H, V, D); row 2l holds layer l's keys and row
    2l+1 its values.
    """
    num_virtual_tokens = prompt_embeddings.shape[0]
    g = geometry
    kv = prompt_embeddings.reshape(num_virtual_tokens, 2 * g.num_layers, g.num_kv_heads, g.head_dim)
    kv = kv.permute(1, 2, 0, 3).reshape(g.num_layers, 2, g.num_kv_heads, num_virtual_tokens, g.head_dim)
    return kv.to(device=device, dtype=dtype).contiguous()
