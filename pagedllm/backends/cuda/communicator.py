"""Graph-safe collectives for tensor-parallel decode on NVIDIA GPUs, over torch's symmetric memory.

Every rank maps every other rank's buffers (``torch.distributed._symmetric_memory``: CUDA virtual memory
shared between the processes of one host, reached over NVLink or PCIe peer access), so a collective is a
few kernels that read the peers' memory directly and meet at barriers kept in device memory: no host
involvement, so CUDA graphs can record and replay them. They serve the latency-bound case of decode (a few
KB to a few MB per layer); prefill's larger tensors keep going through NCCL. NVLink multicast is not used.

- all-reduce: torch's one-shot kernel (copy the local tensor into this rank's buffer, barrier, sum every
  rank's buffer);
- all-reduce + residual add + RMSNorm (the end of every attention and MLP block): one Triton kernel
  (:mod:`pagedllm.backends.cuda.allreduce_norm`);
- all-gather (the LM head's logits): copy into this rank's buffer, barrier, concatenate the peers' buffers,
  barrier (so no rank overwrites its buffer while a peer still reads it).
"""

from __future__ import annotations

import logging
import types

import torch

from pagedllm.backends.cuda.allreduce_norm import AllReduceAddRMSNorm
from pagedllm.backends.interface import DeviceCommunicator

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
"""What torch's one-shot kernel sums (it has no float16 instantiation)."""
MAX_FUSED_HIDDEN = 16384
"""The widest row the fused all-reduce + RMSNorm kernel holds in registers; wider rows take two kernels."""


def _symmetric_memory() -> types.ModuleType:
    """``torch.distributed._symmetric_memory`` ready for a new group; RuntimeError if this torch lacks it."""
    try:
        import torch.distributed._symmetric_memory as symm_mem

        torch.ops.symm_mem.one_shot_all_reduce_copy_out  # noqa: B018 - fails without the CUDA kernels
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"torch {torch.__version__} has no symmetric-memory all-reduce: {exc}") from exc
    return symm_mem


def _prepare_group(symm_mem: types.ModuleType, group_name: str) -> None:
    """Register ``group_name`` for symmetric memory where this torch still needs it.

    Newer torch resolves groups by itself and deprecates ``enable_symm_mem_for_group``; calling it there
    would also pin the group's store under its name, and a later engine's group of the same name (a new
    ``torch.distributed`` group after the old one was destroyed) would then meet on the dead store.
    """
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is None or getattr(enable, "__deprecated__", None):
        return
    getattr(symm_mem, "_group_name_to_store", {}).pop(group_name, None)  # a previous group's, if any
    enable(group_name)


class SymmetricMemoryCommunicator(DeviceCommunicator):
    """Symmetric buffers of ``max_bytes`` (all-reduce) and ``max_gather_bytes`` (all-gather) per rank, set up
    collectively in the constructor (every rank at the same time).

    Raises ValueError for a dtype outside :data:`SUPPORTED_DTYPES`, RuntimeError (with torch's reason) when
    this torch build or machine cannot share device memory between the ranks (no symmetric-memory support,
    no peer access between the GPUs).
    """

    def __init__(self, process_group: object, device: torch.device, dtype: torch.dtype, max_bytes: int,
                 max_gather_bytes: int = 0) -> None:
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"the symmetric-memory all-reduce sums {SUPPORTED_DTYPES}, not {dtype}")
        symm_mem = _symmetric_memory()
        self.group_name: str = process_group.group_name  # type: ignore[attr-defined]
        _prepare_group(symm_mem, self.group_name)
        element = dtype.itemsize
        self.dtype = dtype
        self.max_bytes = max_bytes
        self._all_reduce = torch.ops.symm_mem.one_shot_all_reduce_copy_out
        self._buffer = symm_mem.empty(max(1, max_bytes // element), dtype=dtype, device=device)
        self._handle = symm_mem.rendezvous(self._buffer, process_group)
        self.world_size = int(self._handle.world_size)
        self._fused_norm = AllReduceAddRMSNorm(symm_mem, process_group, device, dtype, max_bytes)
        self.max_gather_bytes = 0
        if max_gather_bytes > 0:
            self._gather_buffer = symm_mem.empty(max(1, max_gather_bytes // element), dtype=dtype, device=device)
            self._gather_handle = symm_mem.rendezvous(self._gather_buffer, process_group)
            self.max_gather_bytes = max_gather_bytes
        logger.info("cuda: symmetric-memory collectives over %d ranks: all-reduce %.1f MiB, all-gather %.1f MiB",
                    self.world_size, max_bytes / 2**20, self.max_gather_bytes / 2**20)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Return the sum of ``x: [num_tokens, hidden]`` (model dtype, contiguous) over the ranks, a new tensor."""
        if x.dtype != self.dtype:
            raise ValueError(f"this communicator was built for {self.dtype}, got {x.dtype}")
        staging = self._buffer[: x.numel()].view_as(x)
        out = torch.empty_like(x)
        self._all_reduce(staging, x, "sum", self.group_name, out)
        return out

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One kernel for ``add_rms_norm(all_reduce(x), residual, weight, eps)`` (see the interface), or None
        for rows wider than :data:`MAX_FUSED_HIDDEN` or a dtype this communicator was not built for."""
        if x.dtype != self.dtype or residual.dtype != self.dtype or x.shape[-1] > MAX_FUSED_HIDDEN:
            return None
        return self._fused_norm(x, residual, weight, eps)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Return every rank's ``x: [num_sampled, vocab_slice]`` concatenated along ``dim``, a new tensor."""
        if x.dtype != self.dtype:
            raise ValueError(f"this communicator was built for {self.dtype}, got {x.dtype}")
        handle = self._gather_handle
        self._gather_buffer[: x.numel()].view_as(x).copy_(x)
        handle.barrier(channel=0)  # every rank's slice is in place
        shape = list(x.shape)
        parts = [handle.get_buffer(rank, shape, x.dtype, 0) for rank in range(self.world_size)]
        out = torch.cat(parts, dim=dim)
        handle.barrier(channel=0)  # every rank has read the others' slices
        return out
