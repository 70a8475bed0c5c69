"""nano-vllm on the workload of `asyncllm bench throughput`, for a number side by side.

nano-vllm (MIT; a copy lives in ../shared/peers/nano-vllm) is a peer to measure against, not a
dependency: put its folder on PYTHONPATH. It needs flash-attn and a checkpoint directory with
a tokenizer; the random Qwen3-0.6B-shaped one `asyncllm bench throughput --work-dir DIR`
writes works. Same prompts, output lengths and temperature as the asyncllm run (the
project's own `workload()`), timed after a short warm-up, like run (a) of the bench.

Usage:
    PYTHONPATH=src:.peers/nano-vllm python3 benchmarks/nanovllm_peer.py \
        --model /tmp/asyncllm-bench/asyncllm-qwen3-0.6b-random --out nanovllm.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from asyncllm.bench.throughput import workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()

    from nanovllm import LLM, SamplingParams

    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    prompts, outputs = workload(args.num_requests, args.seed, (100, 1024), (100, 1024), vocab)
    llm = LLM(args.model, enforce_eager=False, max_model_len=args.max_model_len)
    llm.generate(prompts[:16], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    params = [
        SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=n) for n in outputs
    ]
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = sum(len(o["token_ids"]) for o in outs)
    result = {
        "engine": "nano-vllm",
        "device": torch.cuda.get_device_name(),
        "requests": len(prompts),
        "output_tokens": generated,
        "expected_output_tokens": sum(outputs),
        "seconds": seconds,
        "tok_per_s": generated / seconds,
    }
    print(json.dumps(result, indent=2), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    # nano-vllm tears down its process group at exit; on this machine such a teardown has hung
    # before (../shared/GPU_MACHINE.md), and the result is already written.
    os._exit(0)


if __name__ == "__main__":
    main()
