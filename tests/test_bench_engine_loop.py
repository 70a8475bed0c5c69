"""`asyncllm bench scheduler --engine-loop` times the engine's own work per decode step
(spreading a multi-step launch over its steps) apart from the readers'."""

from __future__ import annotations

import pytest

from asyncllm.bench.scheduler_overhead import READER_MODES, measure_engine_loop
from asyncllm.errors import ConfigError


def test_a_multi_step_launch_is_counted_as_its_steps() -> None:
    result = measure_engine_loop(num_seqs=4, max_tokens=13, readers="none", num_decode_steps=4)
    # 4 prompts prefill in one step (drawing token 1), then 12 decode steps in runs of 4.
    assert result["steps"] == 13 and result["decode_steps"] == 12
    assert result["launches"] == 4
    engine = result["engine_cpu_ms_per_decode_step"]
    assert 0 < engine["median"] <= engine["p99"]
    assert set(result["phase_cpu_ms_per_decode_step"]) == {"schedule", "prepare", "launch",
                                                          "process"}  # fmt: skip


def test_an_unknown_reader_mode_is_refused() -> None:
    with pytest.raises(ConfigError, match="readers must be one of"):
        measure_engine_loop(num_seqs=2, max_tokens=2, readers="nobody")
    assert "stream" in READER_MODES
