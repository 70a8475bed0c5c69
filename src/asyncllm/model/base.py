"""`CausalLM`: what the runner needs from any model class in the registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from asyncllm.model.config import ModelConfig
from asyncllm.parallel import TPGroup

__all__ = ["CausalLM"]


class CausalLM(nn.Module, ABC):
    """A decoder-only LM over the paged KV cache.

    Contract: `forward(input_ids [T]) -> hidden [T, H]` and `compute_logits(hidden) -> [S, V]`
    run inside a forward context; attention layers are `PagedAttention` modules (the runner
    binds their caches); parameter names follow the checkpoint's, except projections packed
    as declared in `packed_modules`. Built with a `TPGroup`, a model holds this rank's shard
    (layers from `asyncllm.layers.linear` / `.embedding` say which slice each weight is);
    `compute_logits` returns the whole vocabulary on rank 0.
    """

    packed_modules: ClassVar[dict[str, tuple[str, str]]] = {}
    """Checkpoint projection name -> (packed module name, shard)."""

    def __init__(self, config: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        self.config = config
        self.tp = tp

    @abstractmethod
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states [T, hidden] of the step's tokens."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [S, vocab] of the rows the context's `logits_indices` names."""
