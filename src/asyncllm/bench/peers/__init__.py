"""Other engines on the workload of `asyncllm bench throughput`, each in its own process.

A peer reads the very prompts and output lengths asyncllm ran (a `PeerWorkload`, passed as a
JSON file), generates them with `ignore_eos`-style fixed lengths at the same temperature and
reports output tok/s. Its own process keeps its memory, threads and process groups away from
the bench and from the next peer. A peer that cannot run here (not installed, no CUDA) is
skipped: its entry says why.

    results = run_peers(("nano-vllm", "transformers"), workload, PeerOptions())
    results["nano-vllm"]  # {"tok_per_s": ..., "seconds": ...} or {"skipped": "..."}

The child side is `python -m asyncllm.bench.peers NAME WORKLOAD_JSON OUT_JSON`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncllm
from asyncllm.errors import ConfigError

__all__ = [
    "DEFAULT_NANO_VLLM_PATH",
    "PEERS",
    "PeerOptions",
    "PeerUnavailableError",
    "PeerWorkload",
    "default_nano_vllm_path",
    "parse_peers",
    "run_peer",
    "run_peers",
    "unavailable_reason",
]

PEERS = ("nano-vllm", "transformers")
"""Every peer `--peers` knows, in the order they run."""

DEFAULT_NANO_VLLM_PATH = Path(".peers/nano-vllm")
"""Where the GPU scripts carry nano-vllm's source (a folder holding the `nanovllm` package)."""


class PeerUnavailableError(RuntimeError):
    """A peer cannot run in this environment (a package or CUDA is missing): it is skipped."""


@dataclass(frozen=True)
class PeerWorkload:
    """What a peer generates: `prompts[i]` then exactly `output_lens[i]` tokens."""

    model_dir: str
    prompts: list[list[int]]
    output_lens: list[int]
    temperature: float
    device: str
    """"cuda" or "cpu": where asyncllm ran."""
    dtype: str
    """The torch dtype asyncllm computed in, by name ("bfloat16", "float32")."""

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.output_lens) or not self.prompts:
            raise ConfigError(
                f"PeerWorkload needs one output length per prompt, got {len(self.prompts)} "
                f"prompts and {len(self.output_lens)} output lengths"
            )
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"PeerWorkload.device must be 'cuda' or 'cpu', got {self.device!r}")

    def write(self, path: Path) -> None:
        """Save as JSON (what the peer's process reads)."""
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, path: Path) -> PeerWorkload:
        """Load what `write` saved."""
        return cls(**json.loads(path.read_text()))


@dataclass(frozen=True)
class PeerOptions:
    """How peers are found and how long each may take."""

    nano_vllm_path: Path = DEFAULT_NANO_VLLM_PATH
    timeout_s: float = 600.0


def default_nano_vllm_path() -> Path:
    """$NANO_VLLM_PATH if set, else `DEFAULT_NANO_VLLM_PATH` (relative to the working dir)."""
    return Path(os.environ.get("NANO_VLLM_PATH") or DEFAULT_NANO_VLLM_PATH)


def parse_peers(text: str) -> tuple[str, ...]:
    """`--peers`: comma-separated names from `PEERS`, or "none"; order and repeats ignored."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    if names == {"none"}:
        return ()
    unknown = sorted(names - set(PEERS))
    if unknown or not names:
        raise ConfigError(
            f"--peers: unknown peer(s) {', '.join(unknown) or repr(text)}; "
            f"choose from {', '.join(PEERS)} or 'none'"
        )
    return tuple(name for name in PEERS if name in names)


def unavailable_reason(name: str, workload: PeerWorkload, options: PeerOptions) -> str | None:
    """Why peer `name` cannot run here, found without starting it; None if it may run.

    Cheap checks only: the peer's process still reports an import that fails.
    """
    if name == "transformers":
        return _missing("transformers")
    if workload.device != "cuda":
        return f"nano-vllm needs CUDA and flash-attn; this run is on {workload.device}"
    source = options.nano_vllm_path / "nanovllm" / "__init__.py"
    if not source.is_file() and _missing("nanovllm"):
        return (
            f"no nano-vllm source at {options.nano_vllm_path} (set --nano-vllm-path or "
            "$NANO_VLLM_PATH to a folder holding the nanovllm package)"
        )
    return _missing("flash_attn", "nano-vllm needs it")


def run_peers(names: tuple[str, ...], workload: PeerWorkload, options: PeerOptions
              ) -> dict[str, dict[str, Any]]:  # fmt: skip
    """`run_peer` for each name, one after the other."""
    return {name: run_peer(name, workload, options) for name in names}


def run_peer(name: str, workload: PeerWorkload, options: PeerOptions) -> dict[str, Any]:
    """Run peer `name` on `workload` in a child process and return what it measured:
    `tok_per_s`, `seconds`, `output_tokens`, ...; or `{"skipped": reason}` when it cannot
    run here; or `{"error": ...}` when it failed or outlived `options.timeout_s`."""
    if name not in PEERS:
        raise ConfigError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    reason = unavailable_reason(name, workload, options)
    if reason is not None:
        return {"skipped": reason}
    with tempfile.TemporaryDirectory(prefix=f"asyncllm-peer-{name}-") as tmp:
        spec, out = Path(tmp) / "workload.json", Path(tmp) / "result.json"
        workload.write(spec)
        command = [sys.executable, "-m", "asyncllm.bench.peers", name, str(spec), str(out)]
        try:
            done = subprocess.run(
                command, env=_child_env(name, options), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, timeout=options.timeout_s, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            _echo(name, exc.output)
            return {"error": f"timed out after {options.timeout_s:g} s"}
        _echo(name, done.stdout)
        if out.is_file():
            result: dict[str, Any] = json.loads(out.read_text())
            return result
        tail = (done.stdout or "").strip().splitlines()[-5:]
        return {"error": f"exit status {done.returncode}: " + " | ".join(tail)}


def _missing(module: str, why: str = "") -> str | None:
    if importlib.util.find_spec(module) is not None:
        return None
    return f"{module} is not installed" + (f" ({why})" if why else "")


def _child_env(name: str, options: PeerOptions) -> dict[str, str]:
    """This environment, with this very asyncllm (and nano-vllm's source) first on the path."""
    paths = [str(Path(asyncllm.__file__).resolve().parents[1])]
    if name == "nano-vllm":
        paths.insert(0, str(options.nano_vllm_path.resolve()))
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def _echo(name: str, output: str | bytes | None) -> None:
    """The peer's own log, on our stderr (stdout stays the bench's JSON)."""
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    for line in (output or "").splitlines():
        print(f"[{name}] {line}", file=sys.stderr)
