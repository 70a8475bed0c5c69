"""Token embedding and the LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.context import current_forward_context

__all__ = ["LMHead"]


class LMHead(nn.Module):
    """Projects the hidden states of the tokens that will be sampled to vocabulary logits.

    Which rows those are comes from the forward context (`logits_indices`), so prefill chunks
    that sample nothing cost no LM-head work. With tied embeddings the weight is shared with
    the input embedding.
    """

    def __init__(
        self, hidden_size: int, vocab_size: int, tied_weight: nn.Parameter | None = None
    ) -> None:
        super().__init__()
        # A tied head registers the embedding's own Parameter: one tensor, two names.
        self.weight = (
            tied_weight
            if tied_weight is not None
            else nn.Parameter(torch.empty(vocab_size, hidden_size))
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden[current_forward_context().logits_indices]
        return F.linear(rows, self.weight)
