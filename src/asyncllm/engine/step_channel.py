"""What crosses from rank 0 to the other tensor-parallel ranks: one `HostStep` per step.

A step travels as a fixed-size frame (an int64 header, then as much of the payload as fits)
and, only for steps too large for it, one more message with the rest; both are gloo
broadcasts on the engine's CPU group. The payload is the step's packed arrays and the names
of their parts; nothing is pickled. A frame whose header says "stop" ends a worker's loop.

Small steps (decodes of up to ~100 sequences) take one broadcast.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from asyncllm.engine.inputs import HostStep, StepMeta
from asyncllm.parallel import TPGroup

__all__ = ["FRAME_BYTES", "StepReceiver", "StepSender", "decode_step", "encode_step"]

FRAME_BYTES = 8192
"""Size of the first (and usually only) message of a step."""

_STEP, _STOP = 1, 2
# kind, payload bytes, int64 parts, int32 parts, float rows, float columns, name bytes
_FIXED_FIELDS = 7
_HEADER_FIELDS = _FIXED_FIELDS + len(StepMeta._fields)
_HEADER_BYTES = -(-_HEADER_FIELDS * 8 // 16) * 16
_FOREVER_S = 10 * 365 * 86400.0  # a worker waits for the next step as long as it takes
_ALIGN = 16


def encode_step(host: HostStep) -> tuple[np.ndarray, np.ndarray]:
    """(header int64, payload uint8) of `host`."""
    names = ",".join([*host.int_sizes, *host.int32_sizes]).encode("ascii")
    sizes = np.array([*host.int_sizes.values(), *host.int32_sizes.values()], np.int64)
    sections = [sizes, host.ints, host.int32s, host.floats, np.frombuffer(names, np.uint8)]
    payload = _concat_aligned(sections)
    header = np.array(
        [_STEP, payload.size, len(host.int_sizes), len(host.int32_sizes), *host.floats.shape,
         len(names), *host.meta],
        np.int64,
    )  # fmt: skip
    return header, payload


def decode_step(header: np.ndarray, payload: np.ndarray) -> HostStep:
    """The `HostStep` that `encode_step` turned into `header` and `payload` (views of
    `payload`, which must not be reused while the step is in use)."""
    _, _, num_ints, num_int32s, rows, cols, name_bytes = header[:_FIXED_FIELDS].tolist()
    reader = _Reader(payload)
    sizes = reader.take(np.int64, num_ints + num_int32s).tolist()
    names = reader.take(np.uint8, name_bytes, at_end=True).tobytes().decode("ascii").split(",")
    int_sizes = dict(zip(names[:num_ints], sizes[:num_ints]))
    int32_sizes = dict(zip(names[num_ints:], sizes[num_ints:]))
    ints = reader.take(np.int64, _packed_length(int_sizes.values(), 8))
    int32s = reader.take(np.int32, _packed_length(int32_sizes.values(), 4))
    floats = reader.take(np.float32, rows * cols).reshape(rows, cols)
    meta = header[_FIXED_FIELDS:_HEADER_FIELDS].tolist()
    return HostStep(ints, int_sizes, int32s, int32_sizes, floats, _meta(meta))


class StepSender:
    """Rank 0's end: broadcasts each step (and finally "stop") to the other ranks."""

    def __init__(self, tp: TPGroup) -> None:
        self.tp = tp
        self.num_sent = 0
        self.seconds = 0.0
        """Wall time spent broadcasting, over all steps (for benchmarks)."""

    def send(self, host: HostStep) -> None:
        """Broadcast `host`; returns once it is handed to the transport."""
        start = time.perf_counter()
        header, payload = encode_step(host)
        frame = np.zeros(FRAME_BYTES, np.uint8)
        frame[: header.nbytes] = header.view(np.uint8)
        inline = min(payload.size, FRAME_BYTES - _HEADER_BYTES)
        frame[_HEADER_BYTES : _HEADER_BYTES + inline] = payload[:inline]
        self.tp.cpu_broadcast(torch.from_numpy(frame))
        if inline < payload.size:
            self.tp.cpu_broadcast(torch.from_numpy(payload[inline:]))
        self.num_sent += 1
        self.seconds += time.perf_counter() - start

    def stop(self, timeout_s: float) -> None:
        """Tell every worker to leave its loop."""
        frame = np.zeros(FRAME_BYTES, np.uint8)
        frame[:8] = np.array([_STOP], np.int64).view(np.uint8)
        self.tp.cpu_broadcast(torch.from_numpy(frame), timeout_s=timeout_s)


class StepReceiver:
    """A worker's end: waits (as long as it takes) for rank 0's next step."""

    def __init__(self, tp: TPGroup) -> None:
        self.tp = tp

    def recv(self) -> HostStep | None:
        """The next step, or None when rank 0 says stop."""
        frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)
        self.tp.cpu_broadcast(frame, timeout_s=_FOREVER_S)
        data = frame.numpy()
        header = data[:_HEADER_BYTES].view(np.int64)[:_HEADER_FIELDS].copy()
        if header[0] == _STOP:
            return None
        payload = np.empty(int(header[1]), np.uint8)  # owned: the step's arrays view it
        inline = min(payload.size, FRAME_BYTES - _HEADER_BYTES)
        payload[:inline] = data[_HEADER_BYTES : _HEADER_BYTES + inline]
        if inline < payload.size:
            rest = torch.from_numpy(payload[inline:])  # received in place
            self.tp.cpu_broadcast(rest)
        return decode_step(header, payload)


# Which StepMeta fields are flags (the header carries them as 0/1).
_META_FLAGS = tuple(StepMeta.__annotations__[name] == "bool" for name in StepMeta._fields)


def _meta(values: list[int]) -> StepMeta:
    typed: list[Any] = [bool(v) if flag else v for flag, v in zip(_META_FLAGS, values)]
    return StepMeta(*typed)


def _packed_length(sizes: Iterable[int], itemsize: int) -> int:
    step = _ALIGN // itemsize
    return sum(-(-n // step) * step for n in sizes)


def _concat_aligned(sections: list[np.ndarray]) -> np.ndarray:
    """The sections' bytes back to back, each starting 16-byte aligned."""
    offsets, total = [], 0
    for array in sections:
        offsets.append(total)
        total += -(-array.nbytes // _ALIGN) * _ALIGN
    out = np.zeros(total, np.uint8)
    for array, offset in zip(sections, offsets):
        out[offset : offset + array.nbytes] = np.ascontiguousarray(array).view(np.uint8).ravel()
    return out


class _Reader:
    """Reads the aligned sections of a payload in order (the names last, at the end)."""

    def __init__(self, payload: np.ndarray) -> None:
        self.payload, self.offset = payload, 0

    def take(self, dtype: type, count: int, at_end: bool = False) -> np.ndarray:
        nbytes = count * np.dtype(dtype).itemsize
        if at_end:  # the names are the last section, just before the end's padding
            start = len(self.payload) - (-(-nbytes // _ALIGN) * _ALIGN)
            return self.payload[start : start + nbytes]
        view: np.ndarray = self.payload[self.offset : self.offset + nbytes].view(dtype)
        self.offset += -(-nbytes // _ALIGN) * _ALIGN
        return view
