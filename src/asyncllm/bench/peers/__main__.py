"""The child side of a peer run: `python -m asyncllm.bench.peers NAME WORKLOAD_JSON OUT_JSON`.

Writes the peer's result (or `{"skipped": reason}` when it cannot run here) to OUT_JSON, then
leaves without tearing the peer down: nano-vllm's process-group teardown has hung on the GPU
machine before, and the result is already on disk.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from asyncllm.bench.peers import PEERS, PeerUnavailableError, PeerWorkload

__all__ = ["main", "measure"]

_MODULES = {"nano-vllm": "nano_vllm", "transformers": "hf"}
"""Peer name -> the module of this package that runs it (imported only in its own process)."""


def measure(name: str, workload: PeerWorkload) -> dict[str, Any]:
    """Run peer `name` on `workload` in this process; `{"skipped": ...}` if it cannot."""
    if name not in _MODULES:
        raise SystemExit(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    peer = importlib.import_module(f"asyncllm.bench.peers.{_MODULES[name]}")
    try:
        result: dict[str, Any] = peer.measure(workload)
        return result
    except PeerUnavailableError as exc:
        return {"skipped": str(exc)}


def main(argv: list[str]) -> int:
    """Measure, write the result as JSON, print it; 0 once the result is written."""
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    name, spec, out = argv
    result = measure(name, PeerWorkload.read(Path(spec)))
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
