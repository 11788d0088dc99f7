"""Tensor parallelism: sharded layers, the process group, and executors that run one worker per device.

``make_distributed_executor`` is what the engine calls when ``tensor_parallel_size > 1``. The executors are
imported only then, so single-device runs never start processes or import Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedllm.core.distributed.errors import WorkerFailedError
from pagedllm.core.distributed.validation import check_tensor_parallel_config

if TYPE_CHECKING:
    from pagedllm.backends.interface import Backend
    from pagedllm.core.config import EngineConfig, ModelConfig
    from pagedllm.core.executor import Executor

__all__ = ["WorkerFailedError", "check_tensor_parallel_config", "make_distributed_executor"]


def make_distributed_executor(
    config: EngineConfig, model_config: ModelConfig, backend_cls: type[Backend], block_size: int
) -> Executor:
    """Check the tensor-parallel configuration, then start one worker per rank.

    ``config.distributed_executor_backend``: ``mp`` (processes on this machine, rank 0 in this process) or
    ``ray`` (Ray actors, placed on an existing Ray cluster or a local one). Raises ValueError for a
    configuration that cannot run (see :func:`check_tensor_parallel_config`) and
    :class:`WorkerFailedError` if a worker dies while starting.
    """
    check_tensor_parallel_config(config, model_config, backend_cls)
    if config.distributed_executor_backend == "ray":
        from pagedllm.core.distributed.ray_executor import RayExecutor

        return RayExecutor(config, model_config, backend_cls, block_size)
    from pagedllm.core.distributed.mp_executor import MultiprocExecutor

    return MultiprocExecutor(config, model_config, backend_cls, block_size)
