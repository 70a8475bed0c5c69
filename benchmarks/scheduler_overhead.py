"""CPU time of one scheduler + block-manager step with 256 running sequences (stub model).

    python benchmarks/scheduler_overhead.py [--engine-loop]

Same as `asyncllm bench scheduler`; see asyncllm/bench/scheduler_overhead.py for what is
measured. Target: <= 1 ms per step (median).
"""

from asyncllm.cli import main

if __name__ == "__main__":
    import sys

    raise SystemExit(main(["bench", "scheduler", *sys.argv[1:]]))
