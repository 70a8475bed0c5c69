"""nano-vllm as a peer (MIT; run as a black box, never a source of code).

It needs CUDA, flash-attn and its own source on the path (`--nano-vllm-path`); it binds TCP
port 2333 for its process group, so only one runs at a time, in its own process. Timed like
asyncllm's offline run: after a short warm-up on real prompts, one `generate` of the whole
workload with each request's own `max_tokens` and `ignore_eos`.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

import torch

from asyncllm.bench.peers import PeerUnavailableError, PeerWorkload

__all__ = ["measure"]

MAX_MODEL_LEN = 4096
"""nano-vllm's context limit here: the workload's longest request is 2,048 tokens."""


def measure(workload: PeerWorkload) -> dict[str, Any]:
    """Output tok/s of nano-vllm on `workload` (raises PeerUnavailableError off CUDA or when
    nano-vllm or flash-attn does not import)."""
    if not torch.cuda.is_available():
        raise PeerUnavailableError("nano-vllm needs CUDA; none is available")
    try:
        nanovllm: Any = importlib.import_module("nanovllm")
    except ImportError as exc:
        raise PeerUnavailableError(f"nano-vllm does not import: {exc}") from exc
    LLM, SamplingParams = nanovllm.LLM, nanovllm.SamplingParams
    llm = LLM(workload.model_dir, enforce_eager=False, max_model_len=MAX_MODEL_LEN)
    # Warm-up with real prompt lengths: its first prefill sizes buffers and compiles kernels.
    llm.generate(workload.prompts[:16], SamplingParams(max_tokens=8), use_tqdm=False)
    params = [SamplingParams(temperature=workload.temperature, ignore_eos=True, max_tokens=n)
              for n in workload.output_lens]  # fmt: skip
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(workload.prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = sum(len(out["token_ids"]) for out in outputs)
    return {
        "tok_per_s": generated / seconds,
        "seconds": seconds,
        "output_tokens": generated,
        "expected_output_tokens": sum(workload.output_lens),
        "device": torch.cuda.get_device_name(),
        "settings": f"CUDA graphs, block 256, max_model_len {MAX_MODEL_LEN}",
    }
