"""Refuse a tensor-parallel configuration that cannot run, before any process starts."""

from __future__ import annotations

from pagedllm.backends.interface import Backend
from pagedllm.core.config import EngineConfig, ModelConfig
from pagedllm.core.loader import model_class_for

EXECUTOR_BACKENDS: tuple[str, ...] = ("mp", "ray")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_tensor_parallel_config(config: EngineConfig, model_config: ModelConfig, backend_cls: type[Backend]) -> None:
    """Raise ValueError, saying what to change, when ``tensor_parallel_size`` cannot run here.

    Checked: the executor backend name; the backend's ``capabilities().supports_distributed``; with ``mp``,
    no more ranks than the backend's :meth:`Backend.device_count` (Ray checks its cluster's resources
    itself); a model class that supports tensor parallelism; attention heads divisible by the size; KV heads
    divisible by it or dividing it (replicated); the MLP's intermediate size divisible by it.
    """
    world_size = config.tensor_parallel_size
    if config.distributed_executor_backend not in EXECUTOR_BACKENDS:
        raise ValueError(
            f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}; "
            f"got {config.distributed_executor_backend!r}"
        )
    backend = backend_cls()
    name = backend_cls.name
    if not backend.capabilities().supports_distributed:
        raise ValueError(
            f"backend {name!r} cannot run tensor parallel (its capabilities say supports_distributed=False): "
            f"use tensor_parallel_size=1 or another backend"
        )
    if config.distributed_executor_backend == "mp":
        num_devices = backend.device_count()
        if num_devices is not None and world_size > num_devices:
            raise ValueError(
                f"tensor_parallel_size={world_size} needs {world_size} devices but backend {name!r} sees "
                f"{num_devices} on this machine: lower tensor_parallel_size, or span machines with "
                f"distributed_executor_backend='ray'"
            )
    model_cls = model_class_for(model_config.architecture)
    if not getattr(model_cls, "supports_tensor_parallel", False):
        raise ValueError(
            f"model class {model_cls.__name__} ({model_config.architecture}) does not support tensor "
            f"parallelism (no supports_tensor_parallel): use tensor_parallel_size=1"
        )
    hf = model_config.hf_config
    num_heads = int(hf.num_attention_heads)
    if num_heads % world_size:
        raise ValueError(
            f"the model's {num_heads} attention heads are not divisible by tensor_parallel_size={world_size}; "
            f"use one of: {_divisors(num_heads)}"
        )
    num_kv_heads = model_config.num_kv_heads
    if num_kv_heads % world_size and world_size % num_kv_heads:
        raise ValueError(
            f"the model's {num_kv_heads} KV heads can be neither split nor replicated evenly over "
            f"tensor_parallel_size={world_size}: use a size that divides {num_kv_heads} or a multiple of it"
        )
    intermediate = getattr(hf, "intermediate_size", None)
    if intermediate is not None and int(intermediate) % world_size:
        raise ValueError(
            f"the model's intermediate_size {intermediate} is not divisible by tensor_parallel_size={world_size}"
        )
