"""The summary table of `scripts/gpu_flash.sh`: tests, throughput against the goals, kernels.

    python3 scripts/gpu_flash_summary.py OUT_DIR

Reads what the script left in OUT_DIR (tests.xml, throughput-*.json, nanovllm.json,
attention-backends.json, steps.txt); anything missing is reported as missing.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

GOAL_VS_TRITON = 0.90
"""flash-attn's throughput must be within 10 % of Triton's at the same block size."""


def load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"missing": f"{path.name}: {exc.__class__.__name__}"}


def tests_line(out: Path) -> list[str]:
    try:
        root = ET.parse(out / "tests.xml").getroot()
    except (OSError, ET.ParseError) as exc:
        return [f"tests: no tests.xml ({exc.__class__.__name__})"]
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    lines = [
        f"tests: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped"
    ]
    for case in suite.iter("testcase"):
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                message = (node.get("message") or "").strip().split("\n")[0][:110]
                lines.append(f"  {kind.upper():8} {case.get('name')}: {message}")
    return lines


def throughput_lines(out: Path) -> tuple[list[str], dict[str, float]]:
    rows = [f"{'engine / backend':<24} {'graphs':>6} {'offline tok/s':>13} "
            f"{'streams tok/s':>13} {'launch s':>8}"]  # fmt: skip
    offline: dict[str, float] = {}
    for backend in ("flash_attn", "triton"):
        result = load(out / f"throughput-{backend}.json")
        if "missing" in result:
            rows.append(f"asyncllm {backend:<15} {result['missing']}")
            continue
        chosen = result.get("attention_backend")
        label = backend if chosen == backend else f"{backend}!={chosen}"
        offline[backend] = result["offline_tok_per_s"]
        launch = result.get("step_seconds", {}).get("launch", float("nan"))
        rows.append(
            f"asyncllm {label:<15} {result.get('cuda_graphs')!s:>6} "
            f"{result['offline_tok_per_s']:>13,.0f} {result['streams_tok_per_s']:>13,.0f} "
            f"{launch:>8.1f}"
        )
    nano = load(out / "nanovllm.json")
    if "tok_per_s" not in nano:
        why = nano.get("missing") or nano.get("skipped") or nano.get("error")
        rows.append(f"{'nano-vllm':<24} {why}")
    else:
        offline["nano-vllm"] = nano["tok_per_s"]
        rows.append(f"{'nano-vllm':<24} {'True':>6} {nano['tok_per_s']:>13,.0f}")
    return rows, offline


def goal_lines(offline: dict[str, float]) -> list[str]:
    flash = offline.get("flash_attn")
    if flash is None:
        return ["goals: no flash_attn throughput"]
    lines = []
    if "nano-vllm" in offline:
        ratio = flash / offline["nano-vllm"]
        verdict = "MET" if ratio >= 1.0 else "MISSED"
        lines.append(f"goal flash_attn >= nano-vllm: {verdict} ({ratio:.2f}x)")
    if "triton" in offline:
        ratio = flash / offline["triton"]
        verdict = "MET" if ratio >= GOAL_VS_TRITON else "MISSED"
        lines.append(f"goal flash_attn >= 90% of triton: {verdict} ({100 * ratio:.1f}%)")
        fastest = "flash_attn" if flash > offline["triton"] else "triton"
        lines.append(
            f"auto rule: _MEASURED_FASTEST[(256, 128)] should name {fastest!r} "
            f"(src/asyncllm/kernels/__init__.py)"
        )
    return lines


def kernel_lines(out: Path) -> list[str]:
    result = load(out / "attention-backends.json")
    if "missing" in result:
        return [f"kernels: {result['missing']}"]
    lines = [f"kernels (copy {result['copy_GB/s']:,.0f} GB/s):"]
    for row in result["results"]:
        if row["kind"] == "decode":
            lines.append(
                f"  decode {row['batch']:>3} x {row['context']:<5} {row['backend']:<10} "
                f"graph {row['graph_ms']:.3f} ms  {100 * row['copy_fraction']:.1f}% of copy"
            )
        else:
            lines.append(
                f"  prefill {row['batch']} x {row['new']} after {row['prefix']:<4} "
                f"{row['backend']:<10} {row['ms']:.3f} ms  {row['TFLOP/s']:.0f} TFLOP/s"
            )
    return lines


def main() -> None:
    out = Path(sys.argv[1])
    steps = (out / "steps.txt").read_text().split("\n") if (out / "steps.txt").exists() else []
    rows, offline = throughput_lines(out)
    lines = ["", "=" * 30 + " flash-attn on the GPU: summary " + "=" * 30]
    lines += ["steps: " + "; ".join(s for s in steps if s)]
    lines += tests_line(out)
    lines += ["nano-vllm workload, block 256 (asyncllm: --skip-transformers):", *rows]
    lines += goal_lines(offline)
    lines += kernel_lines(out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
