"""Tensor-parallel ranks as processes: rank 0 is the engine, ranks 1..N-1 serve its steps.

`start_runner` builds the engine's `ModelRunner`. With tensor_parallel_size N > 1 it first
starts the other ranks, either

- spawned here (the default): N-1 fresh interpreters (no fork, so CUDA is safe), meeting
  rank 0 through a `TCPStore` on 127.0.0.1 at a port the OS picks, so engines never
  collide; or
- started by torchrun (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, one process per
  rank, any number of nodes): ranks > 0 call `serve_torchrun_worker` instead of building an
  engine (`asyncllm generate` does this on its own).

Every rank then builds the same `ModelRunner` on its shard, and the other ranks loop in
`serve_steps`: receive a step from rank 0, launch it, repeat, until rank 0 says stop.

Failures: a worker that raises reports its exception through a pipe and exits; rank 0 watches
those pipes (end of file: the process ended), aborts its groups when a worker fails (so
nothing waits on the dead rank) and raises `EngineError` naming the rank. A rank that hangs
fails the step after `ASYNCLLM_TP_TIMEOUT_S` (default 300) seconds. Workers leave when rank 0
goes (their stdin closes, or their parent changes), and shutdown stops them, then terminates,
then kills what is left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
import torch.distributed

from asyncllm.config import EngineConfig
from asyncllm.engine.runner import LaunchedStep, ModelRunner
from asyncllm.engine.step_channel import StepReceiver, StepSender
from asyncllm.errors import AsyncLLMError, ConfigError, EngineError
from asyncllm.model.config import ModelConfig
from asyncllm.parallel import DEFAULT_TIMEOUT_S, TPGroup, connect

__all__ = [
    "WorkerPool",
    "rank_device",
    "serve_steps",
    "serve_torchrun_worker",
    "start_runner",
    "timeout_s",
    "torchrun_rank",
]

logger = logging.getLogger(__name__)

# torch's type stubs export neither TCPStore, PrefixStore nor rendezvous.
dist: Any = torch.distributed

_STOP_TIMEOUT_S = 10.0  # a worker told to stop has this long to exit before it is terminated
_NOTICE_S = 1.0  # a dead rank's sockets close a moment before the monitor notices its death
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Engines built so far in this process under torchrun: every rank builds them in the same
# order, so the k-th engine of each rank meets the others under the same store prefix.
_torchrun_engines = itertools.count()


def timeout_s() -> float:
    """How long a rank may take over a step before it counts as hung (ASYNCLLM_TP_TIMEOUT_S)."""
    raw = os.environ.get("ASYNCLLM_TP_TIMEOUT_S")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"ASYNCLLM_TP_TIMEOUT_S must be a positive number, got {raw!r}")
    return value


def rank_device(config: EngineConfig, rank: int, local_rank: int | None = None) -> torch.device:
    """The device of `rank`: on CUDA, the configured GPU plus the rank (or torchrun's
    LOCAL_RANK); on CPU, the CPU."""
    base = config.torch_device()
    if base.type != "cuda":
        return base
    index = (base.index or 0) + rank if local_rank is None else local_rank
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"tensor_parallel_size {config.tensor_parallel_size} needs GPU {index}, but only "
            f"{torch.cuda.device_count()} are visible"
        )
    return torch.device("cuda", index)


# ---- rank 0 ----------------------------------------------------------------------------------


def start_runner(model_dir: Path, model_config: ModelConfig, config: EngineConfig) -> ModelRunner:
    """The engine's runner: alone at tensor_parallel_size 1, else rank 0 of a group whose
    other ranks run in worker processes (spawned here, or started by torchrun)."""
    if config.tensor_parallel_size == 1:
        return ModelRunner(model_dir, model_config, config)
    if torchrun_rank() is not None:
        return _start_under_torchrun(model_dir, model_config, config)
    return _start_spawned(model_dir, model_config, config)


class _WorkerSpec(NamedTuple):
    """What a spawned worker needs to build its rank (pickled once, at start)."""

    model_dir: Path
    model_config: ModelConfig
    config: EngineConfig
    rank: int
    host: str
    port: int
    device: torch.device
    timeout_s: float


class _Worker(NamedTuple):
    """A spawned rank, as rank 0 holds it."""

    rank: int
    process: subprocess.Popen[bytes]
    errors: Connection
    """The worker's exception, if it raises; end of file once its process has ended."""
    lifeline: IO[bytes]
    """The worker's stdin: it exits when this closes (rank 0's process is gone)."""


# A fresh interpreter, not multiprocessing's spawn: that would re-run the caller's __main__
# module in every worker (a script without `if __name__ == "__main__":` would start engines
# recursively).
_BOOTSTRAP = (
    "import pickle, sys\n"
    "boot = pickle.load(sys.stdin.buffer)\n"
    "sys.path[:] = boot['path']\n"
    "from asyncllm.engine.workers import _worker_main\n"
    "_worker_main(boot)\n"
)


def _spawn(spec: _WorkerSpec) -> _Worker:
    read_fd, write_fd = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP], stdin=subprocess.PIPE, pass_fds=(write_fd,)
        )
    finally:
        os.close(write_fd)  # the child's end: once it exits, reading here gives EOF
    assert process.stdin is not None
    boot = {"path": list(sys.path), "errors_fd": write_fd, "spec": pickle.dumps(spec)}
    pickle.dump(boot, process.stdin)
    process.stdin.flush()
    return _Worker(spec.rank, process, Connection(read_fd, writable=False), process.stdin)


def _start_spawned(model_dir: Path, model_config: ModelConfig, config: EngineConfig) -> ModelRunner:
    world, limit = config.tensor_parallel_size, timeout_s()
    devices = [rank_device(config, rank) for rank in range(world)]
    store = _loopback_store(world)
    pool = WorkerPool(store)
    try:
        for rank in range(1, world):
            pool.add(_spawn(_WorkerSpec(model_dir, model_config, config, rank, "127.0.0.1",
                                        store.port, devices[rank], limit)))  # fmt: skip
        pool.attach(pool.connect_rank0(devices[0], limit, config.peer_all_reduce))
        runner = ModelRunner(model_dir, model_config, config, pool.tp)
    except BaseException as exc:
        error = pool.startup_error(exc)
        pool.close()
        raise error from error.__cause__
    pool.serving()
    runner.workers = pool
    logger.info("tensor parallelism: %d ranks, workers %s", world, pool.pids)
    return runner


def _loopback_store(world: int) -> Any:
    """A TCPStore that listens on 127.0.0.1 only, at a port the OS picks."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(world * 4)
        port = listener.getsockname()[1]
        return dist.TCPStore("127.0.0.1", port, world, is_master=True, wait_for_workers=False,
                             master_listen_fd=listener.detach())  # fmt: skip
    except (TypeError, RuntimeError, ValueError):  # a torch without master_listen_fd
        listener.close()
        return dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)


def _start_under_torchrun(
    model_dir: Path, model_config: ModelConfig, config: EngineConfig
) -> ModelRunner:
    rank, world, local_rank = _torchrun_ranks(config.tensor_parallel_size)
    if rank != 0:
        raise EngineError(
            f"torchrun rank {rank} must serve steps, not build an engine: call "
            "asyncllm.engine.workers.serve_torchrun_worker() on ranks > 0"
        )
    store = _torchrun_store(rank, world)
    # The other ranks build exactly this engine's runner: they take its config from here.
    store.set("config", json.dumps(dataclasses.asdict(config)))
    tp = _torchrun_group(store, config, rank, world, local_rank)
    pool = WorkerPool(None)
    pool.attach(tp)
    try:
        runner = ModelRunner(model_dir, model_config, config, tp)
    except BaseException:
        pool.close()
        raise
    pool.serving()
    runner.workers = pool
    return runner


class WorkerPool:
    """Rank 0's handle on the other ranks: sends them steps, notices a failed or hung rank
    (raising `EngineError` instead of waiting forever), and stops them at shutdown.

    It holds the workers it spawned (none under torchrun, which owns its processes) and the
    store they met at.
    """

    def __init__(self, store: Any) -> None:
        self._workers: list[_Worker] = []
        self._store = store
        self.tp = TPGroup()
        self.sender: StepSender | None = None
        self._failure: str | None = None
        """What failed (another rank, or a step that took too long), once something did."""
        self._failure_cause: BaseException | None = None
        self._failed = threading.Event()
        self._serving = False
        """Every rank has built its runner and waits for steps (so "stop" reaches them)."""
        self._broken = False
        """A collective failed on this rank: the groups cannot be trusted to stop gracefully."""
        self._closing = threading.Event()
        self._monitor: threading.Thread | None = None
        # If the engine is dropped without a shutdown, the workers still go at exit.
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)

    @property
    def pids(self) -> list[int]:
        """Process ids of the spawned workers (rank 1 first; empty under torchrun)."""
        return [worker.process.pid for worker in self._workers]

    def add(self, worker: _Worker) -> None:
        """Watch a spawned worker (all are added before `connect_rank0`)."""
        self._workers.append(worker)
        if self._monitor is None:
            self._monitor = threading.Thread(target=self._watch, name="asyncllm-tp-monitor",
                                             daemon=True)  # fmt: skip
            self._monitor.start()

    def attach(self, tp: TPGroup) -> None:
        """Rank 0's groups, once built."""
        self.tp = tp
        self.sender = StepSender(tp)

    def serving(self) -> None:
        """Every rank is ready: from now on shutdown tells them to stop (before, it kills)."""
        self._serving = True

    def connect_rank0(self, device: torch.device, limit_s: float, peer: bool) -> TPGroup:
        """Build rank 0's groups, giving up as soon as a worker fails (building them waits
        for every rank, which a worker that died while starting would never join)."""
        world = len(self._workers) + 1
        result: list[Any] = []

        def build() -> None:
            try:
                result.append(connect(self._store, 0, world, device, loopback=True,
                                      timeout_s=limit_s, peer_all_reduce=peer))  # fmt: skip
            except BaseException as exc:
                result.append(exc)

        builder = threading.Thread(target=build, name="asyncllm-tp-connect", daemon=True)
        builder.start()
        while builder.is_alive():
            builder.join(0.05)
            self.raise_if_failed()  # the builder is left to time out on its own
        if isinstance(result[0], BaseException):
            raise result[0]
        group: TPGroup = result[0]
        return group

    # ---- failures ----------------------------------------------------------------------------

    def _watch(self) -> None:
        """Monitor thread: a message on a worker's pipe is its exception; end of file there
        means its process ended, which before shutdown is a death."""
        waiting: dict[Connection, _Worker] = {}
        while not self._closing.is_set():
            waiting.update((w.errors, w) for w in self._workers if w.errors not in waiting)
            live = [pipe for pipe in waiting if not pipe.closed]
            for ready in wait(live, timeout=0.2):
                assert isinstance(ready, Connection)
                self._read(ready, waiting[ready])
            if all(pipe.closed for pipe in waiting) and len(waiting) == len(self._workers):
                return

    def _read(self, pipe: Connection, worker: _Worker) -> None:
        try:
            cause: BaseException | None = pipe.recv()
        except (EOFError, OSError):  # the process has ended
            pipe.close()
            cause = None
        except Exception as unreadable:  # the worker's exception could not be rebuilt here
            cause = EngineError(f"(its exception could not be read: {unreadable!r})")
        if not self._closing.is_set():
            self._fail(worker, cause)

    def _fail(self, worker: _Worker | None, cause: BaseException | None) -> None:
        if self._failed.is_set():
            return
        if worker is None:
            what = f"tensor parallelism: a step did not finish within {self.tp.timeout_s:g} s"
        elif cause is not None:
            what = f"tensor-parallel rank {worker.rank} (pid {worker.process.pid}) raised {cause!r}"
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(1.0)
            reason = _exit_reason(worker.process.returncode)
            what = f"tensor-parallel rank {worker.rank} (pid {worker.process.pid}) died ({reason})"
        self._failure, self._failure_cause = what, cause
        self._failed.set()
        logger.error("%s", what)
        self.tp.abort()  # whatever waits on the failed rank fails now, on the device too

    def raise_if_failed(self) -> None:
        """Raise the failure of another rank, if one happened."""
        if self._failure is not None:
            raise EngineError(self._failure) from self._failure_cause

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        """Raise a failure inside the block as the failing rank's, when another rank caused
        it (a dead rank's sockets close a moment before its death is noticed)."""
        try:
            yield
        except Exception as exc:
            self._broken = True
            if self._workers:
                self._failed.wait(_NOTICE_S)
            if self._failure is None:
                raise
            raise EngineError(self._failure) from self._failure_cause or exc

    def startup_error(self, exc: BaseException) -> BaseException:
        """The error to raise when building the ranks failed with `exc` on rank 0: rank 0's
        own typed error, else the failing worker's (its typed error when it has one)."""
        if isinstance(exc, AsyncLLMError) or not isinstance(exc, Exception):
            return exc
        if self._workers:
            self._failed.wait(_NOTICE_S)
        if self._failure is None:
            return exc
        if isinstance(self._failure_cause, AsyncLLMError):
            return self._failure_cause
        error = EngineError(self._failure)
        error.__cause__ = self._failure_cause or exc
        return error

    def wait(self, event: torch.cuda.Event) -> None:
        """Wait for `event` (a launched step) while watching the other ranks: raises when one
        failed, or when the step takes longer than the timeout."""
        deadline = time.monotonic() + self.tp.timeout_s
        polls = 0
        while not event.query():  # type: ignore[no-untyped-call]
            self.raise_if_failed()
            polls += 1
            if polls % 64 == 0 and time.monotonic() > deadline:
                self._fail(None, None)
                self.raise_if_failed()
            # Spin (yielding the GIL) through a typical step, then back off.
            time.sleep(0 if polls < 4096 else 0.0002)

    # ---- steps and shutdown ------------------------------------------------------------------

    def send_step(self, host: Any) -> None:
        """Broadcast a step's `HostStep` to the other ranks."""
        self.raise_if_failed()
        assert self.sender is not None, "send_step() before attach()"
        with self.failures():
            self.sender.send(host)

    def close(self) -> None:
        """Stop the workers (they exit once told; terminated, then killed, if they do not),
        abort the groups and close the store. Never waits on a dead or hung rank for long."""
        if self._closing.is_set():
            return
        self._closing.set()
        graceful = self._serving and self._failure is None and not self._broken
        if graceful:
            assert self.sender is not None
            try:
                self.sender.stop(timeout_s=_STOP_TIMEOUT_S)
            except Exception:  # a worker is gone: the rest is terminated below
                graceful = False
        _stop_workers(self._workers, _STOP_TIMEOUT_S if graceful else 0.0)
        if self._monitor is not None:
            self._monitor.join(2.0)
        for worker in self._workers:
            worker.errors.close()
            worker.lifeline.close()
        self.tp.close()  # an abort: never a comm teardown that waits for its peers
        self.tp, self.sender, self._store = TPGroup(), None, None
        self._finalizer.detach()


def _stop_workers(workers: list[_Worker], grace_s: float) -> None:
    """Wait up to `grace_s` for workers told to stop, then terminate (only after a grace
    period: a worker that failed may be stopped, which only SIGKILL ends), then kill."""
    deadline = time.monotonic() + grace_s
    for worker in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(max(0.0, deadline - time.monotonic()))
    ends = ("terminate", "kill") if grace_s else ("kill",)
    for worker in workers:
        for end in ends:
            if worker.process.poll() is None:
                getattr(worker.process, end)()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.process.wait(3.0)


def _kill_all(workers: list[_Worker]) -> None:
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(3.0)


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


# ---- ranks 1..N-1 ----------------------------------------------------------------------------


def serve_steps(runner: ModelRunner) -> None:
    """A worker rank's loop: launch each step rank 0 sends, until it says stop.

    The drawn tokens of a step reach this rank by broadcast inside `launch`, so the next
    step's pending inputs are read on the device, as on rank 0; the host never waits here
    except for the next step's inputs.
    """
    receiver = StepReceiver(runner.tp)
    previous: LaunchedStep | None = None
    while (host := receiver.recv()) is not None:
        previous = runner.launch(runner.prepare_host(host), previous)
    if runner.stream is not None:
        runner.stream.synchronize()


def _worker_main(boot: dict[str, Any]) -> None:
    """Entry point of a spawned worker process (see `_BOOTSTRAP`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle
    errors = Connection(boot["errors_fd"], readable=False)
    _exit_with_parent(sys.stdin.fileno())
    code = 0
    try:
        spec: _WorkerSpec = pickle.loads(boot["spec"])
        world = spec.config.tensor_parallel_size
        if spec.device.type == "cuda":
            torch.cuda.set_device(spec.device)
        store = dist.TCPStore(spec.host, spec.port, world, is_master=False)
        tp = connect(
            store, spec.rank, world, spec.device, loopback=True, timeout_s=spec.timeout_s,
            peer_all_reduce=spec.config.peer_all_reduce,
        )  # fmt: skip
        serve_steps(ModelRunner(spec.model_dir, spec.model_config, spec.config, tp))
    except BaseException as exc:
        code = 1
        _report(errors, exc)
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter teardown: destroying a NCCL communicator can wait on peers that are
    # gone; the process's exit frees its GPU memory either way.
    os._exit(code)


def _report(errors: Connection, exc: BaseException) -> None:
    try:
        errors.send(exc)
    except Exception:  # not picklable: send what it says
        with contextlib.suppress(Exception):
            errors.send(EngineError(f"{type(exc).__name__}: {exc}"))


def _exit_with_parent(lifeline: int) -> None:
    """Exit this worker as soon as rank 0's process is gone: its end of our stdin closes, or
    this process is handed to another parent."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            readable, _, _ = select.select([lifeline], [], [], 1.0)
            if readable and not os.read(lifeline, 4096):
                break  # end of file: rank 0 never writes after the start-up message
        os._exit(1)

    threading.Thread(target=watch, name="asyncllm-tp-lifeline", daemon=True).start()


# ---- torchrun --------------------------------------------------------------------------------


def torchrun_rank() -> int | None:
    """This process's rank when torchrun (or another env:// launcher) started it as one of
    several processes, else None."""
    if not all(name in os.environ for name in _TORCHRUN_ENV):
        return None
    if int(os.environ["WORLD_SIZE"]) == 1:
        return None  # one process: the engine spawns its own workers
    return int(os.environ["RANK"])


def serve_torchrun_worker() -> None:
    """On torchrun ranks > 0: build this rank's shard of rank 0's engine (its `EngineConfig`
    comes from rank 0) and serve its steps until it shuts down. Returns then.

    Example (every rank runs this script: `torchrun --nproc-per-node 2 script.py`):
        >>> if torchrun_rank() != 0:  # doctest: +SKIP
        ...     serve_torchrun_worker()
        ... else:
        ...     with LLM(path, tensor_parallel_size=2) as llm: ...
    """
    from asyncllm.engine.core import DEFAULT_MODEL_DIR

    rank, world, local_rank = _torchrun_ranks(int(os.environ["WORLD_SIZE"]))
    store = _torchrun_store(rank, world)
    store.wait(["config"], timedelta(days=1))  # for as long as rank 0 takes to get there
    config = EngineConfig(**json.loads(store.get("config")))
    model_dir = Path(config.model) if config.model is not None else DEFAULT_MODEL_DIR
    device = rank_device(config, rank, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tp = _torchrun_group(store, config, rank, world, local_rank)
    try:
        serve_steps(ModelRunner(model_dir, ModelConfig.from_dir(model_dir), config, tp))
    finally:
        tp.close()


def _torchrun_ranks(tensor_parallel_size: int) -> tuple[int, int, int]:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != tensor_parallel_size:
        raise ConfigError(
            f"torchrun started WORLD_SIZE {world} processes but tensor_parallel_size is "
            f"{tensor_parallel_size}: start one process per rank"
        )
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def _torchrun_store(rank: int, world: int) -> Any:
    """torchrun's store, under a prefix of this engine's own (the k-th engine of each rank)."""
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timedelta(seconds=600)))
    return dist.PrefixStore(f"asyncllm/{next(_torchrun_engines)}/", store)


def _torchrun_group(
    store: Any, config: EngineConfig, rank: int, world: int, local_rank: int
) -> TPGroup:
    device = rank_device(config, rank, local_rank)
    return connect(store, rank, world, device, loopback=False, timeout_s=timeout_s(),
                   peer_all_reduce=config.peer_all_reduce)  # fmt: skip
