"""`asyncllm bench throughput --trace`: the events it records and `summarize` of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from asyncllm.bench.trace import summarize
from asyncllm.cli import main
from tests.models import write_random_model


def _step(at: float, requests: int, tokens: int, stream_ms: float | None,
          num_steps: int = 1) -> list[list[Any]]:  # fmt: skip
    """The events of one step scheduled at `at`: schedule, launch (1 ms), collect."""
    return [["schedule", at, at + 0.001, [requests, tokens, num_steps]],
            ["launch", at + 0.002, at + 0.003, None],
            ["collect", at + 0.004, at + 0.005, stream_ms]]  # fmt: skip


def test_steps_group_by_kind_within_their_run():
    events = [
        *_step(1.0, 3, 30, 4.0),  # prefill
        *_step(1.1, 3, 3, 2.0),  # decode of 3
        ["schedule", 1.15, 1.16, None],  # nothing scheduled: not a step
        *_step(1.2, 200, 200, 5.0, num_steps=4),  # 4 decode steps of 200
        ["run", 0.9, 1.9, "offline"],
        *_step(2.0, 40, 40, 1.0),
        ["run", 1.95, 2.95, "streams"],
    ]
    offline, streams = summarize(events).values()
    assert offline["launches"] == 3 and streams["launches"] == 1
    assert list(offline["kinds"]) == ["prefill", "decode <= 8", "decode > 128"]
    assert offline["kinds"]["decode > 128"] == pytest.approx(
        {"launches": 1, "steps": 4, "tokens": 800, "stream_ms": 5.0, "launch_ms": 1.0}
    )
    assert offline["kinds"]["prefill"]["tokens"] == 30
    assert offline["stream_s"] == pytest.approx(0.011)
    assert offline["stream_busy"] == pytest.approx(0.011 / 1.0)
    assert offline["host_s"]["launch"] == pytest.approx(0.003)
    assert offline["host_s"]["schedule"] == pytest.approx(0.013)  # empty schedules count
    assert list(streams["kinds"]) == ["decode <= 128"]


def test_a_cpu_run_has_no_stream_time_but_keeps_its_launches():
    offline = summarize([*_step(1.0, 2, 2, None), ["run", 0.5, 1.5, "offline"]])["offline"]
    assert offline["stream_s"] == 0.0 and offline["stream_busy"] == 0.0
    assert offline["kinds"]["decode <= 8"]["launch_ms"] == pytest.approx(1.0)


def test_a_traced_run_writes_its_events_and_summarises_both_runs(tmp_path: Path):
    write_random_model(tmp_path / "model")
    out, trace = tmp_path / "throughput.json", tmp_path / "trace.json"
    code = main(["bench", "throughput", "--model", str(tmp_path / "model"), "--num-requests", "3",
                 "--prompt-len", "4", "12", "--output-len", "2", "6", "--peers", "none",
                 "--trace", str(trace), "--out", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    events = json.loads(trace.read_text())
    assert {e[0] for e in events} >= {"run", "schedule", "prepare", "launch", "collect"}
    assert "trace" not in result  # the events go to their own file
    summary = result["trace_summary"]
    assert summary == summarize(events)
    for run in ("offline", "streams"):
        # Every prompt token and every drawn token but each request's last is computed once.
        tokens = sum(kind["tokens"] for kind in summary[run]["kinds"].values())
        assert tokens == result["prompt_tokens"] + result["output_tokens"] - result["requests"]
        assert summary[run]["kinds"]["prefill"]["launches"] >= 1
        assert 0 < summary[run]["wall_s"] <= result[f"{run}_s"] + 0.05
