"""Triton against flash-attn on the same paged steps (block 256, Qwen3-0.6B heads, bf16).

Decode is reported as achieved bandwidth over the bytes that must move (K/V of every context
token, q and the output) and as a fraction of a device-to-device copy measured in the same
run; prefill in TFLOP/s over the causally visible pairs. Eager and CUDA-graph times both,
since the engine replays decode steps from graphs. This attributes a throughput gap between
the two backends to the attention kernels (or clears them).

Usage (flash_attn installed):
    PYTHONPATH=src python3 benchmarks/attention_backends.py --out attention-backends.json
    PYTHONPATH=src python3 benchmarks/attention_backends.py --sweep-flash-splits

`--sweep-flash-splits` times flash-attn's graph-replayed decode per batch size and key-split
count as the engine's graphs run it: block tables as wide as max_model_len allows (40,960
tokens: 160 pages), contexts spread over U[100, 2048] as in the nano-vllm workload's tail.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from attention import (
    DTYPE,
    HEAD_DIM,
    NUM_HEADS,
    NUM_KV_HEADS,
    Step,
    captured,
    copy_bandwidth,
    make_step,
    median_ms,
    visible_pairs,
)

from asyncllm.kernels.base import AttentionBackend
from asyncllm.kernels.flash_attn import FlashAttention
from asyncllm.kernels.triton_attn import TritonAttention

PAGE = 256
DECODES = [(256, 1024), (128, 2048), (32, 8192), (8, 2048)]
PREFILLS = [(8, 1024, 0), (4, 512, 2048)]


def forward_of(backend: AttentionBackend, step: Step) -> Callable[[], None]:
    """One call of `backend` on `step` (metadata built once, outside the timing)."""
    ctx = dataclasses.replace(step.ctx, attn_backend=backend)
    ctx = dataclasses.replace(ctx, attn_metadata=backend.build_metadata(ctx))

    def run() -> None:
        backend.forward(ctx, step.q, step.k, step.v, step.k_cache, step.v_cache, HEAD_DIM**-0.5)

    return run


def backends() -> dict[str, AttentionBackend]:
    return {"triton": TritonAttention(), "flash_attn": FlashAttention()}


def decode_rows(copy_rate: float) -> list[dict[str, Any]]:
    rows = []
    for batch, context in DECODES:
        step = make_step([context - 1] * batch, [1] * batch, PAGE, num_decodes=batch)
        moved = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
        moved += 2 * batch * NUM_HEADS * HEAD_DIM * DTYPE.itemsize
        for name, backend in backends().items():
            run = forward_of(backend, step)
            ms, graph_ms = median_ms(run), median_ms(captured(run).replay)
            rate = moved / (graph_ms * 1e-3)
            rows.append({"kind": "decode", "backend": name, "batch": batch, "context": context,
                         "ms": ms, "graph_ms": graph_ms, "GB/s": rate / 1e9,
                         "copy_fraction": rate / copy_rate})  # fmt: skip
        del step
        torch.cuda.empty_cache()
    return rows


def prefill_rows() -> list[dict[str, Any]]:
    rows = []
    for batch, new, prefix in PREFILLS:
        prefixes, q_lens = [prefix] * batch, [new] * batch
        step = make_step(prefixes, q_lens, PAGE, num_decodes=0)
        flops = 4 * visible_pairs(prefixes, q_lens) * NUM_HEADS * HEAD_DIM
        for name, backend in backends().items():
            ms = median_ms(forward_of(backend, step))
            tflops = flops / (ms * 1e-3) / 1e12
            rows.append({"kind": "prefill", "backend": name, "batch": batch, "new": new,
                         "prefix": prefix, "ms": ms, "TFLOP/s": tflops})  # fmt: skip
    return rows


SWEEP_BATCHES = (1, 2, 4, 8, 16, 32, 48, 64, 128)
SWEEP_SPLITS = (1, 2, 4, 8, 16, 32, 64, 128)
GRAPH_WIDTH = 40960 // PAGE  # the decode graphs' block-table width at Qwen3's max_model_len


def flash_split_rows(copy_rate: float, width: int) -> list[dict[str, Any]]:
    """Graph-replayed decode per (batch, splits) with block tables `width` pages wide (0: as
    wide as the longest row needs); Triton too."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in SWEEP_BATCHES:
        contexts = torch.randint(100, 2049, (batch,), generator=gen).tolist()
        step = make_step([c - 1 for c in contexts], [1] * batch, PAGE, num_decodes=batch)
        pad = max(0, width - step.ctx.block_tables.shape[1])
        tables = F.pad(step.ctx.block_tables, (0, pad))
        step = dataclasses.replace(step, ctx=dataclasses.replace(step.ctx, block_tables=tables))
        moved = 2 * sum(contexts) * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
        variants: dict[str, AttentionBackend] = {"triton": TritonAttention()}
        variants |= {f"flash/{s}": FlashAttention(decode_splits=s) for s in SWEEP_SPLITS}
        for name, backend in variants.items():
            graph_ms = median_ms(captured(forward_of(backend, step)).replay)
            rate = moved / (graph_ms * 1e-3)
            rows.append({"kind": "flash-splits", "backend": name, "batch": batch,
                         "graph_ms": graph_ms, "copy_fraction": rate / copy_rate})  # fmt: skip
            print(f"batch {batch:4d} {name:10s} {graph_ms * 1e3:8.1f} us "
                  f"{100 * rate / copy_rate:5.1f}% of copy", flush=True)  # fmt: skip
        del step
        torch.cuda.empty_cache()
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'case':<34} {'backend':<11} {'ms':>7} {'graph ms':>8} {'% copy':>7} {'TFLOP/s':>8}")
    for r in rows:
        if r["kind"] == "decode":
            case = f"decode {r['batch']} x {r['context']}, page {PAGE}"
            extra = f"{r['graph_ms']:>8.3f} {100 * r['copy_fraction']:>7.1f} {'':>8}"
        else:
            case = f"prefill {r['batch']} x {r['new']} after {r['prefix']}"
            extra = f"{'':>8} {'':>7} {r['TFLOP/s']:>8.1f}"
        print(f"{case:<34} {r['backend']:<11} {r['ms']:>7.3f} {extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument(
        "--sweep-flash-splits", action="store_true", help="only the flash-attn decode split sweep"
    )
    parser.add_argument("--table-width", type=int, default=GRAPH_WIDTH,
                        help="table width in pages (0: the rows' own)")  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    copy_rate = copy_bandwidth()
    torch.cuda.empty_cache()
    if args.sweep_flash_splits:
        rows = flash_split_rows(copy_rate, args.table_width)
    else:
        rows = decode_rows(copy_rate) + prefill_rows()
    print(f"device-to-device copy: {copy_rate / 1e9:.0f} GB/s (read + write)")
    if not args.sweep_flash_splits:
        print_rows(rows)
    if args.out:
        with open(args.out, "w") as f:
            result = {"device": torch.cuda.get_device_name(), "copy_GB/s": copy_rate / 1e9}
            json.dump(result | {"results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
