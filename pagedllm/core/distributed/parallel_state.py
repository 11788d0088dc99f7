"""The tensor-parallel group of this process: rank, world size and the collectives the parallel layers use.

A :class:`TensorParallelGroup` of world size 1 (the default) makes every collective a no-op, so the parallel
layers compute exactly what plain layers compute on one device. Layers capture the *current* group when they
are built (:func:`get_tp_group`); the worker sets it around model construction with :func:`use_tp_group`,
so no global state leaks into other engines of the same process.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pagedllm.backends.interface import Backend, DeviceCommunicator

# Collectives wait this long for a peer before failing; the executors notice a dead worker much sooner.
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(slots=True)
class TensorParallelGroup:
    """This process's place in a tensor-parallel group and the collectives over it.

    ``process_group`` is the ``torch.distributed`` group, None at world size 1 (every collective is then
    the identity). ``communicator``: the backend's own all-reduce (:meth:`Backend.create_communicator`),
    set by the worker before decode graphs are captured; tensors up to its ``max_bytes`` (all-reduce) and
    ``max_gather_bytes`` (all-gather) go through it.
    """

    rank: int = 0
    world_size: int = 1
    process_group: dist.ProcessGroup | None = None
    communicator: DeviceCommunicator | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Return the sum of ``x`` over the ranks: ``x`` itself, summed in place by ``torch.distributed``, or
        a new tensor from the communicator (small ``x``). Identity at world size 1."""
        if self.world_size == 1:
            return x
        comm = self._communicator_for(x, gather=False)
        if comm is not None:
            return comm.all_reduce(x.contiguous())
        dist.all_reduce(x, group=self.process_group)
        return x

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                backend: Backend) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``backend.add_rms_norm(all_reduce(x), residual, weight, eps)``: ``(normed, residual)``, each
        ``[num_tokens, hidden]``, ``residual`` updated in place. One kernel where the communicator fuses it
        (small ``x``), else the all-reduce then the backend's fused add + norm."""
        comm = self._communicator_for(x, gather=False) if self.world_size > 1 else None
        if comm is not None:
            fused = comm.all_reduce_add_rms_norm(x.contiguous(), residual, weight, eps)
            if fused is not None:
                return fused
        return backend.add_rms_norm(self.all_reduce(x), residual, weight, eps)

    def _communicator_for(self, x: torch.Tensor, gather: bool) -> DeviceCommunicator | None:
        """The communicator when it takes ``x`` (at most its ``max_gather_bytes`` to all-gather, its
        ``max_bytes`` to all-reduce), else None."""
        comm = self.communicator
        if comm is None:
            return None
        limit = comm.max_gather_bytes if gather else comm.max_bytes
        return comm if x.numel() * x.element_size() <= limit else None

    def all_agree(self, flag: bool, device: torch.device) -> bool:
        """True when ``flag`` is True on every rank (a collective: every rank calls it, with its own
        ``device``, where the group's backend communicates). ``flag`` itself at world size 1."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.process_group)
        return bool(value.item())

    def broadcast_from_first(self, x: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
        """Return rank 0's ``x[:n]`` (int64, on ``device``) on every rank: rank 0 passes its tensor, the
        others None (a collective: every rank calls it with the same ``n``). ``x[:n]`` at world size 1."""
        if self.rank == 0:
            if x is None or len(x) < n:
                raise ValueError(f"rank 0 must pass at least {n} values to broadcast")
            out = x[:n].contiguous()
        else:
            out = torch.empty(n, dtype=torch.int64, device=device)
        if self.world_size > 1:
            dist.broadcast(out, src=dist.get_global_rank(self.process_group, 0), group=self.process_group)
        return out

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim``, in rank order. Identity at world size 1.

        ``x`` must have the same shape on every rank; returns a tensor ``world_size`` times larger on ``dim``.
        """
        if self.world_size == 1:
            return x
        x = x.contiguous()
        comm = self._communicator_for(x, gather=True)
        if comm is not None:
            return comm.all_gather(x, dim)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.process_group)
        return torch.cat(parts, dim=dim)


_SINGLE = TensorParallelGroup()
_current: TensorParallelGroup = _SINGLE


def get_tp_group() -> TensorParallelGroup:
    """Return the group layers built now belong to (world size 1 unless inside :func:`use_tp_group`)."""
    return _current


@contextlib.contextmanager
def use_tp_group(group: TensorParallelGroup) -> Iterator[TensorParallelGroup]:
    """Make ``group`` the current group while a model is built; restores the previous one after."""
    global _current
    previous, _current = _current, group
    try:
        yield group
    finally:
        _current = previous


def kv_heads_per_rank(total_num_kv_heads: int, world_size: int) -> int:
    """KV heads each rank holds: an even split, or one (replicated) when there are fewer heads than ranks.

    Raises ValueError when neither divides the other.
    """
    if total_num_kv_heads >= world_size:
        if total_num_kv_heads % world_size:
            raise ValueError(f"{total_num_kv_heads} KV heads cannot be split evenly over {world_size} ranks")
        return total_num_kv_heads // world_size
    if world_size % total_num_kv_heads:
        raise ValueError(f"{total_num_kv_heads} KV heads cannot be replicated evenly over {world_size} ranks")
    return 1


@dataclass(frozen=True, slots=True)
class DistributedInit:
    """Where the ranks of a group meet: a ``torch.distributed`` TCP store served by rank 0 at host:port."""

    host: str
    port: int
    timeout_s: float = DEFAULT_TIMEOUT_S


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` now (the OS picks it), for rank 0's store."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def init_tensor_parallel(
    dist_backend: str, init: DistributedInit, rank: int, world_size: int, device: torch.device
) -> TensorParallelGroup:
    """Join the group (blocking until every rank has joined) and return this rank's :class:`TensorParallelGroup`.

    Called once per worker after the backend bound its device. Rank 0 serves the store at
    ``init.host:init.port``; the others connect to it. Raises RuntimeError if this process already has a
    ``torch.distributed`` group (one tensor-parallel engine per process).
    """
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: tensor parallelism is unavailable")
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialized in this process (another tensor-parallel engine is "
            "running here?): shut it down first with LLMEngine.shutdown()"
        )
    timeout = datetime.timedelta(seconds=init.timeout_s)
    store = dist.TCPStore(init.host, init.port, world_size, rank == 0, timeout=timeout, wait_for_workers=False)
    kwargs: dict[str, object] = {}
    if device.type != "cpu":
        kwargs["device_id"] = device  # binds the group to the device eagerly where the backend supports it
    dist.init_process_group(dist_backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    return TensorParallelGroup(rank, world_size, dist.group.WORLD)


def destroy_tensor_parallel(group: TensorParallelGroup, abort: bool = False) -> None:
    """Leave the group and free its communicators; no-op at world size 1 or when already destroyed.

    ``abort``: tear down communicators that may be stuck in a collective with a dead peer (best effort).
    """
    if group.world_size == 1 or not dist.is_initialized():
        return
    if abort:
        with contextlib.suppress(Exception):
            dist.distributed_c10d._abort_process_group()  # private, but the only way out of a hung collective
        return
    dist.destroy_process_group()
