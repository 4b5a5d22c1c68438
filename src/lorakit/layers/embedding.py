"""LoRA for nn.Embedding: A is looked up like an embedding table, B projects to the embedding size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import lora_delta
from .base import AdapterSpec, LoraLayer, init_A


class Embedding(LoraLayer):
    """``base(ids) + scale * (A.T[ids] @ B.T)`` with A: (r, num_embeddings), B: (embedding_dim, r).

    Parameter names follow PEFT (lora_embedding_A / lora_embedding_B). No dropout: ids cannot be dropped.
    """

    peft_B_key = "lora_embedding_B"

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create(self, name: str, spec: AdapterSpec, dtype: torch.dtype, device: torch.device) -> None:
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(spec.r, self.num_embeddings, dtype=dtype, device=device))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.embedding_dim, spec.r, dtype=dtype, device=device))

    def _remove(self, name: str) -> None:
        del self.lora_embedding_A[name], self.lora_embedding_B[name]

    def _reset(self, name: str, spec: AdapterSpec) -> None:
        init_A(self.lora_embedding_A[name], spec)
        nn.init.zeros_(self.lora_embedding_B[name])

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        after_A = F.embedding(x, A.T, padding_idx=base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq)
        return after_A @ B.T

    def _delta(self, name: str) -> torch.Tensor:
        return embedding_delta(self.lora_embedding_A[name], self.lora_embedding_B[name])

    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_embedding_A": self.lora_embedding_A[name], "lora_embedding_B": self.lora_embedding_B[name]}

    def load_peft_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lora_embedding_A[name].copy_(tensors["lora_embedding_A"])
            self.lora_embedding_B[name].copy_(tensors["lora_embedding_B"])


def embedding_delta(A: torch.Tensor, B: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``scale * (B @ A).T``: the update of an embedding table (num_embeddings, dim) from A: (r, num) and
    B: (dim, r), in fp32. Shared with lorakit.parametrize."""
    return lora_delta(A, B, scale).T
