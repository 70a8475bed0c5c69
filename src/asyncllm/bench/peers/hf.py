"""transformers as a peer: continuous batching (the engine behind `generate_batch`).

Requests go to transformers' continuous-batching manager one by one, each with its own
`max_new_tokens`, so the output lengths are the workload's own (`generate_batch` takes one
length for all). No EOS stops a request (`eos_token_id=-1`). Timed after a short warm-up in
the same manager.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from asyncllm.bench.peers import PeerUnavailableError, PeerWorkload

__all__ = ["measure"]

ATTENTION_CHOICES = ("paged|sdpa", "sdpa")
"""Tried in order: transformers 5.17 needs "paged|sdpa" for continuous batching (the flash
variants want hub kernels); later versions refuse it and take "sdpa"."""

CPU_PAGE_TOKENS = 256
"""transformers' default KV page size, used to size its cache on a CPU."""


def measure(workload: PeerWorkload) -> dict[str, Any]:
    """Output tok/s of transformers on `workload` (PeerUnavailableError if not installed)."""
    try:
        import transformers
    except ImportError as exc:
        raise PeerUnavailableError(f"transformers does not import: {exc}") from exc
    hf: Any = transformers
    device = torch.device(workload.device)
    model = hf.AutoModelForCausalLM.from_pretrained(
        workload.model_dir, dtype=getattr(torch, workload.dtype)
    ).to(device)
    manager, attention = _start(hf, model, workload)
    try:
        _generate(manager, workload.prompts[:4], [8] * min(4, len(workload.prompts)))
        _sync(device)
        start = time.perf_counter()
        lengths = _generate(manager, workload.prompts, workload.output_lens)
        _sync(device)
        seconds = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    generated = sum(lengths)
    return {
        "tok_per_s": generated / seconds,
        "seconds": seconds,
        "output_tokens": generated,
        "expected_output_tokens": sum(workload.output_lens),
        "version": hf.__version__,
        "attn_implementation": attention,
    }


def _start(hf: Any, model: Any, workload: PeerWorkload) -> tuple[Any, str]:
    """A started manager and the attention implementation it accepted."""
    config = hf.GenerationConfig(
        max_new_tokens=max(workload.output_lens), do_sample=True,
        temperature=workload.temperature, eos_token_id=-1, pad_token_id=0,
    )  # fmt: skip
    kwargs: dict[str, Any] = {"generation_config": config}
    if workload.device == "cpu":
        # Sized from free memory it allocates for tens of seconds on a CPU; size it to the
        # workload instead (on CUDA its own sizing is what its published numbers use).
        tokens = sum(map(len, workload.prompts)) + sum(workload.output_lens)
        kwargs["continuous_batching_config"] = hf.ContinuousBatchingConfig(
            num_blocks=len(workload.prompts) + tokens // CPU_PAGE_TOKENS + 1,
            max_batch_tokens=512,
        )
    refusals = []
    for attention in ATTENTION_CHOICES:
        model.config._attn_implementation = attention
        try:
            manager = model.init_continuous_batching(**kwargs)
        except ValueError as exc:  # this version refuses that implementation
            refusals.append(f"{attention}: {exc}")
            continue
        manager.start()
        return manager, str(model.config._attn_implementation)
    raise RuntimeError("transformers refused every attention choice: " + "; ".join(refusals))


def _generate(manager: Any, prompts: list[list[int]], lengths: list[int]) -> list[int]:
    """Submit every prompt with its own length; the number of tokens each one generated."""
    ids = [f"r{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for request_id, prompt, length in zip(ids, prompts, lengths):
        manager.add_request(prompt, request_id=request_id, max_new_tokens=length)
    done: dict[str, int] = {}
    while len(done) < len(ids):
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("transformers' generation thread stopped early")
            continue
        if getattr(result, "error", None):
            raise RuntimeError(f"transformers failed request {result.request_id}: {result.error}")
        if _finished(result):
            done[result.request_id] = len(result.generated_tokens)
    return [done[request_id] for request_id in ids]


def _finished(result: Any) -> bool:
    """Whether a manager output is its request's last (the check moved between versions)."""
    if callable(getattr(result, "is_finished", None)):
        return bool(result.is_finished())
    return str(getattr(result.status, "name", result.status)) == "FINISHED"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
