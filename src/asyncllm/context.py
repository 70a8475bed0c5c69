"""The per-step forward context: what the layers need to know about the batch they run on.

The runner builds one `ForwardContext` per step and binds it around the forward pass:

    with forward_context(ctx):
        hidden = model(input_ids)

Layers read it with `current_forward_context()` instead of taking step metadata as
arguments. It lives in a `contextvars.ContextVar`, so concurrent forward passes (threads,
asyncio tasks, two engines in one process) each see only their own context, and reading it
outside a forward pass raises `NoForwardContextError` rather than returning a stale value.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from asyncllm.errors import NoForwardContextError

if TYPE_CHECKING:
    import torch

    from asyncllm.kernels.base import AttentionBackend

__all__ = ["ForwardContext", "current_forward_context", "forward_context"]


@dataclass(frozen=True, slots=True)
class ForwardContext:
    """Everything one step's layers need, as tensors on the model's device plus a few flags.

    Sequences are ordered decodes first: the first `num_decode_seqs` sequences have exactly
    one query token each; the rest are prefill chunks (possibly after a cached prefix).
    `T` below is the number of tokens in the step, `B` the number of sequences.
    """

    positions: torch.Tensor
    """[T] int64: position of each token in its sequence."""
    slot_mapping: torch.Tensor
    """[T] int64: KV-cache slot (block * block_size + offset) each token's K/V goes to; -1 skips."""
    cu_seqlens_q: torch.Tensor
    """[B + 1] int32: prefix sums of the query lengths."""
    seq_lens_k: torch.Tensor
    """[B] int32: KV length of each sequence after this step's tokens are written."""
    block_tables: torch.Tensor
    """[B, max_blocks] int32: physical block of each logical block (padding holds 0)."""
    logits_indices: torch.Tensor
    """[S] int64: rows of the hidden states that feed the LM head (one per sampled sequence)."""
    max_seqlen_q: int
    max_seqlen_k: int
    num_decode_seqs: int
    attn_backend: AttentionBackend
    attn_metadata: Any = None
    """Whatever the attention backend precomputed for this step (see `AttentionBackend`)."""

    @property
    def num_seqs(self) -> int:
        """Number of sequences in the step."""
        return int(self.seq_lens_k.shape[0])

    @property
    def is_decode_only(self) -> bool:
        """True when every sequence computes exactly one token."""
        return self.num_decode_seqs == self.num_seqs

    @property
    def is_prefill_only(self) -> bool:
        """True when no sequence is a single-token decode."""
        return self.num_decode_seqs == 0

    def with_attn_metadata(self) -> ForwardContext:
        """This context with what its attention backend precomputes for the step
        (`AttentionBackend.build_metadata`, enqueued on the current stream); often nothing,
        and then the context itself."""
        metadata = self.attn_backend.build_metadata(self)
        if metadata is None and self.attn_metadata is None:
            return self
        return replace(self, attn_metadata=metadata)


_CURRENT: ContextVar[ForwardContext] = ContextVar("asyncllm_forward_context")


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Bind `ctx` for the layers called inside the block; the previous binding is restored on
    exit, also when the block raises.

    Example:
        >>> with forward_context(ctx):  # doctest: +SKIP
        ...     hidden = model(input_ids)
    """
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def current_forward_context() -> ForwardContext:
    """The context bound by the innermost enclosing `forward_context(...)`.

    Raises:
        NoForwardContextError: when called outside a forward pass.
    """
    try:
        return _CURRENT.get()
    except LookupError:
        raise NoForwardContextError(
            "no forward context is bound: layers must run inside `with forward_context(ctx):`"
        ) from None
