"""A ``cpu`` backend that claims graph capture and offers a device communicator, for testing the core's
tensor-parallel decode-graph path without a GPU.

"Capturing" runs the step once and returns the step itself, so a replay re-runs it over the static buffers
(collectives included, in the same order on every rank); the communicator is a gloo all-reduce that counts
its calls. Spawned tensor-parallel workers import this module by name (it travels pickled by reference).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist

from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.backends.interface import BackendCapabilities, DeviceCommunicator


class CountingGlooCommunicator(DeviceCommunicator):
    """Collectives through gloo on copies; ``calls`` and ``gathers`` count them in this process. Offers an
    all-gather only when ``max_gather_bytes`` > 0; ``dtype`` is the one the core asked for."""

    def __init__(self, process_group: object, max_bytes: int, max_gather_bytes: int, dtype: torch.dtype) -> None:
        self.process_group = process_group
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.max_gather_bytes = max_gather_bytes
        self.calls = 0
        self.gathers = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = x.clone()
        dist.all_reduce(out, group=self.process_group)
        return out

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        self.gathers += 1
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(self.process_group))]
        dist.all_gather(parts, x, group=self.process_group)
        return torch.cat(parts, dim=dim)


class GraphCpuBackend(CpuBackend):
    """The ``cpu`` backend plus "graphs" (the step re-run) and :class:`CountingGlooCommunicator` (all-reduce
    only)."""

    name = "cpugraph"
    offers_gather = False

    def capabilities(self) -> BackendCapabilities:
        return dataclasses.replace(super().capabilities(), can_capture_graphs=True)

    def capture_graph(self, fn: Callable[[], None]) -> Callable[[], None]:
        fn()
        return fn

    def create_communicator(
        self, process_group: object, device: torch.device, dtype: torch.dtype, max_bytes: int,
        max_gather_bytes: int = 0,
    ) -> DeviceCommunicator | None:
        return CountingGlooCommunicator(process_group, max_bytes, max_gather_bytes if self.offers_gather else 0, dtype)


class GatherGraphCpuBackend(GraphCpuBackend):
    """:class:`GraphCpuBackend` whose communicator also all-gathers (the LM head joins the graphs)."""

    name = "cpugraphgather"
    offers_gather = True
