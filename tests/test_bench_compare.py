"""`benchmarks/compare.py`: interleaved A/B runs of `asyncllm bench throughput`."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

import asyncllm

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(asyncllm.__file__).resolve().parents[1]
TINY_MODEL = Path(asyncllm.__file__).resolve().parent / "assets" / "tiny-qwen3"


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = module
    spec.loader.exec_module(module)
    return module


def test_a_variant_names_its_source_and_options(compare: ModuleType) -> None:
    variant = compare.parse_variant(f"fp8={SRC}:--kv-cache-dtype fp8 --block-size 16")
    assert variant.name == "fp8"
    assert variant.src == SRC
    assert variant.options == ["--kv-cache-dtype", "fp8", "--block-size", "16"]
    assert compare.parse_variant(f"plain={SRC}").options == []


@pytest.mark.parametrize("text", ["no-equals-sign", f"={SRC}", "x=/nonexistent/src"])
def test_a_malformed_variant_is_refused(compare: ModuleType, text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        compare.parse_variant(text)


def test_one_variant_is_refused(compare: ModuleType) -> None:
    with pytest.raises(SystemExit):
        compare.main(["--variant", f"a={SRC}"])


@pytest.mark.slow
def test_rounds_alternate_the_order_and_keep_every_run(
    compare: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "compare.json"
    common = (
        f"--model {TINY_MODEL} --peers none --num-requests 3 --prompt-len 4 8 "
        "--output-len 2 4 --block-size 16"
    )
    code = compare.main([
        "--rounds", "2", "--common", common, "--work-dir", str(tmp_path),
        "--variant", f"a={SRC}", "--variant", f"b={SRC}:--max-num-batched-tokens 512",
        "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["round"], r["variant"]) for r in runs] == [(1, "a"), (1, "b"), (2, "b"), (2, "a")]
    assert all(r["offline_tok_per_s"] > 0 and r["streams_tok_per_s"] > 0 for r in runs)
    assert runs[1]["options"] == ["--max-num-batched-tokens", "512"]
    table = capsys.readouterr().out
    assert "| median | a |" in table and "| median | b |" in table
