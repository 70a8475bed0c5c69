"""Sweep the Triton decode kernel's tile shape (keys per tile, warps, pipeline stages) per
KV-cache dtype and batch shape, on the GPU.

Each case is one decode step of Qwen3-0.6B's attention (16 q / 8 KV heads, head_dim 128) over
a randomly paged cache, timed as CUDA-graph replays; the first row of each case is the
backend's default. Outputs of every tuning are compared with the default's, so a tuning
that computes something else shows up as a difference, not as a speed.

A shape is ROWSxKEYS (every row at KEYS keys) or ROWSxLOW-HIGH (each row's keys drawn from
U[LOW, HIGH], as in a real batch); the second row of each case launches the rows in row
order instead of longest first.

Usage:
    PYTHONPATH=src python benchmarks/decode_tiles.py --out decode_tiles.json
    PYTHONPATH=src python benchmarks/decode_tiles.py --kv-cache-dtypes fp8 --shapes 256x100-1100
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from typing import Any

import torch
from attention import (
    HEAD_DIM,
    NUM_KV_HEADS,
    captured,
    copy_bandwidth,
    make_step,
    median_ms,
    run_backend,
)

from asyncllm.kernels.triton_attn import DecodeTuning, TritonAttention

KV_DTYPES = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}
DEFAULT_SHAPES = (
    "256x1024,128x2048,64x1024,32x8192,8x2048,1x8192,256x100-1100,256x100-2000,64x100-2000"
)


def tunings(splits: list[int] | None = None) -> list[DecodeTuning]:
    """The default first, then rows in row order, then every (keys per tile, warps,
    stages) of the grid, or (with `splits`) each of those split counts."""
    if splits:
        grid = [DecodeTuning(fixed_splits=count) for count in splits]
    else:
        grid = [
            DecodeTuning(block_n=block_n, num_warps=warps, num_stages=stages)
            for block_n in (32, 64, 128)
            for warps in (1, 2, 4)
            for stages in (3, 5)
        ]
    return [DecodeTuning(), DecodeTuning(longest_first=False), *grid]


def row_lengths(shape: str) -> list[int]:
    """The keys of each row of a ROWSxKEYS or ROWSxLOW-HIGH shape (seeded)."""
    rows, keys = shape.split("x")
    if "-" not in keys:
        return [int(keys)] * int(rows)
    low, high = map(int, keys.split("-"))
    rng = random.Random(0)
    return [rng.randint(low, high) for _ in range(int(rows))]


def sweep_case(
    kv: str, shape: str, copy_bytes_per_s: float, splits: list[int] | None = None
) -> list[dict[str, Any]]:
    """Every tuning (see `tunings`) on one decode step of `shape`."""
    kv_dtype = KV_DTYPES[kv]
    lengths = row_lengths(shape)
    batch = len(lengths)
    step = make_step([n - 1 for n in lengths], [1] * batch, 256, batch, kv_dtype)
    step.k = step.v = None  # type: ignore[assignment]  # the cache is already filled
    kv_bytes = 2 * sum(lengths) * NUM_KV_HEADS * HEAD_DIM * kv_dtype.itemsize
    rows, default_out, plain_ctx = [], None, step.ctx
    for tuning in tunings(splits):
        backend = TritonAttention(decode=tuning)
        # The row order is sorted once per step in the engine, not in every layer's replay.
        step.ctx = dataclasses.replace(plain_ctx, attn_backend=backend).with_attn_metadata()
        us = median_ms(captured(run_backend(backend, step)).replay) * 1e3
        out = step.out.float().clone()
        default_out = out if default_out is None else default_out
        rows.append(
            {
                "kv_cache": kv,
                "shape": shape,
                "batch": batch,
                "context": sum(lengths) / batch,
                "tile": [tuning.block_n, tuning.num_warps, tuning.num_stages],
                "longest_first": tuning.longest_first,
                "splits": backend.decode_splits(batch, NUM_KV_HEADS, step.q.device),
                "us": us,
                "copy_fraction": kv_bytes / (us * 1e-6) / copy_bytes_per_s,
                "max_diff_vs_default": (out - default_out).abs().max().item(),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kv-cache-dtypes", default="fp8,bf16", help="fp8 and/or bf16")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="ROWSxKEYS,... decode steps")
    parser.add_argument("--splits", default=None, help="sweep these split counts (e.g. 1,2,4) "
                        "instead of tiles")  # fmt: skip
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    copy = copy_bandwidth()
    results: list[dict[str, Any]] = []
    for kv in args.kv_cache_dtypes.split(","):
        for shape in args.shapes.split(","):
            splits = [int(n) for n in args.splits.split(",")] if args.splits else None
            rows = sweep_case(kv, shape, copy, splits)
            results += rows
            best = min(rows, key=lambda r: r["us"])
            print(
                f"{kv} {shape}: default {rows[0]['us']:.1f} us (tile {rows[0]['tile']}, "
                f"{rows[0]['copy_fraction']:.0%} of copy), row order {rows[1]['us']:.1f} us, "
                f"best {best['us']:.1f} us (tile {best['tile']}, splits {best['splits']}, "
                f"{best['copy_fraction']:.0%} of copy), "
                f"max diff {max(r['max_diff_vs_default'] for r in rows):.2g}"
            )
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"copy_GB_per_s": copy / 1e9, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
