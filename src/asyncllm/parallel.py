"""Tensor parallelism's groundwork: who this rank is, its collectives, and its weight slices.

A `TPGroup` is handed to every sharded layer when the model is built. It carries two
`torch.distributed` process groups (`Groups`) that belong to one engine alone (never the
process-wide default group, so two engines in one process never share one):

- `device_group`: the collectives of the forward pass (NCCL on CUDA, gloo on CPU);
- `cpu_group`: gloo over TCP, for what rank 0 tells the other ranks (step inputs, stop).

On GPUs of one host a `PeerAllReduce` (torch symmetric memory; opt-in, see
`EngineConfig.peer_all_reduce`) can take the small sums of the forward pass from NCCL: one
kernel per rank reads every rank's buffer over NVLink, a third of NCCL's latency for the few
KiB a decode step sums per layer.

Both are built from a store: a `TCPStore` on 127.0.0.1 at a port the OS picks (the workers an
engine spawns learn it from their arguments), or torchrun's env:// store. At world size 1 a
`TPGroup` holds no group at all and the layers call no collective.

`WeightShard` says which slice of a checkpoint tensor a rank holds, so the loader reads only
that slice from disk.

Example:
    >>> tp = TPGroup()  # one rank: what every engine with tensor_parallel_size=1 uses
    >>> tp.world_size, tp.is_driver
    (1, True)
    >>> shard_range(12, part=1, parts=4)
    (3, 6)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed

from asyncllm.errors import ConfigError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "PEER_ALL_REDUCE_MAX_BYTES",
    "PEER_TWO_SHOT_MIN_BYTES",
    "Groups",
    "PeerAllReduce",
    "TPGroup",
    "WeightShard",
    "check_divisible",
    "connect",
    "kv_head_shard",
    "shard_range",
]

# torch's type stubs export neither the stores nor the backend classes used here.
dist: Any = torch.distributed
_c10d: Any = torch._C._distributed_c10d

DEFAULT_TIMEOUT_S = 300.0
"""How long a collective may wait for the other ranks before it fails (a rank hangs)."""
CONNECT_TIMEOUT_S = 600.0
"""How long building the groups may wait for the other ranks to start."""
PEER_ALL_REDUCE_MAX_BYTES = 4 * 2**20
"""Largest sum `PeerAllReduce` takes; larger ones go to NCCL. One-shot still beats NCCL
there on two H200s: 35 against 44 us in a CUDA graph (docs/benchmarks.md)."""
PEER_TWO_SHOT_MIN_BYTES = 2 * 2**20
"""Peer sums of at least this many bytes go two-shot. Two H200s, in a CUDA graph: 2 MiB
19.4 us two-shot against 21.4 one-shot, 4 MiB 27.0 against 35.0; at 512 KiB and below
one-shot is faster (11.1 against 12.8 us) (docs/benchmarks.md)."""

logger = logging.getLogger("asyncllm.parallel")


class Groups:
    """The two process groups of one rank of one engine.

    `abort` makes collectives blocked in them fail (also on the device, where NCCL kernels
    waiting on a dead rank exit); `close` aborts and lets them go, so their sockets close even
    while the model (whose layers hold the `TPGroup`) is still referenced. Both are best
    effort and bounded in time: they run on a helper thread, left behind if a backend hangs.
    """

    def __init__(self, device_group: Any, cpu_group: Any) -> None:
        self.device_group = device_group
        """Collectives of the forward pass: ProcessGroupNCCL (CUDA) or ProcessGroupGloo."""
        self.cpu_group = cpu_group
        """A ProcessGroupGloo for host tensors: step inputs, agreements between ranks."""

    def abort(self) -> None:
        """Fail whatever waits in either group now."""
        groups = [g for g in (self.device_group, self.cpu_group) if g is not None]
        if groups:
            _bounded(lambda: _abort_all(groups), timeout_s=10.0)

    def close(self) -> None:
        """Abort, then drop both groups (collectives raise from now on)."""
        self.abort()
        self.device_group = self.cpu_group = None


class PeerAllReduce:
    """Sums small tensors through torch symmetric memory (ranks on one host's GPUs).

    Every rank's `buffer` is mapped into the others' address space; one kernel per rank
    copies its input in, meets the others at a barrier in device memory, and adds up every
    rank's buffer in rank order (so all ranks get the same bits). Sums from `two_shot_bytes`
    up go two-shot: each rank adds up its share of every buffer, then gathers the others'
    shares (the same bits on every rank too). Nothing goes through the host, and the kernels
    capture into CUDA graphs like any other.
    """

    def __init__(
        self, buffer: torch.Tensor, group_name: str, two_shot_bytes: int | None = None
    ) -> None:
        self.buffer = buffer
        """Bytes of symmetric memory, rendezvoused under `group_name`."""
        self.group_name = group_name
        self.two_shot_bytes = two_shot_bytes
        """Sums of at least this many bytes go two-shot (each rank reduces its share, then
        every rank gathers the shares: half the bytes over the links of a one-shot sum);
        None: always one-shot."""

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether this sum is one for peer memory (small, contiguous, a float type)."""
        return (
            tensor.dtype in _PEER_DTYPES
            and tensor.numel() * tensor.element_size() <= self.buffer.numel()
            and tensor.is_contiguous()
        )

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over the ranks, as a new tensor."""
        size = tensor.numel() * tensor.element_size()
        staging = self.buffer[:size].view(tensor.dtype).view(tensor.shape)
        if self.two_shot_bytes is not None and size >= self.two_shot_bytes:
            staging.copy_(tensor)
            summed: torch.Tensor = _symm_ops().two_shot_all_reduce_out(
                staging, "sum", self.group_name, torch.empty_like(tensor)
            )
            return summed
        out: torch.Tensor = _symm_ops().one_shot_all_reduce_copy(
            staging, tensor, "sum", self.group_name
        )
        return out

    def close(self) -> None:
        """Free the buffer and drop the group's name from torch's registry."""
        self.buffer = torch.empty(0)
        # Never registered, or torch already tore its registry down: nothing to drop.
        with contextlib.suppress(Exception):
            _c10d._unregister_process_group(self.group_name)


_PEER_DTYPES = frozenset({torch.bfloat16, torch.float16, torch.float32})

_rendezvous_attempts = 0
"""Symmetric-memory rendezvous this process has attempted (see `_peer_all_reduce`)."""


def _symm_ops() -> Any:
    return torch.ops.symm_mem


@dataclass(frozen=True, slots=True)
class TPGroup:
    """This rank's place in a tensor-parallel group, and the group's collectives.

    The collectives assume every rank calls them in the same order (the engine guarantees
    that: every rank runs the same steps), and must not be called at world size 1.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    """The device this rank's shard lives on (None: the engine config's device)."""
    groups: Groups | None = None
    """The process groups (None at world size 1)."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    peer: PeerAllReduce | None = None
    """Takes the small sums over peer memory (None: NCCL or gloo for every sum)."""

    @property
    def is_driver(self) -> bool:
        """True on rank 0: the rank that schedules, samples and talks to the caller."""
        return self.rank == 0

    @property
    def is_parallel(self) -> bool:
        """True when the model is split across more than one rank."""
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over the ranks: `tensor` itself summed in place, or (a small
        one on peer memory) a new tensor. Use the result."""
        if self.peer is not None and self.peer.fits(tensor):
            return self.peer(tensor)
        opts = self._options(dist.AllreduceOptions())
        opts.reduceOp = dist.ReduceOp.SUM
        _wait(self._device_group().allreduce([tensor], opts))
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` [n, ...] stacked in rank order: [world_size * n, ...]."""
        tensor = tensor.contiguous()
        out = tensor.new_empty((self.world_size * tensor.shape[0], *tensor.shape[1:]))
        opts = self._options(_c10d.AllgatherOptions())  # not re-exported by torch.distributed
        _wait(self._device_group()._allgather_base(out, tensor, opts))
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `tensor` on every rank with rank `src`'s (device group); returns it."""
        opts = self._options(dist.BroadcastOptions())
        opts.rootRank = src
        _wait(self._device_group().broadcast([tensor], opts))
        return tensor

    def cpu_broadcast(self, tensor: torch.Tensor, timeout_s: float | None = None) -> None:
        """Overwrite the host `tensor` on every rank with rank 0's (cpu group)."""
        timeout = datetime.timedelta(seconds=timeout_s or self.timeout_s)
        self._cpu_group().broadcast(tensor, 0, timeout).wait()

    def cpu_min(self, value: int, timeout_s: float | None = None) -> int:
        """The smallest of every rank's `value` (cpu group)."""
        tensor = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        opts.timeout = datetime.timedelta(seconds=timeout_s or self.timeout_s)
        self._cpu_group().allreduce([tensor], opts).wait()
        return int(tensor.item())

    def abort(self) -> None:
        """Abort the groups (see `Groups.abort`)."""
        if self.groups is not None:
            self.groups.abort()

    def close(self) -> None:
        """Abort and drop the groups (see `Groups.close`)."""
        if self.peer is not None:
            self.peer.close()
        if self.groups is not None:
            self.groups.close()

    def _options(self, opts: Any) -> Any:
        # asyncOp=False (torch >= 2.8) runs NCCL collectives on the caller's stream: no side
        # stream, no cross-stream events, and a clean CUDA-graph capture.
        if hasattr(opts, "asyncOp"):
            opts.asyncOp = False
        opts.timeout = datetime.timedelta(seconds=self.timeout_s)  # a hung rank fails the op
        return opts

    def _device_group(self) -> Any:
        group = self.groups.device_group if self.groups is not None else None
        if group is None:
            raise RuntimeError("the tensor-parallel groups are closed")
        return group

    def _cpu_group(self) -> Any:
        group = self.groups.cpu_group if self.groups is not None else None
        if group is None:
            raise RuntimeError("the tensor-parallel groups are closed")
        return group


def _abort_all(groups: list[Any]) -> None:
    for group in groups:
        _abort(group)


def _abort(group: Any) -> None:
    for name in ("abort", "_abort", "shutdown"):
        method = getattr(group, name, None)
        if method is not None:
            try:
                method()
            except Exception:  # already torn down, or a backend without abort support
                continue
            return


def _bounded(fn: Any, timeout_s: float) -> None:
    thread = threading.Thread(target=fn, name="asyncllm-tp-abort", daemon=True)
    thread.start()
    thread.join(timeout_s)


def connect(
    store: Any, rank: int, world_size: int, device: torch.device, *, loopback: bool,
    timeout_s: float = DEFAULT_TIMEOUT_S, connect_timeout_s: float = CONNECT_TIMEOUT_S,
    peer_all_reduce: bool = False,
) -> TPGroup:  # fmt: skip
    """Build this rank's groups on `store` (every rank calls this with the same store).

    Building waits up to `connect_timeout_s` for the other ranks (which may still be starting
    their interpreters); each collective then waits up to `timeout_s`. `loopback` binds gloo
    to 127.0.0.1 (all ranks on this host); otherwise gloo picks the interface the host name
    resolves to (multi-node torchrun). With `peer_all_reduce` (and CUDA ranks that all
    share this host and can reach each other's memory) small sums go over peer memory.
    """
    timeout = datetime.timedelta(seconds=max(timeout_s, connect_timeout_s))
    cpu_group = _gloo(dist.PrefixStore("cpu/", store), rank, world_size, timeout, loopback)
    if device.type == "cuda":
        device_group = _nccl(dist.PrefixStore("nccl/", store), rank, world_size, timeout)
    else:
        device_group = _gloo(dist.PrefixStore("dev/", store), rank, world_size, timeout, loopback)
    tp = TPGroup(rank, world_size, device, Groups(device_group, cpu_group), timeout_s)
    one_host = loopback or os.environ.get("LOCAL_WORLD_SIZE") == str(world_size)
    if device.type != "cuda" or not one_host or not peer_all_reduce:
        return tp
    peer = _peer_all_reduce(tp, store, spawned=loopback)
    return dataclasses.replace(tp, peer=peer)


def _peer_all_reduce(tp: TPGroup, store: Any, spawned: bool) -> PeerAllReduce | None:
    """Map a `PeerAllReduce` buffer on every rank, or None on every rank where one rank
    cannot: all ranks must take the same path for every sum."""
    reason = _peer_unavailable(tp)
    if spawned and _rendezvous_attempts and not reason:
        # torch numbers symmetric memory's store exchanges per process: workers spawned
        # afresh would wait under other numbers than this process's (a hang, not an error).
        reason = "an earlier engine of this process mapped peer memory with other workers"
    peer = None
    if tp.cpu_min(0 if reason else 1) == 1:
        try:
            peer = _map_peer_buffer(tp, dist.PrefixStore("peer/", store))
        except Exception as exc:  # symmetric memory refused (driver, container, torch build)
            reason = f"symmetric memory failed: {exc}"
    if tp.cpu_min(1 if peer else 0) == 1:
        return peer
    if peer is not None:
        peer.close()
    if reason or tp.is_driver:
        logger.info("all-reduce: NCCL for every sum (%s)", reason or "another rank's choice")
    return None


def _map_peer_buffer(tp: TPGroup, store: Any) -> PeerAllReduce:
    from torch.distributed import _symmetric_memory as symm_mem

    # Symmetric memory finds the ranks through a process group registered under a name (it
    # needs its rank, size and store, no backend): a name of this engine's own, so two
    # engines in one process never share one, agreed on through the engine's store.
    if tp.rank == 0:
        store.set("name", f"asyncllm-{uuid.uuid4().hex}")
    name = store.get("name").decode()
    global _rendezvous_attempts
    _rendezvous_attempts += 1  # from the first attempt: a failed one may have used numbers
    group = dist.ProcessGroup(store, tp.rank, tp.world_size)
    group._set_group_name(name)
    _c10d._register_process_group(name, group)
    # Unregisters the name if what follows fails.
    peer = PeerAllReduce(torch.empty(0), name, two_shot_bytes=PEER_TWO_SHOT_MIN_BYTES)
    try:
        # A fresh allocation, not symm_mem.empty's pool: a pooled block freed by an earlier
        # engine comes back mapped to that engine's (gone) peers.
        buffer = _c10d._SymmetricMemory.empty_strided_p2p(
            (PEER_ALL_REDUCE_MAX_BYTES,), (1,), torch.uint8, tp.device
        )
        symm_mem.rendezvous(buffer, name)
    except BaseException:
        peer.close()
        raise
    peer.buffer = buffer
    return peer


def _peer_unavailable(tp: TPGroup) -> str:
    """Why this rank cannot map the others' memory ('' when it can)."""
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
    except ImportError as exc:
        return f"no torch symmetric memory: {exc}"
    if not hasattr(_symm_ops(), "one_shot_all_reduce_copy"):
        return "this torch has no one-shot all-reduce"
    here = tp.device.index if tp.device is not None else None
    if here is None or torch.cuda.device_count() < tp.world_size:
        return "the ranks' GPUs are not all visible to each rank"
    for other in range(torch.cuda.device_count()):
        if other != here and not torch.cuda.can_device_access_peer(here, other):
            return f"cuda:{here} cannot reach cuda:{other}'s memory (no peer access)"
    return ""


def _wait(work: Any) -> None:
    """Wait for a collective: with asyncOp=False NCCL ran it on the caller's stream already
    and returns no Work (None); gloo returns one."""
    if work is None:
        return
    try:
        work.wait()
    finally:
        # A failed wait's traceback keeps this frame (the engine keeps its failure): the
        # Work would keep the group, and its sockets, alive after shutdown.
        del work


def _nccl(store: Any, rank: int, world_size: int, timeout: datetime.timedelta) -> Any:
    nccl: Any = getattr(dist, "ProcessGroupNCCL")  # noqa: B009 - absent from CPU builds
    options = nccl.Options()
    options._timeout = timeout
    # NCCL's watchdog would take the whole process down on a communicator error (its default
    # handling); here the engine notices a failed rank itself, aborts, and raises EngineError
    # (rank 0 is the caller's process). The variable is read when the group is built.
    previous = os.environ.get(_NCCL_ERROR_HANDLING)
    if previous is None:
        os.environ[_NCCL_ERROR_HANDLING] = "0"
    try:
        return nccl(store, rank, world_size, options)
    finally:
        if previous is None:
            os.environ.pop(_NCCL_ERROR_HANDLING, None)


_NCCL_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


def _gloo(
    store: Any, rank: int, world_size: int, timeout: datetime.timedelta, loopback: bool
) -> Any:
    if not loopback:
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(store, rank, world_size, options)


# ---- how tensors are split -------------------------------------------------------------------


class WeightShard(NamedTuple):
    """Which part of a checkpoint tensor this rank holds, and where it goes.

    The checkpoint tensor is cut into `parts` equal pieces along `dim` and piece `part` is
    copied into `rows` of the parameter (all of it when None). `dim=None`: the whole tensor
    (replicated on every rank).

    Packed experts: `expert` selects the parameter's slab [expert] that the (per-expert)
    tensor fills; `chunks` > 1 says the tensor holds that many projections one after the
    other along `dim` (gate, then up), each cut into `parts` on its own, so the rank's piece
    of every chunk lands one after the other in the parameter.
    """

    rows: slice | None = None
    dim: int | None = None
    part: int = 0
    parts: int = 1
    expert: int | None = None
    chunks: int = 1


class CheckpointLayout(NamedTuple):
    """How a layer's parameters appear in checkpoints, for layers whose checkpoint names are
    not their parameter names (packed experts). Names are relative to the layer."""

    tensors: dict[str, tuple[str, WeightShard]]
    """Checkpoint tensor name -> (the parameter it fills, which part of it)."""
    stands_for: dict[str, tuple[str, ...]]
    """An optional packed checkpoint name -> the names it replaces (a checkpoint holds one
    form or the other); the names it replaces are the required ones."""


def shard_range(size: int, part: int, parts: int) -> tuple[int, int]:
    """[start, end) of piece `part` when `size` is cut into `parts` equal pieces."""
    step = size // parts
    return part * step, (part + 1) * step


def kv_head_shard(num_kv_heads: int, tp: TPGroup) -> tuple[int, int]:
    """(index, parts) of the KV heads this rank holds: an equal share when there are at
    least as many KV heads as ranks, else one head, shared by world_size // num_kv_heads
    consecutive ranks (whose query heads all attend to it)."""
    if num_kv_heads >= tp.world_size:
        return tp.rank, tp.world_size
    return tp.rank // (tp.world_size // num_kv_heads), num_kv_heads


def check_divisible(
    world_size: int, *, num_attention_heads: int, num_key_value_heads: int, vocab_size: int,
    intermediate_size: int, moe_intermediate_size: int | None = None,
) -> None:  # fmt: skip
    """Raise `ConfigError` naming both numbers when a model cannot be split `world_size`
    ways (heads, vocabulary, MLP and experts' widths split evenly; KV heads split or are
    replicated)."""
    if world_size == 1:
        return
    for name, value in (
        ("num_attention_heads", num_attention_heads),
        ("vocab_size", vocab_size),
        ("intermediate_size", intermediate_size),
        ("moe_intermediate_size", moe_intermediate_size or world_size),
    ):
        if value % world_size:
            raise ConfigError(
                f"{name} {value} is not divisible by tensor_parallel_size {world_size}"
            )
    kv = num_key_value_heads
    if kv % world_size and world_size % kv:
        raise ConfigError(
            f"num_key_value_heads {kv} and tensor_parallel_size {world_size}: one must divide "
            "the other (KV heads are split across ranks, or replicated when fewer)"
        )
