"""nano-vllm alone on the workload of `asyncllm bench throughput`, for a number side by side.

The same peer run as `asyncllm bench throughput --peers nano-vllm` (asyncllm.bench.peers),
without asyncllm's own runs: the project's `workload()` (same prompts, output lengths and
temperature), in a process of its own, timed after a short warm-up. It needs CUDA,
flash-attn and nano-vllm's source (../shared/peers/nano-vllm, carried as .peers/nano-vllm),
and a checkpoint directory with a tokenizer: the random Qwen3-0.6B-shaped one
`asyncllm bench throughput --work-dir DIR` writes works.

Usage:
    PYTHONPATH=src python3 benchmarks/nanovllm_peer.py --nano-vllm-path .peers/nano-vllm \
        --model /tmp/asyncllm-bench/asyncllm-qwen3-0.6b-random --out nanovllm.json

Exits 1 when the peer was skipped or failed (the JSON says why).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from asyncllm.bench.peers import PeerOptions, PeerWorkload, default_nano_vllm_path, run_peer
from asyncllm.bench.throughput import workload


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--nano-vllm-path", type=Path, default=None,
                        help="folder holding the nanovllm package (default: $NANO_VLLM_PATH, "
                             "else .peers/nano-vllm)")  # fmt: skip
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()

    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    prompts, outputs = workload(args.num_requests, args.seed, (100, 1024), (100, 1024), vocab)
    spec = PeerWorkload(model_dir=args.model, prompts=prompts, output_lens=outputs,
                        temperature=args.temperature, device="cuda", dtype="bfloat16")  # fmt: skip
    options = PeerOptions(nano_vllm_path=args.nano_vllm_path or default_nano_vllm_path())
    measured = run_peer("nano-vllm", spec, options)
    result = {"engine": "nano-vllm", "requests": len(prompts), **measured}
    print(json.dumps(result, indent=2), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if "tok_per_s" in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
