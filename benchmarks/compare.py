"""Interleaved A/B runs of `asyncllm bench throughput` on one machine, in one lease.

Each variant is a name, the `src/` folder to import asyncllm from (another commit's, e.g. one
`git archive` wrote into a carried folder) and the bench options that differ. Rounds run every
variant in turn, alternating the order (A B, B A, ...), so a drift of the machine over the
lease does not favour one side. All results go into one JSON, and a table goes to stdout.

    git archive fa4254d src | tar -x -C .before   # here; carry .before
    python benchmarks/compare.py --rounds 2 --common "--block-size 256 --peers none" \\
        --variant "before=.before/src:--kv-cache-dtype fp8" \\
        --variant "after=src:--kv-cache-dtype fp8" --out compare.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

KEPT = ("offline_tok_per_s", "streams_tok_per_s", "floor_tok_per_s", "attention_backend",
        "kv_cache_dtype", "step_seconds", "loop_lag", "peers", "device")  # fmt: skip


class Variant(NamedTuple):
    """One side of the comparison."""

    name: str
    src: Path
    options: list[str]


def parse_variant(text: str) -> Variant:
    """NAME=SRC[:OPTIONS], e.g. `before=.before/src:--kv-cache-dtype fp8`."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant wants NAME=SRC[:OPTIONS], got {text!r}")
    src, _, options = rest.partition(":")
    if not (Path(src) / "asyncllm").is_dir():
        raise argparse.ArgumentTypeError(f"--variant {name}: no asyncllm package in {src!r}")
    return Variant(name, Path(src).resolve(), shlex.split(options))


def run_once(variant: Variant, common: list[str], work_dir: str) -> dict[str, Any]:
    """One bench run of `variant` in a fresh interpreter; the JSON fields in `KEPT`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(variant.src), env.get("PYTHONPATH", "")) if p
        )
        command = [sys.executable, "-m", "asyncllm", "bench", "throughput", *common,
                   *variant.options, "--work-dir", work_dir, "--out", str(out)]  # fmt: skip
        print("$", shlex.join(command), f"(asyncllm from {variant.src})", flush=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            return {"error": f"exit {done.returncode}", "stderr": done.stderr[-2000:]}
        result = json.loads(out.read_text())
    return {key: result[key] for key in KEPT if key in result}


def table(runs: list[dict[str, Any]]) -> str:
    """Each run's offline and streams tok/s, then each variant's median."""
    lines = ["| round | variant | offline tok/s | streams tok/s |", "| --- | --- | ---: | ---: |"]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_name.setdefault(run["variant"], []).append(run)
        offline, streams = run.get("offline_tok_per_s"), run.get("streams_tok_per_s")
        cells = [f"{v:,.0f}" if v else run.get("error", "-") for v in (offline, streams)]
        lines.append(f"| {run['round']} | {run['variant']} | {cells[0]} | {cells[1]} |")
    for name, rows in by_name.items():
        medians = [
            statistics.median([r[key] for r in rows if key in r] or [0.0])
            for key in ("offline_tok_per_s", "streams_tok_per_s")
        ]
        lines.append(f"| median | {name} | {medians[0]:,.0f} | {medians[1]:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", type=parse_variant, action="append", required=True,
                        help="NAME=SRC[:OPTIONS] (repeat; two or more)")  # fmt: skip
    parser.add_argument("--common", default="", help="bench options every variant gets")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default: 2)")
    parser.add_argument("--work-dir", default="/tmp/asyncllm-bench",
                        help="random model folder (default: %(default)s)")  # fmt: skip
    parser.add_argument("--out", default=None, help="write every run as JSON here")
    args = parser.parse_args(argv)
    if len(args.variant) < 2:
        parser.error("compare needs two --variant options or more")
    common = shlex.split(args.common)
    runs: list[dict[str, Any]] = []
    for round_index in range(args.rounds):
        order = args.variant if round_index % 2 == 0 else args.variant[::-1]
        for variant in order:
            run = run_once(variant, common, args.work_dir)
            runs.append({"round": round_index + 1, "variant": variant.name,
                         "options": variant.options, **run})  # fmt: skip
            if args.out:  # after every run, so a lease cut short keeps what it measured
                Path(args.out).write_text(json.dumps({"common": common, "runs": runs}, indent=2))
            print(f"round {round_index + 1} {variant.name}: offline "
                  f"{run.get('offline_tok_per_s', 0):,.0f}, streams "
                  f"{run.get('streams_tok_per_s', 0):,.0f} tok/s", flush=True)  # fmt: skip
    print(table(runs))
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
