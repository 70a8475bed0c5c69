"""Type and range checks shared by `SamplingParams`, `EngineConfig` and the model config.

The bounds are what the engine's tensors can hold: token ids, positions, counts and block ids
are int32 in the kernels; seeds are 64-bit; byte sizes are int64.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["MAX_INT32", "MAX_INT64", "MAX_SEED", "as_finite_float", "as_int", "show_bound"]

MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1
MAX_SEED = 2**64 - 1

_BOUND_NAMES = {MAX_INT32: "2**31 - 1", MAX_INT64: "2**63 - 1", MAX_SEED: "2**64 - 1"}


def as_int(value: object) -> int | None:
    """`value` as a plain int when it is an integer (an int or a numpy integer), else None.

    A bool is not an integer here: `max_tokens=True` is a mistake, not 1.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def as_finite_float(value: object) -> float | None:
    """`value` as a float when it is a finite real number (never a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def show_bound(bound: int) -> str:
    """A bound as people write it: 2**31 - 1 rather than 2147483647."""
    return _BOUND_NAMES.get(bound, str(bound))
