"""Every way to work with the project: `nox -l` lists them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
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


@nox.session(venv_backend="none")
def gpu_tests(session: nox.Session) -> None:
    """The GPU suite, in the current interpreter (which must already have CUDA torch).

    Works offline: missing test dependencies come from wheels in .whl/ if it exists.
    """
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]
    if WHEELS.is_dir():
        pip += ["--no-index", "--find-links", str(WHEELS)]
    session.run(*pip, "pytest-asyncio", external=True)
    session.run(*pip, "--no-build-isolation", "-e", ".", external=True)
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


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks: scheduler overhead everywhere; throughput and attention on a GPU."""
    session.install(TORCH)
    session.install("-e", ".")
    session.run("asyncllm", "bench", "scheduler", *session.posargs)
