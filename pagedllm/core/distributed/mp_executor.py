"""The ``mp`` executor: rank 0 in the driver process, ranks 1..N-1 in processes it spawns on this machine.

Rank 0 runs on one dedicated thread of the driver, so the driver's own thread can watch the other ranks
while rank 0 waits inside a collective: when a worker process dies, the driver notices within
:data:`POLL_INTERVAL_S` and raises :class:`WorkerFailedError` instead of hanging on a peer that will never
answer. Each step the :class:`SchedulerOutput` is pickled once and written to every worker's pipe; every
rank then runs the same step and rank 0's logits (gathered across the vocabulary shards) are returned.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import pickle
import queue
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from pagedllm.backends.interface import Backend
from pagedllm.core.config import EngineConfig, ModelConfig
from pagedllm.core.distributed.errors import WorkerFailedError
from pagedllm.core.distributed.mp_worker import SHUTDOWN, WorkerCall, WorkerReply, WorkerSpec, worker_main
from pagedllm.core.distributed.parallel_state import (
    DistributedInit,
    TensorParallelGroup,
    destroy_tensor_parallel,
    free_port,
)
from pagedllm.core.executor import Executor
from pagedllm.core.model_runner import ModelRunnerOutput
from pagedllm.core.scheduler import SchedulerOutput
from pagedllm.core.worker import Worker

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.2
"""How often a waiting driver checks that every worker process is alive."""
ERROR_GRACE_S = 2.0
"""After rank 0 fails, how long to look for a dead worker that explains it."""
SHUTDOWN_TIMEOUT_S = 10.0
"""How long shutdown waits for ranks to leave before terminating them."""


class RankZeroThread:
    """Runs rank 0's calls one at a time on a dedicated daemon thread (its device and thread-local state
    stay on that thread); the caller gets a future to wait on with timeouts."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple] | None]
        self._calls = queue.SimpleQueue()
        self._pending: concurrent.futures.Future[Any] | None = None
        self._thread = threading.Thread(target=self._loop, name="pagedllm-tp-rank0", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: object) -> concurrent.futures.Future[Any]:
        """Queue ``fn(*args)`` on the thread; returns its future."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._pending = future
        self._calls.put((future, fn, args))
        return future

    @property
    def is_busy(self) -> bool:
        """True while the last submitted call has not finished (e.g. stuck in a collective)."""
        return self._pending is not None and not self._pending.done()

    def stop(self) -> None:
        """Let the thread end after its current call (it is a daemon: a stuck call does not block exit)."""
        self._calls.put(None)

    def _loop(self) -> None:
        while (item := self._calls.get()) is not None:
            future, fn, args = item
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)


def _describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def _ask_to_leave(conns: list[multiprocessing.connection.Connection]) -> None:
    """Tell every worker to leave its group and exit (ignoring those already gone)."""
    payload = pickle.dumps(WorkerCall(SHUTDOWN, (), False))
    for conn in conns:
        with contextlib.suppress(OSError, ValueError):  # already gone or closed
            conn.send_bytes(payload)


def _stop_processes(
    procs: list[multiprocessing.process.BaseProcess],
    conns: list[multiprocessing.connection.Connection],
    timeout_s: float,
) -> None:
    """Ask worker processes to leave, then terminate and kill what is left after ``timeout_s``."""
    _ask_to_leave(conns)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)
    for conn in conns:
        conn.close()


def _release(
    procs: list[multiprocessing.process.BaseProcess],
    conns: list[multiprocessing.connection.Connection],
    rank_zero: RankZeroThread,
    world_size: int,
) -> None:
    """Stop the worker processes, leave (or abort, if rank 0 is stuck in a collective) the process group and
    end rank 0's thread; run by :meth:`MultiprocExecutor.shutdown`, or at garbage collection or exit."""
    _stop_processes(procs, conns, SHUTDOWN_TIMEOUT_S)
    group = TensorParallelGroup(0, world_size)
    if rank_zero.is_busy:  # a collective whose peers are gone may never return
        destroy_tensor_parallel(group, abort=True)
    else:
        try:
            rank_zero.submit(destroy_tensor_parallel, group).result(timeout=SHUTDOWN_TIMEOUT_S)
        except Exception as exc:
            logger.warning("could not destroy the tensor-parallel process group: %s", exc)
    rank_zero.stop()


class MultiprocExecutor(Executor):
    """Tensor parallelism over ``tensor_parallel_size`` devices of this machine, one process per device.

    Raises :class:`WorkerFailedError` from any call once a worker has died or failed; the engine must then
    be shut down. Workers are daemonic, watch the driver, and are also stopped by a finalizer at exit.
    """

    def __init__(
        self, config: EngineConfig, model_config: ModelConfig, backend_cls: type[Backend], block_size: int
    ) -> None:
        self.world_size = config.tensor_parallel_size
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self._failure: str | None = None
        self._closed = False
        self._num_threads = torch.get_num_threads()  # the cpu backend splits threads among ranks
        self._rank_zero = RankZeroThread()
        self._finalizer = weakref.finalize(self, _release, self._procs, self._conns, self._rank_zero, self.world_size)
        self.worker: Worker | None = None
        init = DistributedInit("127.0.0.1", free_port("127.0.0.1"))
        context = multiprocessing.get_context("spawn")
        try:
            for rank in range(1, self.world_size):
                parent_conn, child_conn = context.Pipe()
                spec = WorkerSpec(config, model_config, backend_cls, block_size, rank, self.world_size, init)
                proc = context.Process(target=worker_main, args=(child_conn, spec), name=f"pagedllm-tp-rank{rank}",
                                       daemon=True)
                proc.start()
                child_conn.close()
                self._procs.append(proc)
                self._conns.append(parent_conn)
            future = self._rank_zero.submit(
                Worker, config, model_config, backend_cls, block_size, 0, self.world_size, init
            )
            self.worker = self._wait(future, "start-up")
            self._gather("start-up")
        except BaseException:
            self.shutdown()
            raise
        self.backend = self.worker.backend
        self.device = self.worker.device
        logger.info("tensor parallel (mp): %d ranks, worker pids %s", self.world_size, self.worker_pids)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of ranks 1..N-1 (rank 0 is this process)."""
        return [int(proc.pid) for proc in self._procs if proc.pid is not None]

    # ------------------------------------------------------------------ Executor
    def bytes_per_block(self) -> int:
        """See :class:`Executor`; the same on every rank (each holds ``num_kv_heads / tp`` heads)."""
        self._check_usable()
        return self.worker.bytes_per_block()

    def kv_cache_budget_bytes(self, max_num_batched_tokens: int) -> int:
        """See :class:`Executor`. Ranks sharing one host's memory (a backend without a device count) split it."""
        budgets = self._call_all("kv_cache_budget_bytes", max_num_batched_tokens)
        budget = min(budgets)
        if self.backend.device_count() is None:
            budget //= self.world_size
        return budget

    def initialize_cache(self, num_blocks: int) -> None:
        """See :class:`Executor`."""
        self._call_all("initialize_cache", num_blocks)

    def execute(self, scheduler_output: SchedulerOutput, sampled_token_ids: torch.Tensor | None = None
                ) -> ModelRunnerOutput:
        """See :class:`Executor`: every rank runs the step; rank 0's logits come back. ``sampled_token_ids``
        (on rank 0's device, which is the driver's) reach the other ranks through the worker's broadcast."""
        self._check_usable()
        self._send(WorkerCall("execute", (scheduler_output,), reply=False))
        future = self._rank_zero.submit(self.worker.execute, scheduler_output, sampled_token_ids)
        return self._wait(future, "execute")

    def shutdown(self) -> None:
        """Stop every rank: ask, then terminate what does not leave in time; leave the process group."""
        if self._closed:
            return
        self._closed = True
        _ask_to_leave(self._conns)  # every rank leaves the group at about the same time
        if self.worker is not None and not self._rank_zero.is_busy:
            try:
                self._rank_zero.submit(self.worker.shutdown).result(timeout=SHUTDOWN_TIMEOUT_S)
            except Exception as exc:  # leaving must not hide the error that brought us here
                logger.warning("rank 0 could not leave the process group cleanly: %s", exc)
        self._finalizer()
        torch.set_num_threads(self._num_threads)

    # ------------------------------------------------------------------ calls
    def _call_all(self, method: str, *args: object) -> list[Any]:
        """Run a Worker method on every rank at once; returns the values in rank order."""
        self._check_usable()
        self._send(WorkerCall(method, args, reply=True))
        first = self._wait(self._rank_zero.submit(getattr(self.worker, method), *args), method)
        return [first, *self._gather(method)]

    def _send(self, call: WorkerCall) -> None:
        payload = pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self._conns:
            try:
                conn.send_bytes(payload)
            except OSError:
                self._check_workers(grace_s=ERROR_GRACE_S)
                raise

    def _wait(self, future: concurrent.futures.Future[Any], what: str) -> Any:
        """Wait for rank 0's call while checking the other ranks; raises :class:`WorkerFailedError` if one
        died, or rank 0's own exception (after which the executor is unusable)."""
        while True:
            try:
                return future.result(timeout=POLL_INTERVAL_S)
            except concurrent.futures.TimeoutError:
                self._check_workers()
            except Exception as exc:
                self._failure = f"rank 0 raised during {what}: {type(exc).__name__}: {exc}"
                self._check_workers(grace_s=ERROR_GRACE_S, cause=exc)
                raise

    def _gather(self, what: str) -> list[Any]:
        """Collect one reply from each worker (ranks 1..N-1), watching that they stay alive."""
        values = []
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns, strict=True), start=1):
            while not conn.poll(POLL_INTERVAL_S):
                if proc.exitcode is not None:
                    self._check_workers()
            reply = self._recv(conn)
            if reply is None or reply.error is not None:
                detail = "" if reply is None else f":\n{reply.error}"
                self._fail(f"tensor-parallel worker rank {rank} (pid {proc.pid}) failed during {what}{detail}")
            values.append(reply.value)
        return values

    # ------------------------------------------------------------------ failures
    def _check_usable(self) -> None:
        if self._failure is not None:
            raise WorkerFailedError(f"{self._failure}; shut the engine down (LLMEngine.shutdown()) and build a new one")
        if self._closed:
            raise RuntimeError("this executor is shut down")

    def _check_workers(self, grace_s: float = 0.0, cause: BaseException | None = None) -> None:
        """Raise :class:`WorkerFailedError` if a worker process has exited, waiting up to ``grace_s`` for one.

        ``cause``: rank 0's exception, if that is why we look (it is chained and named in the message).
        """
        deadline = time.monotonic() + grace_s
        while True:
            for rank, (proc, conn) in enumerate(zip(self._procs, self._conns, strict=True), start=1):
                if proc.exitcode is not None:
                    reply = self._recv(conn) if conn.poll(0) else None
                    detail = f":\n{reply.error}" if reply is not None and reply.error else ""
                    self._fail(f"tensor-parallel worker rank {rank} (pid {proc.pid}) died with "
                               f"{_describe_exit(proc.exitcode)}{detail}", cause)
            if time.monotonic() >= deadline:
                return
            sentinels = [proc.sentinel for proc in self._procs]
            multiprocessing.connection.wait(sentinels, timeout=max(0.0, deadline - time.monotonic()))

    def _fail(self, message: str, cause: BaseException | None = None) -> None:
        if cause is not None:
            message += f"\n(rank 0 meanwhile raised {type(cause).__name__}: {cause})"
        self._failure = message
        logger.error("%s", message)
        raise WorkerFailedError(
            f"{message}\nshut the engine down (LLMEngine.shutdown()) and build a new one"
        ) from cause

    @staticmethod
    def _recv(conn: multiprocessing.connection.Connection) -> WorkerReply | None:
        try:
            return conn.recv()
        except (EOFError, OSError):
            return None
