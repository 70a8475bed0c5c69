"""What crosses from rank 0 to the other tensor-parallel ranks: one `HostStep` per step.

A step travels as a fixed-size frame (an int64 header, then as much of the payload as fits)
and, only for steps too large for it, one more message with the rest; both are gloo
broadcasts on the engine's CPU group. The payload is the step's packed arrays and the names
of their parts; nothing is pickled. A frame whose header says "stop" ends a worker's loop.

Both ends move the broadcasts to a thread of their own: gloo's send completes only once the
receiver takes the data, and a worker is usually still launching the previous step when rank 0
sends the next. With a receiver that always waits and a sender that never blocks the engine
loop, the handshake overlaps with both ranks' launches.

Small steps (decodes of up to ~100 sequences) take one broadcast.
"""

from __future__ import annotations

import queue
import threading
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
    """Rank 0's end. `send` encodes a step and returns; a thread of the sender's own
    broadcasts the steps in order, so rank 0's loop never waits for the handshake with a rank
    that is still launching the previous step. `stop` sends "stop" behind them."""

    def __init__(self, tp: TPGroup) -> None:
        self.tp = tp
        self.num_sent = 0
        self.seconds = 0.0
        """Rank 0's own time in `send` (encoding, handing over), over all steps."""
        self.transfer_seconds = 0.0
        """The sender thread's time in the broadcasts, over all steps (for benchmarks)."""
        self._transferred = 0
        self._error: BaseException | None = None
        self._queue: queue.SimpleQueue[list[np.ndarray] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="asyncllm-tp-sender", daemon=True)
        self._thread.start()

    def send(self, host: HostStep) -> None:
        """Queue `host` for the other ranks (raises if an earlier broadcast failed)."""
        start = time.perf_counter()
        self._raise_if_failed()
        header, payload = encode_step(host)
        frame = np.zeros(FRAME_BYTES, np.uint8)
        frame[: header.nbytes] = header.view(np.uint8)
        inline = min(payload.size, FRAME_BYTES - _HEADER_BYTES)
        frame[_HEADER_BYTES : _HEADER_BYTES + inline] = payload[:inline]
        self._queue.put([frame] if inline == payload.size else [frame, payload[inline:]])
        self.num_sent += 1
        self.seconds += time.perf_counter() - start

    def wait_sent(self, timeout_s: float) -> None:
        """Wait until every queued step is broadcast (raises on failure or timeout)."""
        deadline = time.monotonic() + timeout_s
        while self._transferred < self.num_sent:
            self._raise_if_failed()
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise TimeoutError(f"steps not sent to the other ranks within {timeout_s:g} s")
            time.sleep(0.0005)

    def stop(self, timeout_s: float) -> None:
        """Tell every worker to leave its loop, after the steps already queued."""
        frame = np.zeros(FRAME_BYTES, np.uint8)
        frame[:8] = np.array([_STOP], np.int64).view(np.uint8)
        self._queue.put([frame])
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._raise_if_failed()
        if self._thread.is_alive():
            raise TimeoutError(f"'stop' not sent to the other ranks within {timeout_s:g} s")

    def _run(self) -> None:
        while (messages := self._queue.get()) is not None:
            start = time.perf_counter()
            try:
                for message in messages:
                    self.tp.cpu_broadcast(torch.from_numpy(message))
            except BaseException as exc:  # the next send (or stop) raises it
                self._error = exc
                return
            self.transfer_seconds += time.perf_counter() - start
            self._transferred += 1

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"sending a step to the other ranks failed: {self._error!r}")


class StepReceiver:
    """A worker's end. A thread of its own is always waiting in the broadcast for rank 0's
    next step (so rank 0's send never waits for this rank to finish launching) and queues
    the decoded steps for `recv`."""

    def __init__(self, tp: TPGroup) -> None:
        self.tp = tp
        self._queue: queue.SimpleQueue[HostStep | BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="asyncllm-tp-receiver", daemon=True)
        self._thread.start()

    def recv(self) -> HostStep | None:
        """The next step (waiting as long as it takes), or None when rank 0 says stop."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise RuntimeError(f"receiving a step from rank 0 failed: {item!r}") from item
        return item

    def _run(self) -> None:
        try:
            while (host := self._receive()) is not None:
                self._queue.put(host)
        except BaseException as exc:
            self._queue.put(exc)
        else:
            self._queue.put(None)

    def _receive(self) -> HostStep | None:
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
