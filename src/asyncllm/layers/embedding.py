"""Token embedding and the LM head, both split by vocabulary across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.context import current_forward_context
from asyncllm.parallel import TPGroup, WeightShard, shard_range

__all__ = ["ParallelLMHead", "VocabParallelEmbedding"]

_ONE_RANK = TPGroup()


class VocabParallelEmbedding(nn.Module):
    """Each rank holds the rows of an equal slice of the vocabulary; a token's vector comes
    from the rank that holds it (the others contribute zeros to one all-reduce).

    Example:
        >>> embed = VocabParallelEmbedding(384, 64)
        >>> embed(torch.tensor([3, 7])).shape
        torch.Size([2, 64])
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = _ONE_RANK) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_start, self.vocab_end = shard_range(vocab_size, tp.rank, tp.world_size)
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.is_parallel:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        vectors = F.embedding(local_ids, self.weight).masked_fill(outside[:, None], 0.0)
        return self.tp.all_reduce(vectors)

    def weight_shard(self, leaf: str, shard: str | None) -> WeightShard:
        """This rank's rows of the embedding matrix."""
        return WeightShard(dim=0, part=self.tp.rank, parts=self.tp.world_size)


class ParallelLMHead(nn.Module):
    """Projects the hidden states of the tokens that will be sampled to vocabulary logits.

    Which rows those are comes from the forward context (`logits_indices`), so prefill chunks
    that sample nothing cost no LM-head work. Each rank computes the logits of its vocabulary
    slice; one all-gather assembles them (rank 0 samples; other ranks' copies go unused).
    With tied embeddings the weight is the input embedding's own (same vocabulary slice).
    """

    def __init__(
        self, hidden_size: int, vocab_size: int, tp: TPGroup = _ONE_RANK,
        tied_weight: nn.Parameter | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.tp = tp
        # A tied head registers the embedding's own Parameter: one tensor, two names.
        self.weight = (
            tied_weight
            if tied_weight is not None
            else nn.Parameter(torch.empty(vocab_size // tp.world_size, hidden_size))
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden[current_forward_context().logits_indices]
        logits = F.linear(rows, self.weight)
        world, (num_rows, local_vocab) = self.tp.world_size, logits.shape
        if world == 1 or num_rows == 0:  # (every rank knows the row count: all skip alike)
            return logits.new_empty(num_rows, world * local_vocab) if num_rows == 0 else logits
        gathered = self.tp.all_gather(logits)  # [world * S, V / world], rank-major
        if not self.tp.is_driver:
            return gathered  # only rank 0 samples: skip the reordering copy
        by_rank = gathered.view(world, num_rows, local_vocab).transpose(0, 1)
        return by_rank.reshape(num_rows, world * local_vocab)

    def weight_shard(self, leaf: str, shard: str | None) -> WeightShard:
        """This rank's rows of the (untied) LM head."""
        return WeightShard(dim=0, part=self.tp.rank, parts=self.tp.world_size)
