"""Executors run the worker(s) of an engine: in-process for one device, several processes for TP."""

from __future__ import annotations

import abc

import torch

from pagedllm.backends.interface import Backend
from pagedllm.core.config import EngineConfig, ModelConfig
from pagedllm.core.model_runner import ModelRunnerOutput
from pagedllm.core.scheduler import SchedulerOutput
from pagedllm.core.worker import Worker


class Executor(abc.ABC):
    """What the engine needs from its workers, however many and wherever they run."""

    @abc.abstractmethod
    def bytes_per_block(self) -> int:
        """KV bytes one block takes on each worker (all layers)."""

    @abc.abstractmethod
    def kv_cache_budget_bytes(self, max_num_batched_tokens: int) -> int:
        """The smallest KV budget among workers, after profiling a forward at the token budget."""

    @abc.abstractmethod
    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` blocks on every worker."""

    @abc.abstractmethod
    def execute(self, scheduler_output: SchedulerOutput, sampled_token_ids: torch.Tensor | None = None
                ) -> ModelRunnerOutput:
        """Run one step on every worker; returns the driver's logits (not waited for).

        ``sampled_token_ids``: the previous step's sampled tokens on the driver's device, for requests
        scheduled with a pending token (asynchronous scheduling; an executor that cannot take them raises
        ValueError).
        """

    def shutdown(self) -> None:  # noqa: B027 - nothing to release in process
        """Stop workers and release their resources."""


class UniProcExecutor(Executor):
    """One worker in this process."""

    def __init__(
        self, config: EngineConfig, model_config: ModelConfig, backend_cls: type[Backend], block_size: int
    ) -> None:
        self.worker = Worker(config, model_config, backend_cls, block_size)
        self.backend = self.worker.backend
        self.device = self.worker.device

    def bytes_per_block(self) -> int:
        """See :class:`Executor`."""
        return self.worker.bytes_per_block()

    def kv_cache_budget_bytes(self, max_num_batched_tokens: int) -> int:
        """See :class:`Executor`."""
        return self.worker.kv_cache_budget_bytes(max_num_batched_tokens)

    def initialize_cache(self, num_blocks: int) -> None:
        """See :class:`Executor`."""
        self.worker.initialize_cache(num_blocks)

    def execute(self, scheduler_output: SchedulerOutput, sampled_token_ids: torch.Tensor | None = None
                ) -> ModelRunnerOutput:
        """See :class:`Executor`."""
        return self.worker.execute(scheduler_output, sampled_token_ids)
