"""The process of one tensor-parallel rank (> 0) started by the ``mp`` executor: a call loop over a pipe.

Protocol: the worker builds its :class:`~pagedllm.core.worker.Worker` and replies once (ready or the
error); then it runs each :class:`WorkerCall` it receives and replies when asked. ``execute`` is not
answered (rank 0 returns the logits). On any error it sends the traceback and exits with status 1, so the
driver, which watches its process, raises instead of waiting. It exits by itself when the driver goes away.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import threading
import traceback
from dataclasses import dataclass, field

from pagedllm.backends.interface import Backend
from pagedllm.core.config import EngineConfig, ModelConfig
from pagedllm.core.distributed.parallel_state import DistributedInit

# The Worker methods the driver may call; anything else is a protocol error.
WORKER_METHODS: frozenset[str] = frozenset({"bytes_per_block", "kv_cache_budget_bytes", "initialize_cache", "execute"})
SHUTDOWN = "shutdown"


@dataclass(slots=True)
class WorkerSpec:
    """Everything a rank needs to build its Worker (pickled to the new process)."""

    config: EngineConfig
    model_config: ModelConfig
    backend_cls: type[Backend]
    block_size: int
    rank: int
    world_size: int
    distributed_init: DistributedInit


@dataclass(slots=True)
class WorkerCall:
    """One call from the driver: a Worker method (or ``shutdown``), its arguments, whether to reply."""

    method: str
    args: tuple[object, ...] = ()
    reply: bool = True


@dataclass(slots=True)
class WorkerReply:
    """A worker's answer: the method's return value, or the traceback text of what it raised."""

    rank: int
    value: object = None
    error: str | None = field(default=None)


def _exit_with_parent() -> None:
    """Exit at once if the driver process dies, even while this process is blocked in a collective."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="pagedllm-parent-watch", daemon=True).start()


def worker_main(conn: multiprocessing.connection.Connection, spec: WorkerSpec) -> None:
    """Entry point of a rank's process (``multiprocessing`` spawn target); returns when told to shut down."""
    from pagedllm.core.heap import freeze_heap
    from pagedllm.core.worker import Worker

    _exit_with_parent()
    worker = None
    try:
        worker = Worker(spec.config, spec.model_config, spec.backend_cls, spec.block_size, spec.rank,
                        spec.world_size, spec.distributed_init)
        conn.send(WorkerReply(spec.rank))
        while True:
            call: WorkerCall = pickle.loads(conn.recv_bytes())
            if call.method == SHUTDOWN:
                break
            if call.method not in WORKER_METHODS:
                raise ValueError(f"unknown worker call {call.method!r}")
            value = getattr(worker, call.method)(*call.args)
            if call.method == "initialize_cache":  # the start is over: its heap stays for the process's life
                freeze_heap()
            if call.reply:
                conn.send(WorkerReply(spec.rank, value))
    except EOFError:  # the driver closed its end: nothing to report to
        os._exit(1)
    except BaseException:
        try:
            conn.send(WorkerReply(spec.rank, error=traceback.format_exc()))
        finally:
            os._exit(1)  # skip interpreter teardown: peers may hold this process in a collective
    if worker is not None:
        worker.shutdown()
    conn.close()
