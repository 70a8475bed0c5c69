"""Model building blocks. Layers that need step metadata read the forward context."""

from __future__ import annotations

import time

__all__ = ["between_layers"]


def between_layers() -> None:
    """Called by models after each decoder layer: briefly releases the GIL.

    An eager forward pass launches hundreds of kernels from a worker thread without
    releasing the GIL; the event-loop thread would only get it back at the interpreter's
    5 ms switch interval. Releasing it once per layer keeps the loop's latency to a fraction
    of a millisecond. (Graph replays run no Python, so they never get here.)
    """
    time.sleep(0)
