"""`asyncllm bench soak`: a shortened soak passes on the embedded model, and the checker
fails when a violation is planted (so a passing soak means something)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter

import pytest

from asyncllm.bench import add_bench_parser
from asyncllm.bench.soak import INJECTIONS, SoakOptions, run_soak
from asyncllm.bench.soak_checks import Outcome, check_outcome, find_divergence
from asyncllm.bench.soak_workload import (
    CANCEL_FORMS,
    READ_WAYS,
    WorkloadShape,
    build_workload,
)
from asyncllm.errors import ConfigError
from asyncllm.sampling import SamplingParams

# Small enough for CI (2 cores), tight enough that requests are preempted and prefilled in
# chunks: 12 blocks of 16 tokens hold only a few requests at a time.
SHORT = SoakOptions(
    requests=300,
    device="cpu",
    max_prompt_len=48,
    max_new_tokens=12,
    pool_prompts=8,
    num_kv_blocks=12,
    max_num_seqs=16,
    max_num_batched_tokens=32,
    arrival_rate=400.0,
    progress=False,
)


def test_short_soak_passes_every_check() -> None:
    report = run_soak(SHORT)
    assert report.ok, report.table()
    summary = report.summary
    assert summary["requests submitted"] == 300
    ended = summary["finished (stop)"] + summary["finished (length)"] + summary["aborted"]
    assert ended == 300 and summary["errored"] == 0
    # The workload really went through what the soak claims to exercise. (A timeout may
    # outlast its request on a fast machine, so only the other forms must have aborted.)
    forms = summary["cancel forms (asked/aborted)"]
    assert all(asked > 0 for asked, _ in forms.values())
    assert all(aborted > 0 for form, (_, aborted) in forms.items() if form != "timeout")
    assert summary["from other threads"] > 0
    assert summary["preemptions"] > 0
    assert summary["prefix cache hit rate"] > 0.05
    assert summary["prefix cache resets"] > 0
    checked, finished_greedy = summary["greedy finished checked/all"]
    assert checked >= 40 and checked <= finished_greedy
    assert summary["seeded finished checked"] > 10
    assert summary["cancelled prefixes checked"] > 0


def test_planted_violations_are_each_reported() -> None:
    options = SoakOptions(
        requests=24,
        device="cpu",
        max_prompt_len=32,
        max_new_tokens=6,
        pool_prompts=4,
        pool_fraction=1.0,
        cancel_fraction=0.2,
        num_kv_blocks=12,
        max_num_seqs=8,
        max_num_batched_tokens=16,
        progress=False,
        inject=INJECTIONS,
    )
    report = run_soak(options)
    assert not report.ok
    tags = Counter(v.split("]")[0] + "]" for v in report.violations)
    # leak-block, wrong-token, leak-task, leak-thread, lost-request, in that order:
    for tag in ("[blocks]", "[greedy]", "[tasks]", "[threads]", "[accounting]"):
        assert tags[tag] >= 1, report.violations
    assert "FAIL" in report.table()


def test_cli_exits_non_zero_and_lists_the_violation() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "asyncllm",
            "bench",
            "soak",
            "--requests",
            "12",
            "--device",
            "cpu",
            "--max-prompt-len",
            "16",
            "--max-new-tokens",
            "4",
            "--pool-prompts",
            "4",
            "--num-kv-blocks",
            "8",
            "--no-progress",
            "--inject",
            "leak-block",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "FAIL" in done.stdout and "[blocks]" in done.stdout
    assert "requests submitted" in done.stdout


def test_every_soak_option_is_explained_in_help() -> None:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    bench = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    kinds = next(
        a for a in bench.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction)
    )
    soak = kinds.choices["soak"]
    options = [a for a in soak._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 20
    assert all(a.help and len(a.help) > 10 for a in options), [a.dest for a in options]


def test_bad_options_are_refused_naming_the_option() -> None:
    with pytest.raises(ConfigError, match="cancel_fraction"):
        SoakOptions(cancel_fraction=1.5)
    with pytest.raises(ConfigError, match="num_kv_blocks"):
        SoakOptions(max_prompt_len=500, num_kv_blocks=4)
    with pytest.raises(ConfigError, match="injection"):
        SoakOptions(inject=("nothing",))


def test_workload_is_reproducible_and_covers_every_way() -> None:
    shape = WorkloadShape(
        num_requests=600,
        seed=3,
        vocab_size=1024,
        cancel_fraction=0.3,
        arrival_rate=100.0,
        max_prompt_len=64,
        max_new_tokens=16,
        pool_prompts=12,
        pool_fraction=0.6,
        reset_probability=0.01,
    )
    jobs = build_workload(shape)
    assert jobs == build_workload(shape)
    assert {job.way for job in jobs} == set(CANCEL_FORMS) | set(READ_WAYS)
    assert 0.2 < sum(job.cancels for job in jobs) / len(jobs) < 0.4
    keyed = [job for job in jobs if job.key is not None]
    assert len({job.key for job in keyed}) < len(keyed) / 3  # keys repeat: one run checks many
    arrivals = [job.arrival_s for job in jobs]
    assert arrivals == sorted(arrivals) and arrivals[-1] > 0


def _job(params: SamplingParams, way: str = "read"):  # type: ignore[no-untyped-def]
    shape = WorkloadShape(1, 0, 1024, 0.0, 0.0, 8, 8, 4, 1.0, 0.0)
    return build_workload(shape)[0]._replace(params=params, way=way)


def test_a_finished_request_must_equal_its_isolated_run_a_cancelled_one_a_prefix() -> None:
    job = _job(SamplingParams(temperature=0, max_tokens=5))
    truth = [5, 6, 7, 8, 9]
    assert find_divergence(job, Outcome(0, [5, 6, 7, 8, 9], "length"), truth) is None
    assert find_divergence(job, Outcome(0, [5, 6], "abort"), truth) is None
    assert find_divergence(job, Outcome(0, [5, 6], "stop"), truth) is not None
    divergence = find_divergence(job, Outcome(0, [5, 4], "abort"), truth)
    assert divergence is not None and divergence[1:] == (1, 4, 6)


def test_outcome_checks_catch_broken_stop_rules_and_reads() -> None:
    job = _job(SamplingParams(temperature=0, max_tokens=3, stop=("x",)))
    assert check_outcome(job, Outcome(0, [1, 2, 3], "length", streamed_text="abc"), 1024) == []
    assert any(
        "[limits]" in p
        for p in check_outcome(job, Outcome(0, [1, 2, 3], "length", streamed_text="axc"), 1024)
    )
    assert any(
        "[limits]" in p
        for p in check_outcome(job, Outcome(0, [1, 2], "length", streamed_text="ab"), 1024)
    )
    assert any("[ending]" in p for p in check_outcome(job, Outcome(0, [1], "abort"), 1024))
    assert any(
        "[error]" in p
        for p in check_outcome(job, Outcome(0, [], None, error="EngineError()"), 1024)
    )
