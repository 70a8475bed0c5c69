"""Every way to work with the project: `nox -l` lists them."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests", "kernels", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

# The CPU build of torch: on the CI machines this pin resolves to a local CPU wheel, so the
# test session never pulls multi-GB CUDA builds. Override to test against another torch.
TORCH = os.environ.get("ASYNCLLM_TORCH", "torch==2.13.0")
WHEELS = Path(".whl")  # wheels carried to the offline GPU machine (git-ignored)
LINTED = ["src", "tests", "benchmarks", "scripts", "examples", "noxfile.py"]


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU test suite (everything not marked `gpu`)."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "not gpu", *session.posargs)


@nox.session
def kernels(session: nox.Session) -> None:
    """The Triton attention kernels on the CPU, under Triton's interpreter: small shapes
    through every kernel against the torch reference (the GPU suite runs the full sweep).
    Triton is the GPU machine's version. Its interpreter needs NumPy < 2.4: it turns scalar
    loads into 1-element arrays and calls int() on them, which NumPy 2.4 refuses."""
    session.install(TORCH)
    session.install("-e", ".[test]", "triton==3.6.0", "numpy<2.4")
    # The file's own main, not pytest: a check that cannot run fails here, never skips.
    session.run("python", "tests/gpu/test_triton_attention.py", env={"TRITON_INTERPRET": "1"})


def _run_from_source(session: nox.Session) -> None:
    """Import the project from src/ in the current interpreter: no install, so pip never
    tries to fetch torch (or anything) on an offline GPU machine, and a second run is the
    same as the first."""
    paths = [str(Path("src").resolve()), os.environ.get("PYTHONPATH", "")]
    session.env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)


@nox.session(venv_backend="none")
def gpu_tests(session: nox.Session) -> None:
    """The GPU suite, in the current interpreter (which must already have CUDA torch).

    Works offline: pytest-asyncio, if missing, comes from the wheels in .whl/ (no index is
    asked then); `scripts/gpu_machine.sh tests` does the same without nox.
    """
    _run_from_source(session)
    probe = "import importlib.util as u, sys; sys.exit(u.find_spec('pytest_asyncio') is None)"
    if subprocess.run([sys.executable, "-c", probe], check=False).returncode != 0:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]
        if WHEELS.is_dir():
            pip += ["--no-index", "--find-links", str(WHEELS)]
        session.run(*pip, "pytest-asyncio", external=True)
    session.run(
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        *(session.posargs or ["tests/gpu"]),
        external=True,
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", *LINTED)
    session.run("ruff", "format", "--check", *LINTED)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy (strict) on the package."""
    session.install(TORCH)
    session.install("-e", ".[test]", "mypy")
    session.run("mypy")


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """The benchmarks, in the current interpreter (which needs torch): scheduler overhead
    and event-loop lag everywhere; on CUDA also throughput against its peers (`--peers` in
    posargs; default transformers) and decode attention; on two GPUs tensor parallelism
    (TP=1 vs TP=2). JSON results go to .bench/ (record them in docs/benchmarks.md)."""
    _run_from_source(session)
    out = Path(".bench")
    out.mkdir(exist_ok=True)
    run = functools.partial(session.run, sys.executable, external=True)
    run("-m", "asyncllm", "bench", "scheduler", "--engine-loop", "--out", str(out / "sched.json"))
    run("-m", "asyncllm", "bench", "lag", "--out", str(out / "lag.json"))
    probe = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
    if subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0:
        run("-m", "asyncllm", "bench", "throughput", "--out", str(out / "throughput.json"),
            *session.posargs)  # fmt: skip
        run("benchmarks/attention.py", "--out", str(out / "attention.json"))
    two_gpus = "import sys, torch; sys.exit(0 if torch.cuda.device_count() >= 2 else 1)"
    if subprocess.run([sys.executable, "-c", two_gpus], check=False).returncode == 0:
        run("-m", "asyncllm", "bench", "tp", "--out", str(out / "tp.json"))
