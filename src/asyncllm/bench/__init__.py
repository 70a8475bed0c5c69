"""Benchmarks behind `asyncllm bench ...` (throughput, decode, scheduler, loop lag, soak,
tensor parallelism, serving)."""

from __future__ import annotations

import argparse

__all__ = ["add_bench_parser"]


def add_bench_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `asyncllm bench <name>` subcommands."""
    bench = sub.add_parser("bench", help="run a benchmark")
    kinds = bench.add_subparsers(dest="bench", required=True)
    from asyncllm.bench import (
        decode,
        loop_lag,
        scheduler_overhead,
        serve,
        soak,
        tensor_parallel,
        throughput,
    )

    scheduler_overhead.add_parser(kinds)
    throughput.add_parser(kinds)
    decode.add_parser(kinds)
    loop_lag.add_parser(kinds)
    soak.add_parser(kinds)
    tensor_parallel.add_parser(kinds)
    serve.add_parser(kinds)
