"""Fused Triton MoE MLP vs the per-expert torch loop, side by side on one GPU.

Shape defaults to one Qwen3-30B-A3B MoE layer (hidden 2048, 128 experts of 768, top-8), bf16.

    python benchmarks/moe.py --out moe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from asyncllm.kernels.moe import moe_reference
from asyncllm.kernels.triton_moe import fused_moe


def _measure(
    batch: int, args: argparse.Namespace, w13: torch.Tensor, w2: torch.Tensor
) -> dict[str, float]:
    x = torch.randn(batch, args.hidden, device="cuda").to(w13.dtype)
    router = torch.randn(batch, args.experts, device="cuda").softmax(-1)
    weights, ids = torch.topk(router, args.top_k)
    fused_ms = triton.testing.do_bench(
        lambda: fused_moe(x, w13, w2, weights, ids), return_mode="median"
    )
    loop_ms = triton.testing.do_bench(
        lambda: moe_reference(x, w13, w2, weights, ids), return_mode="median"
    )
    truth = moe_reference(x.float(), w13.float(), w2.float(), weights, ids)
    err = ((fused_moe(x, w13, w2, weights, ids).float() - truth).norm() / truth.norm()).item()
    print(
        f"batch {batch:4d}: fused {fused_ms:.3f} ms  per-expert loop {loop_ms:.3f} ms  "
        f"-> {loop_ms / fused_ms:.1f}x  (rel err {err:.1e})",
        flush=True,
    )
    return {
        "batch": batch,
        "fused_ms": fused_ms,
        "loop_ms": loop_ms,
        "speedup": loop_ms / fused_ms,
        "rel_err": err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768, help="moe_intermediate_size")
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--batches", default="1,16,64,256,512")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype, dev = torch.bfloat16, "cuda"
    w13 = (torch.randn(args.experts, 2 * args.inter, args.hidden, device=dev) * 0.02).to(dtype)
    w2 = (torch.randn(args.experts, args.hidden, args.inter, device=dev) * 0.02).to(dtype)
    rows = [_measure(batch, args, w13, w2) for batch in map(int, args.batches.split(","))]
    if args.out:
        args.out.write_text(
            json.dumps({"shape": vars(args) | {"out": None}, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
