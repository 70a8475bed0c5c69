"""`asyncllm bench throughput`: its peers, its floor and the JSON it writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from asyncllm.bench.floor import (
    decode_context_tokens,
    prefill_flops,
    weight_bytes_per_step,
    workload_floor,
)
from asyncllm.bench.model import SHAPES
from asyncllm.bench.peers import (
    PeerOptions,
    PeerWorkload,
    parse_peers,
    run_peer,
    unavailable_reason,
)
from asyncllm.bench.peers.__main__ import main as peer_main
from asyncllm.bench.throughput import workload
from asyncllm.cli import main
from asyncllm.errors import ConfigError
from tests.models import write_random_model

# ---- the floor ---------------------------------------------------------------------------

# A made-up shape small enough to count by hand: 2 layers, hidden 8, 2 query heads and 1 KV
# head of 4 dims, MLP 16, vocab 32, tied embeddings.
TINY_SHAPE: dict[str, Any] = {
    **SHAPES["qwen3-0.6b"],
    "vocab_size": 32,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "eos_token_id": 0,
}
PROMPTS, OUTPUTS = [3, 5], [2, 4]


def test_decode_steps_attend_over_the_prompt_and_the_tokens_before():
    # Request 1 (3 + 2): its one decode step attends over 4 tokens. Request 2 (5 + 4): its
    # three decode steps over 6, 7 and 8.
    assert decode_context_tokens(PROMPTS, OUTPUTS) == 4 + (6 + 7 + 8)


def test_a_step_reads_every_weight_once_and_the_embedding_as_the_tied_head():
    layer_matrices = 8 * 8 + 4 * 8 + 4 * 8 + 8 * 8 + 3 * 16 * 8  # q, k, v, o, MLP
    layer_norms = 8 + 8 + 4 + 4  # input, post-attention, q, k
    params = 2 * (layer_matrices + layer_norms) + 8 + 32 * 8  # final norm, tied LM head
    assert weight_bytes_per_step(TINY_SHAPE, dtype_bytes=2) == 2 * params


def test_prefill_counts_matrices_per_token_causal_attention_and_one_head_row_per_prompt():
    matrices = 2 * 2 * (8 * 8 + 4 * 8 + 4 * 8 + 8 * 8 + 3 * 16 * 8) * (3 + 5)
    attention = 4 * 2 * 2 * 4 * (3 * 4 // 2 + 5 * 6 // 2)  # layers, heads, dims, causal pairs
    lm_head = 2 * 32 * 8 * 2
    assert prefill_flops(TINY_SHAPE, PROMPTS) == matrices + attention + lm_head


def test_floor_is_bytes_over_copy_bandwidth_plus_prefill_over_matmul_rate():
    floor = workload_floor(TINY_SHAPE, PROMPTS, OUTPUTS, dtype_bytes=2, max_batched_tokens=4,
                           copy_bytes_per_s=1000.0, matmul_flop_per_s=10000.0)  # fmt: skip
    kv_bytes = 2 * 1 * 4 * 2 * 2 * 25  # layers, KV heads, dims, K and V, bf16, context tokens
    assert floor.kv_read_bytes == kv_bytes
    assert floor.steps == 4 + 2  # the longest request's 4 steps after 8 / 4 prefill chunks
    expected_s = (kv_bytes + 6 * floor.weight_bytes_per_step) / 1000.0 + (
        floor.prefill_flops / 10000.0
    )
    assert floor.seconds == pytest.approx(expected_s)
    assert floor.tok_per_s == pytest.approx(6 / expected_s)


def test_floor_of_the_nano_vllm_workload_on_an_h200():
    """../shared/GPU_MACHINE.md's arithmetic (4.25 TB/s, ~700 TFLOP/s), on the exact seed-0
    workload: 14.0 TB of K/V (that note's 14.9 TB took the mean lengths of U[100, 1024],
    562, where this workload's are 543), 1.19 GB of weights a step over 1,041 steps."""
    prompts, outputs = workload(256, 0, (100, 1024), (100, 1024), 151936)
    floor = workload_floor(SHAPES["qwen3-0.6b"], [len(p) for p in prompts], outputs,
                           dtype_bytes=2, max_batched_tokens=8192, copy_bytes_per_s=4.25e12,
                           matmul_flop_per_s=7e14)  # fmt: skip
    assert floor.kv_read_bytes / 1e12 == pytest.approx(14.0, abs=0.05)
    assert floor.weight_bytes_per_step / 1e9 == pytest.approx(1.19, abs=0.005)
    assert floor.steps == 1041
    assert floor.seconds == pytest.approx(3.78, abs=0.01)
    assert floor.tok_per_s == pytest.approx(36_750, rel=0.002)


def test_floor_rejects_a_workload_without_one_length_per_prompt():
    with pytest.raises(ConfigError, match="one output length per prompt"):
        workload_floor(TINY_SHAPE, [3, 5], [2], dtype_bytes=2, max_batched_tokens=4,
                       copy_bytes_per_s=1.0, matmul_flop_per_s=1.0)  # fmt: skip


# ---- choosing and skipping peers ---------------------------------------------------------


def test_peers_parse_in_a_fixed_order_and_none_means_no_peer():
    assert parse_peers("transformers,nano-vllm") == ("nano-vllm", "transformers")
    assert parse_peers("none") == ()


def test_an_unknown_peer_is_a_config_error_that_names_it():
    with pytest.raises(ConfigError, match="vllm-classic"):
        parse_peers("transformers,vllm-classic")


def _cpu_workload(model_dir: Path | str = "/nonexistent") -> PeerWorkload:
    return PeerWorkload(model_dir=str(model_dir), prompts=[[1, 2, 3], [4, 5, 6, 7, 8]],
                        output_lens=[2, 4], temperature=0.6, device="cpu",
                        dtype="float32")  # fmt: skip


def test_a_peer_workload_needs_one_output_length_per_prompt():
    with pytest.raises(ConfigError, match="2 prompts and 1 output lengths"):
        PeerWorkload(model_dir="m", prompts=[[1], [2]], output_lens=[3], temperature=0.6,
                     device="cpu", dtype="float32")  # fmt: skip


def test_nano_vllm_is_skipped_on_a_cpu_without_starting_a_process():
    result = run_peer("nano-vllm", _cpu_workload(), PeerOptions())
    assert result == {"skipped": "nano-vllm needs CUDA and flash-attn; this run is on cpu"}


def test_nano_vllm_without_its_source_is_skipped_with_where_it_looked(tmp_path: Path):
    cuda_run = PeerWorkload(**{**_cpu_workload().__dict__, "device": "cuda"})
    reason = unavailable_reason("nano-vllm", cuda_run, PeerOptions(nano_vllm_path=tmp_path))
    assert reason is not None
    assert str(tmp_path) in reason and "--nano-vllm-path" in reason


def test_a_peer_that_cannot_run_in_its_process_writes_why(tmp_path: Path):
    """The child side: a peer that finds no CUDA (or fails to import) records a skip."""
    spec, out = tmp_path / "workload.json", tmp_path / "result.json"
    _cpu_workload().write(spec)
    assert peer_main(["nano-vllm", str(spec), str(out)]) == 0
    assert json.loads(out.read_text()) == {"skipped": "nano-vllm needs CUDA; none is available"}


# ---- one whole run on a CPU: asyncllm, transformers in its own process, nano-vllm skipped --


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bench-throughput")
    write_random_model(tmp / "model")
    out = tmp / "throughput.json"
    code = main(["bench", "throughput", "--model", str(tmp / "model"), "--num-requests", "3",
                 "--prompt-len", "4", "12", "--output-len", "2", "6",
                 "--peers", "nano-vllm,transformers", "--out", str(out)])  # fmt: skip
    assert code == 0
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_the_json_keeps_asyncllm_s_own_numbers(bench_json: dict[str, Any]):
    assert bench_json["offline_tok_per_s"] > 0
    assert bench_json["streams_tok_per_s"] > 0
    assert {"p50_ms", "p99_ms", "max_ms"} <= bench_json["loop_lag"].keys()


def test_transformers_ran_in_its_process_on_the_same_lengths(bench_json: dict[str, Any]):
    peer = bench_json["peers"]["transformers"]
    assert peer["tok_per_s"] > 0 and peer["seconds"] > 0
    assert peer["output_tokens"] == bench_json["output_tokens"]
    assert bench_json["ratio_offline_vs_transformers"] == pytest.approx(
        bench_json["offline_tok_per_s"] / peer["tok_per_s"]
    )


def test_nano_vllm_is_listed_as_skipped_with_no_ratio(bench_json: dict[str, Any]):
    assert "CUDA" in bench_json["peers"]["nano-vllm"]["skipped"]
    assert "ratio_offline_vs_nano-vllm" not in bench_json


def test_the_floor_is_computed_from_rates_measured_in_the_run(bench_json: dict[str, Any]):
    floor = bench_json["floor"]
    assert floor["copy_bytes_per_s"] > 0 and floor["matmul_flop_per_s"] > 0
    assert floor["output_tokens"] == bench_json["output_tokens"]
    assert bench_json["floor_tok_per_s"] == pytest.approx(floor["output_tokens"] / floor["seconds"])
