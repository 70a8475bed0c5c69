"""Benchmark the Triton attention backend on the GPU: decode bandwidth and prefill FLOP/s.

Decode is memory-bound, so it is reported as achieved bytes/s over the bytes that must move
(K and V of every context token, plus q and the output) and as a fraction of a
device-to-device copy measured in the same run (bytes read + written). Prefill is reported
in TFLOP/s over the causally visible (query, key) pairs, next to PyTorch's bundled
FlashAttention-2 (`varlen_attn`, contiguous K/V) where available.

Usage:
    PYTHONPATH=src python benchmarks/attention.py --out attention.json
    PYTHONPATH=src python benchmarks/attention.py --sweep     # also try launch variants
    PYTHONPATH=src python benchmarks/attention.py --kv-cache-dtype fp8   # a float8 cache
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.testing

from asyncllm.context import ForwardContext
from asyncllm.kernels.torch_ref import TorchAttention
from asyncllm.kernels.triton_attn import DecodeTuning, PrefillTuning, TritonAttention

# Qwen3-0.6B attention shapes.
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128
DTYPE = torch.bfloat16


@dataclasses.dataclass
class Step:
    """One step's attention inputs over a randomly paged cache."""

    ctx: ForwardContext
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    out: torch.Tensor


def make_step(
    prefixes: list[int],
    q_lens: list[int],
    page_size: int,
    num_decodes: int,
    kv_dtype: torch.dtype = DTYPE,
) -> Step:
    """Sequences with `prefixes[i]` cached tokens and `q_lens[i]` new ones, pages shuffled,
    over a cache of `kv_dtype`."""
    device = torch.device("cuda")
    seq_lens = [p + n for p, n in zip(prefixes, q_lens)]
    pages = [math.ceil(s / page_size) for s in seq_lens]
    width = max(pages)
    physical = torch.randperm(sum(pages), device=device, dtype=torch.int64)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int64, device=device)
    start = 0
    for row, count in enumerate(pages):
        tables[row, :count] = physical[start : start + count]
        start += count
    positions = torch.cat([torch.arange(p, s, device=device) for p, s in zip(prefixes, seq_lens)])
    rows = torch.repeat_interleave(
        torch.arange(len(seq_lens), device=device), torch.tensor(q_lens, device=device)
    )
    slots = tables[rows, positions // page_size] * page_size + positions % page_size
    cache = torch.randn(2, sum(pages), page_size, NUM_KV_HEADS, HEAD_DIM, device=device)
    cache = cache.to(kv_dtype)
    num_tokens = sum(q_lens)
    q = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    v = torch.randn_like(k)
    cu_q = torch.zeros(len(q_lens) + 1, dtype=torch.int32, device=device)
    cu_q[1:] = torch.tensor(q_lens, device=device).cumsum(0)
    ctx = ForwardContext(
        positions=positions,
        slot_mapping=slots,
        cu_seqlens_q=cu_q,
        seq_lens_k=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(torch.int32),
        logits_indices=torch.zeros(0, dtype=torch.int64, device=device),
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(seq_lens),
        num_decode_seqs=num_decodes,
        attn_backend=TorchAttention(),
    )
    return Step(ctx, q, k, v, cache[0], cache[1], torch.empty_like(q))


def median_ms(fn: Callable[[], Any]) -> float:
    """Median of do_bench's event-timed repeats, in milliseconds."""
    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    source = torch.randn(2**29, device="cuda", dtype=torch.float32)  # 2 GiB
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source))
    return 2 * source.numel() * source.element_size() / (ms * 1e-3)


def run_backend(backend: TritonAttention, step: Step) -> Callable[[], None]:
    return lambda: backend.forward_into(
        step.out, step.ctx, step.q, step.k, step.v, step.k_cache, step.v_cache, HEAD_DIM**-0.5
    )


def decode_case(
    batch: int,
    context: int,
    page_size: int,
    tunings: list[DecodeTuning],
    copy_bytes_per_s: float,
    kv_dtype: torch.dtype,
) -> list[dict[str, Any]]:
    """Time a decode-only step (all sequences at `context` keys) under each tuning."""
    step = make_step([context - 1] * batch, [1] * batch, page_size, batch, kv_dtype)
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * kv_dtype.itemsize
    io_bytes = 2 * batch * NUM_HEADS * HEAD_DIM * DTYPE.itemsize
    results = []
    for tuning in tunings:
        backend = TritonAttention(decode=tuning)
        ms = median_ms(run_backend(backend, step))
        graph_ms = median_ms(captured(run_backend(backend, step)).replay)
        rate = (kv_bytes + io_bytes) / (ms * 1e-3)
        results.append(
            {
                "kind": "decode",
                "kv_cache": str(kv_dtype),
                "batch": batch,
                "context": context,
                "page_size": page_size,
                "tuning": dataclasses.asdict(tuning),
                "splits": backend.decode_splits(batch, NUM_KV_HEADS, step.q.device),
                "ms": ms,
                "graph_ms": graph_ms,
                "GB/s": rate / 1e9,
                "copy_fraction": rate / copy_bytes_per_s,
            }
        )
    del step
    torch.cuda.empty_cache()
    return results


def captured(fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """`fn` captured in a CUDA graph (after one eager run, which compiles it)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def visible_pairs(prefixes: list[int], q_lens: list[int]) -> int:
    """(query, key) pairs the causal mask lets through."""
    return sum(n * p + n * (n + 1) // 2 for p, n in zip(prefixes, q_lens))


def prefill_case(
    batch: int,
    new: int,
    prefix: int,
    page_size: int,
    tunings: list[PrefillTuning],
    with_flash: bool,
    kv_dtype: torch.dtype,
) -> list[dict[str, Any]]:
    """Time a prefill step of `batch` sequences of `new` tokens after `prefix` cached ones."""
    prefixes, q_lens = [prefix] * batch, [new] * batch
    step = make_step(prefixes, q_lens, page_size, 0, kv_dtype)
    flops = 4 * visible_pairs(prefixes, q_lens) * NUM_HEADS * HEAD_DIM
    results = []
    for tuning in tunings:
        ms = median_ms(run_backend(TritonAttention(prefill=tuning), step))
        results.append(
            {
                "kind": "prefill",
                "kv_cache": str(kv_dtype),
                "batch": batch,
                "new": new,
                "prefix": prefix,
                "page_size": page_size,
                "tuning": dataclasses.asdict(tuning),
                "ms": ms,
                "TFLOP/s": flops / (ms * 1e-3) / 1e12,
            }
        )
    fa_ms = flash_reference_ms(prefixes, q_lens) if with_flash else None
    if fa_ms is not None:
        results.append(
            {
                "kind": "prefill-fa2-contiguous",
                "batch": batch,
                "new": new,
                "prefix": prefix,
                "ms": fa_ms,
                "TFLOP/s": flops / (fa_ms * 1e-3) / 1e12,
            }
        )
    return results


def flash_reference_ms(prefixes: list[int], q_lens: list[int]) -> float | None:
    """PyTorch's FlashAttention-2 varlen on contiguous K/V (no paging), for comparison."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    device = torch.device("cuda")
    seq_lens = [p + n for p, n in zip(prefixes, q_lens)]
    q = torch.randn(sum(q_lens), NUM_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    k = torch.randn(sum(seq_lens), NUM_KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    v = torch.randn_like(k)

    def cumsum(values: list[int]) -> torch.Tensor:
        return torch.tensor([0, *values], device=device).cumsum(0).to(torch.int32)

    cu_q, cu_k = cumsum(q_lens), cumsum(seq_lens)
    try:
        return median_ms(
            lambda: varlen_attn(
                q, k, v, cu_q, cu_k, max(q_lens), max(seq_lens), window_size=(-1, 0)
            )
        )
    except (RuntimeError, TypeError) as exc:
        print(f"varlen_attn unavailable: {exc}")
        return None


def decode_tunings(sweep: bool) -> list[DecodeTuning]:
    if not sweep:
        return [DecodeTuning()]
    return [DecodeTuning()] + [
        DecodeTuning(block_n=block_n, num_warps=warps, num_stages=stages)
        for block_n in (64, 128)
        for warps in (4, 8)
        for stages in (2, 3)
    ]


# Decode shapes for checking the split rule (sweep only): (batch, context).
SPLIT_SHAPES = [(1, 8192), (4, 4096), (16, 2048), (32, 8192), (64, 2048), (128, 512)]


def split_tunings() -> list[DecodeTuning]:
    return [DecodeTuning()] + [DecodeTuning(fixed_splits=s) for s in (1, 2, 4, 8, 16, 32, 64)]


def prefill_tunings(sweep: bool) -> list[PrefillTuning]:
    if not sweep:
        return [PrefillTuning()]
    return [PrefillTuning()] + [
        PrefillTuning(block_m=m, block_n=n, num_warps=w, num_stages=s)
        for m, n, w, s in [
            (128, 64, 4, 3),
            (128, 128, 8, 2),
            (128, 128, 8, 3),
            (64, 64, 4, 3),
            (128, 32, 4, 4),
            (64, 128, 4, 2),
            (128, 64, 8, 4),
        ]
    ]


_SHORT = {
    "block_m": "bm",
    "block_n": "bn",
    "num_warps": "w",
    "num_stages": "st",
    "fixed_splits": "splits",
}


def print_table(results: list[dict[str, Any]], copy_bytes_per_s: float) -> None:
    print(f"\ndevice-to-device copy: {copy_bytes_per_s / 1e9:.0f} GB/s (read + write)")
    print(
        f"{'case':<46} {'tuning':<22} {'ms':>7} {'graph ms':>8} {'GB/s':>6} {'% copy':>6}"
        f" {'TFLOP/s':>7}"
    )
    for r in results:
        graph_ms, rate, frac, tflops = "", "", "", ""
        if r["kind"] == "decode":
            case = f"decode B={r['batch']} ctx={r['context']} page={r['page_size']}"
            case += f" splits={r['splits']}"
            graph_ms, rate = f"{r['graph_ms']:.3f}", f"{r['GB/s']:.0f}"
            frac = f"{100 * r['copy_fraction']:.1f}"
        else:
            case = f"{r['kind']} {r['batch']}x{r['new']} after {r['prefix']}"
            if "page_size" in r:
                case += f" page={r['page_size']}"
            tflops = f"{r['TFLOP/s']:.1f}"
        tuning = ",".join(
            f"{_SHORT.get(k, k)}={v}"
            for k, v in r.get("tuning", {}).items()
            if v is not None and k in _SHORT
        )
        print(
            f"{case:<46} {tuning:<22} {r['ms']:>7.3f} {graph_ms:>8} {rate:>6} {frac:>6} {tflops:>7}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--sweep", action="store_true", help="also time launch variants")
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="what the cache holds (default: auto, bfloat16)")  # fmt: skip
    args = parser.parse_args()
    kv_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else DTYPE
    torch.manual_seed(0)

    copy_rate = copy_bandwidth()
    torch.cuda.empty_cache()
    results: list[dict[str, Any]] = []
    for batch, context in ((256, 1024), (32, 8192)):
        for page_size in args.page_sizes:
            tunings = decode_tunings(args.sweep and page_size == args.page_sizes[0])
            results += decode_case(batch, context, page_size, tunings, copy_rate, kv_dtype)
    if args.sweep:
        for batch, context in SPLIT_SHAPES:
            results += decode_case(batch, context, 16, split_tunings(), copy_rate, kv_dtype)
    for batch, new, prefix in ((8, 1024, 0), (4, 512, 2048), (1, 4096, 0)):
        for page_size in args.page_sizes[:2]:
            first = page_size == args.page_sizes[0]
            variants = prefill_tunings(args.sweep and first)
            results += prefill_case(batch, new, prefix, page_size, variants, first, kv_dtype)

    print_table(results, copy_rate)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "copy_GB/s": copy_rate / 1e9,
                    "results": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
