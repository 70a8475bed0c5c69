"""The nano-vllm workload on Qwen3-0.6B's shape: asyncllm (offline and 256 streams) against
its peers (nano-vllm, transformers; each in its own process) and the workload's floor, in one
run, with event-loop lag. Meant for a CUDA GPU.

    python benchmarks/throughput.py --peers nano-vllm,transformers --out throughput.json

Same as `asyncllm bench throughput`; see asyncllm/bench/throughput.py for the workload.
"""

from asyncllm.cli import main

if __name__ == "__main__":
    import sys

    raise SystemExit(main(["bench", "throughput", *sys.argv[1:]]))
