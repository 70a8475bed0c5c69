"""The throughput floor of a workload: the least time any engine needs on a device.

A decode step must read every weight once and the K/V of every token each sequence attends
to; a prefill must do the prompt's matrix products. Bytes over the device's copy bandwidth
plus prefill FLOPs over its matrix rate give a time no engine beats by much (the arithmetic
of `../shared/GPU_MACHINE.md`: about 4.0 s, 34.7k output tok/s, for the nano-vllm workload on
an H200). Both rates are measured in the run: `measure_copy_bandwidth`,
`measure_matmul_rate`.

    floor = workload_floor(SHAPES["qwen3-0.6b"], prompt_lens, output_lens, dtype_bytes=2,
                           max_batched_tokens=8192, copy_bytes_per_s=4.25e12,
                           matmul_flop_per_s=7e14)
    floor.tok_per_s  # about 34,700
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from asyncllm.bench.model import checkpoint_shapes
from asyncllm.errors import ConfigError
from asyncllm.model.config import ModelConfig

__all__ = [
    "WorkloadFloor",
    "decode_context_tokens",
    "kv_bytes_per_token",
    "measure_copy_bandwidth",
    "measure_matmul_rate",
    "prefill_flops",
    "weight_bytes_per_step",
    "workload_floor",
]

_EMBEDDING = "model.embed_tokens.weight"


class WorkloadFloor(NamedTuple):
    """What a workload must move and compute, and the least time that takes."""

    kv_read_bytes: int
    """K/V bytes every decode step reads, summed over the run."""
    weight_bytes_per_step: int
    """Weights one forward step reads (the embedding table only as the tied LM head)."""
    steps: int
    """Forward steps: the prefill chunks, then the longest request's decode steps."""
    prefill_flops: int
    """Matrix products and attention of every prompt, plus one LM head row per request."""
    copy_bytes_per_s: float
    """Device memory bandwidth, bytes read plus bytes written per second."""
    matmul_flop_per_s: float
    """Device matrix-multiply rate, FLOP per second."""
    output_tokens: int
    seconds: float
    tok_per_s: float


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
    """K and V of one token over all layers."""
    return cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * dtype_bytes


def decode_context_tokens(prompt_lens: Sequence[int], output_lens: Sequence[int]) -> int:
    """Tokens of context the decode steps attend over, summed over every step.

    The first output token comes from the prefill; the step that makes token k (k >= 2)
    attends over the prompt and the k - 1 tokens before it.
    """
    return sum((out - 1) * p + out * (out - 1) // 2 for p, out in zip(prompt_lens, output_lens))


def weight_bytes_per_step(config: dict[str, Any], dtype_bytes: int) -> int:
    """Bytes of weights one step reads: all of them (an MoE's experts too: a full batch
    touches nearly every expert), the embedding table only once, as a tied LM head."""
    cfg = ModelConfig.from_dict(config)
    shapes = checkpoint_shapes(config)
    params = sum(math.prod(shape) for name, shape in shapes.items() if name != _EMBEDDING)
    if cfg.tie_word_embeddings:
        params += cfg.vocab_size * cfg.hidden_size
    return params * dtype_bytes


def prefill_flops(config: dict[str, Any], prompt_lens: Sequence[int]) -> int:
    """FLOPs of prefilling every prompt: the layers' matrix products per token (an MoE's
    experts at the routed fraction), causal attention, and the LM head on the last token."""
    cfg = ModelConfig.from_dict(config)
    matrix_params = 0.0
    for name, shape in checkpoint_shapes(config).items():
        if len(shape) != 2 or not name.startswith("model.layers."):
            continue
        share = 1.0
        if ".experts." in name and cfg.moe is not None:
            share = cfg.moe.num_experts_per_tok / cfg.moe.num_experts
        matrix_params += share * math.prod(shape)
    tokens = sum(prompt_lens)
    causal_pairs = sum(p * (p + 1) // 2 for p in prompt_lens)
    # QK^T and PV: 2 FLOPs per multiply-add each, per head dimension.
    attention = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * causal_pairs
    lm_head = 2 * cfg.vocab_size * cfg.hidden_size * len(prompt_lens)
    return round(2 * matrix_params * tokens) + attention + lm_head


def workload_floor(
    config: dict[str, Any], prompt_lens: Sequence[int], output_lens: Sequence[int], *,
    dtype_bytes: int, max_batched_tokens: int, copy_bytes_per_s: float,
    matmul_flop_per_s: float, kv_dtype_bytes: int | None = None,
) -> WorkloadFloor:  # fmt: skip
    """The floor of generating `output_lens` tokens after `prompt_lens` with the model of
    `config` (a config.json dict) on a device with these rates; weights of `dtype_bytes`,
    a KV cache of `kv_dtype_bytes` (None: the same)."""
    if len(prompt_lens) != len(output_lens) or not output_lens:
        raise ConfigError(
            f"workload_floor needs one output length per prompt, got {len(prompt_lens)} "
            f"prompts and {len(output_lens)} output lengths"
        )
    for name, value in (("copy_bytes_per_s", copy_bytes_per_s),
                        ("matmul_flop_per_s", matmul_flop_per_s),
                        ("max_batched_tokens", max_batched_tokens),
                        ("dtype_bytes", dtype_bytes),
                        ("kv_dtype_bytes", kv_dtype_bytes or dtype_bytes)):  # fmt: skip
        if not value > 0:
            raise ConfigError(f"workload_floor: {name} must be positive, got {value!r}")
    cfg = ModelConfig.from_dict(config)
    kv_bytes = kv_bytes_per_token(cfg, kv_dtype_bytes or dtype_bytes)
    kv_read = kv_bytes * decode_context_tokens(prompt_lens, output_lens)
    weights = weight_bytes_per_step(config, dtype_bytes)
    steps = max(output_lens) + math.ceil(sum(prompt_lens) / max_batched_tokens)
    flops = prefill_flops(config, prompt_lens)
    seconds = (kv_read + weights * steps) / copy_bytes_per_s + flops / matmul_flop_per_s
    return WorkloadFloor(
        kv_read_bytes=kv_read, weight_bytes_per_step=weights, steps=steps, prefill_flops=flops,
        copy_bytes_per_s=copy_bytes_per_s, matmul_flop_per_s=matmul_flop_per_s,
        output_tokens=sum(output_lens), seconds=seconds, tok_per_s=sum(output_lens) / seconds,
    )  # fmt: skip


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10
                           ) -> float:  # fmt: skip
    """Bytes read plus bytes written per second by a large device-to-device copy (the
    median of `repeats`); 2 GiB on CUDA by default, 64 MiB elsewhere."""
    if nbytes is None:
        nbytes = 2 * 2**30 if device.type == "cuda" else 64 * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    times = _timed(device, lambda: dst.copy_(src), repeats)
    return 2 * nbytes / statistics.median(times)


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, size: int | None = None,
                        repeats: int = 10) -> float:  # fmt: skip
    """FLOP per second of a square matrix product in `dtype` (the median of `repeats`);
    8192 on CUDA by default, 512 elsewhere."""
    if size is None:
        size = 8192 if device.type == "cuda" else 512
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = _timed(device, lambda: torch.mm(a, b), repeats)
    return 2 * size**3 / statistics.median(times)


def _timed(device: torch.device, work: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of `repeats` runs of `work`, after one warm-up run."""
    work()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
