"""Choosing the attention backend: "auto" by measurement, explicit names checked up front.

These run on the CPU: where a test needs a GPU's answers it patches the two checks that
need one (is flash_attn importable, does its kernel run this head size) or stands in a
runnable Triton; every other rule is the real one.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from asyncllm import AsyncEngine, EngineConfig
from asyncllm.config import ATTENTION_BACKEND_NAMES
from asyncllm.errors import ConfigError
from asyncllm.kernels import (
    ATTENTION_BACKENDS,
    AttentionBackend,
    choose_attention_backend,
    create_attention_backend,
)
from asyncllm.kernels import flash_attn as flash_module
from asyncllm.kernels.flash_attn import FlashAttention, flash_attn_import_error
from asyncllm.kernels.torch_ref import TorchAttention

CUDA = torch.device("cuda")
BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn


class RunnableTriton(TorchAttention):
    """Stands in for Triton on a machine without a GPU: runs anything (as on an H200)."""

    name = "triton"


@pytest.fixture
def gpu_machine(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Answers as on the H200 with the flash-attn wheel: Triton runs, flash_attn imports
    and its kernel runs every head size it is asked for."""
    backends: dict[str, type[AttentionBackend]] = {
        "torch": TorchAttention, "triton": RunnableTriton, "flash_attn": FlashAttention,
    }  # fmt: skip
    monkeypatch.setattr("asyncllm.kernels._load", backends.__getitem__)
    monkeypatch.setattr(flash_module, "flash_attn_import_error", lambda: None)
    monkeypatch.setattr(flash_module, "_kernel_error", lambda *args: None)
    return monkeypatch


def measured(monkeypatch: pytest.MonkeyPatch, table: dict[tuple[int, int], str]) -> None:
    """Replace the measurement table with `table` ((block_size, head_dim) -> fastest)."""
    rows = {shape: (name, "a test measurement") for shape, name in table.items()}
    monkeypatch.setattr("asyncllm.kernels._MEASURED_FASTEST", rows)


# ---- auto ----------------------------------------------------------------------------------


def test_auto_is_the_torch_reference_off_cuda() -> None:
    choice = choose_attention_backend("auto", torch.device("cpu"), 16, 64, torch.float32)
    assert choice.name == "torch"
    assert "cpu" in choice.reason


def test_auto_picks_each_recorded_measurement(gpu_machine: pytest.MonkeyPatch) -> None:
    from asyncllm.kernels import _MEASURED_FASTEST

    assert _MEASURED_FASTEST, "the rule must cite at least one measurement"
    for (block_size, head_dim), (fastest, evidence) in _MEASURED_FASTEST.items():
        choice = choose_attention_backend("auto", CUDA, block_size, head_dim, BF16)
        assert choice.name == fastest
        assert evidence in choice.reason and "docs/benchmarks.md" in choice.reason


def test_auto_follows_the_measurement_for_flash_attn(gpu_machine: pytest.MonkeyPatch) -> None:
    measured(gpu_machine, {(256, 128): "flash_attn"})
    choice = choose_attention_backend("auto", CUDA, 256, 128, BF16)
    assert choice.name == "flash_attn"
    assert "flash_attn measured fastest at block_size 256, head_dim 128" in choice.reason


def test_auto_follows_the_measurement_for_triton(gpu_machine: pytest.MonkeyPatch) -> None:
    measured(gpu_machine, {(256, 128): "triton"})
    assert choose_attention_backend("auto", CUDA, 256, 128, BF16).name == "triton"


def test_auto_takes_triton_where_nothing_was_measured(gpu_machine: pytest.MonkeyPatch) -> None:
    measured(gpu_machine, {(256, 128): "flash_attn"})
    choice = choose_attention_backend("auto", CUDA, 512, 128, BF16)
    assert choice.name == "triton"
    assert "no measurement at block_size 512, head_dim 128" in choice.reason


def test_auto_skips_flash_attn_in_float32(gpu_machine: pytest.MonkeyPatch) -> None:
    measured(gpu_machine, {(256, 128): "flash_attn"})
    choice = choose_attention_backend("auto", CUDA, 256, 128, torch.float32)
    assert choice.name == "triton"
    assert "skipped flash_attn" in choice.reason and "torch.float32" in choice.reason


def test_auto_skips_flash_attn_for_a_float8_cache(gpu_machine: pytest.MonkeyPatch) -> None:
    """Even where flash-attn measured fastest and runs, a float8 cache goes to Triton."""
    measured(gpu_machine, {(256, 128): "flash_attn"})
    assert choose_attention_backend("auto", CUDA, 256, 128, BF16).name == "flash_attn"
    choice = choose_attention_backend("auto", CUDA, 256, 128, BF16, kv_dtype=FP8)
    assert choice.name == "triton"
    assert "skipped flash_attn" in choice.reason and "compute dtype only" in choice.reason


def test_flash_attn_is_refused_for_a_float8_cache() -> None:
    with pytest.raises(ConfigError, match="reads a KV cache of the compute dtype only") as err:
        choose_attention_backend("flash_attn", CUDA, 256, 128, BF16, kv_dtype=FP8)
    assert "KV cache torch.float8_e4m3fn" in str(err.value)


def test_auto_skips_flash_attn_when_it_does_not_import(gpu_machine: pytest.MonkeyPatch) -> None:
    measured(gpu_machine, {(256, 128): "flash_attn"})
    gpu_machine.setattr(flash_module, "flash_attn_import_error", lambda: "no flash_attn here")
    choice = choose_attention_backend("auto", CUDA, 256, 128, BF16)
    assert choice.name == "triton"
    assert "no flash_attn here" in choice.reason


def test_auto_falls_back_to_flash_attn_without_triton(gpu_machine: pytest.MonkeyPatch) -> None:
    class BrokenTriton(RunnableTriton):
        @classmethod
        def unsupported_reason(cls, *args: object) -> str | None:
            return "compute capability 7.5"

    backends = {"torch": TorchAttention, "triton": BrokenTriton, "flash_attn": FlashAttention}
    gpu_machine.setattr("asyncllm.kernels._load", backends.__getitem__)
    choice = choose_attention_backend("auto", CUDA, 256, 128, BF16)
    assert choice.name == "flash_attn"
    assert "skipped triton (compute capability 7.5)" in choice.reason


def test_auto_logs_its_choice_and_reason(
    gpu_machine: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    measured(gpu_machine, {(256, 128): "triton"})
    with caplog.at_level(logging.INFO, logger="asyncllm.kernels"):
        backend = create_attention_backend("auto", CUDA, 256, 128, BF16)
    assert isinstance(backend, RunnableTriton)
    assert "attention backend: triton (auto: triton measured fastest" in caplog.text


# ---- explicit flash_attn -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block_size", "head_dim", "dtype", "device", "message"),
    [
        (256, 128, torch.float32, CUDA, "float16 or bfloat16, not torch.float32"),
        (16, 128, BF16, CUDA, "block_size a multiple of 256, got 16"),
        (128, 128, BF16, CUDA, "block_size a multiple of 256, got 128"),
        (256, 320, BF16, CUDA, "head_dim 320 is not supported"),
        (256, 100, BF16, CUDA, "head_dim 100 is not supported"),
        (256, 128, BF16, torch.device("cpu"), "needs a CUDA device"),
    ],
)
def test_flash_attn_refuses_what_it_cannot_serve(
    gpu_machine: pytest.MonkeyPatch, block_size: int, head_dim: int, dtype: torch.dtype,
    device: torch.device, message: str,
) -> None:  # fmt: skip
    with pytest.raises(ConfigError, match="attention_backend 'flash_attn' cannot serve") as err:
        choose_attention_backend("flash_attn", device, block_size, head_dim, dtype)
    assert message in str(err.value)


def test_flash_attn_lists_every_reason_at_once(gpu_machine: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as err:
        choose_attention_backend("flash_attn", CUDA, 16, 128, torch.float32)
    assert "torch.float32" in str(err.value) and "got 16" in str(err.value)


def test_flash_attn_refuses_a_head_dim_its_build_lacks(gpu_machine: pytest.MonkeyPatch) -> None:
    """The shared wheel compiles head_dim 128 only: the kernel probe's error is the reason."""
    probe_error = "this build of flash-attn cannot run head_dim 64: head_dim 128 only"
    gpu_machine.setattr(flash_module, "_kernel_error", lambda *args: probe_error)
    with pytest.raises(ConfigError, match="cannot run head_dim 64"):
        choose_attention_backend("flash_attn", CUDA, 256, 64, BF16)


def test_flash_attn_is_not_probed_when_a_static_check_fails(
    gpu_machine: pytest.MonkeyPatch,
) -> None:
    def probe(*args: object) -> str | None:
        raise AssertionError("the kernel probe needs a GPU and must not run")

    gpu_machine.setattr(flash_module, "_kernel_error", probe)
    with pytest.raises(ConfigError, match="got 16"):
        choose_attention_backend("flash_attn", CUDA, 16, 128, BF16)


def test_flash_attn_refuses_to_run_when_it_does_not_import(
    gpu_machine: pytest.MonkeyPatch,
) -> None:
    gpu_machine.setattr(flash_module, "flash_attn_import_error", lambda: "flash_attn is gone")
    with pytest.raises(ConfigError, match="flash_attn is gone"):
        choose_attention_backend("flash_attn", CUDA, 256, 128, BF16)


def test_a_failing_flash_attn_import_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` fail
    reason = flash_attn_import_error()
    assert reason is not None and reason.startswith("flash_attn is not importable (")
    assert "halted" in reason  # the import error itself is quoted


def test_flash_attn_that_can_run_is_chosen_as_asked(gpu_machine: pytest.MonkeyPatch) -> None:
    choice = choose_attention_backend("flash_attn", CUDA, 512, 128, torch.float16)
    assert choice.name == "flash_attn"
    assert "asked for" in choice.reason


def test_engine_on_cpu_refuses_flash_attn_with_its_reasons() -> None:
    engine = AsyncEngine.from_pretrained(None, device="cpu", attention_backend="flash_attn")
    with pytest.raises(ConfigError, match="flash_attn") as err:
        engine._core.load()
    assert "needs a CUDA device" in str(err.value)
    assert "float16 or bfloat16, not torch.float32" in str(err.value)


# ---- other names -------------------------------------------------------------------------


def test_triton_on_cpu_is_refused() -> None:
    # Without Triton installed the import fails; with it, the device check does.
    with pytest.raises(ConfigError, match="attention_backend 'triton' cannot"):
        choose_attention_backend("triton", torch.device("cpu"), 16, 64, torch.float32)


def test_config_names_match_the_registry() -> None:
    assert set(ATTENTION_BACKEND_NAMES) == {"auto", *ATTENTION_BACKENDS}


@pytest.mark.parametrize("name", ATTENTION_BACKEND_NAMES)
def test_config_accepts_every_backend_name(name: str) -> None:
    assert EngineConfig(attention_backend=name).attention_backend == name


@pytest.mark.parametrize("name", ["flash-attn", "FLASH_ATTN", "", None])
def test_config_rejects_other_backend_names(name: object) -> None:
    with pytest.raises(ConfigError, match="attention_backend must be one of"):
        EngineConfig(attention_backend=name)  # type: ignore[arg-type]
