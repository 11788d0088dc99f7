"""One device's share of the engine: backend, model, KV caches and model runner."""

from __future__ import annotations

import logging
import time

import torch

from pagedllm.backends.interface import Backend
from pagedllm.core.config import EngineConfig, ModelConfig, resolve_kv_cache_dtype
from pagedllm.core.distributed.parallel_state import (
    DistributedInit,
    TensorParallelGroup,
    destroy_tensor_parallel,
    init_tensor_parallel,
    kv_heads_per_rank,
    use_tp_group,
)
from pagedllm.core.graph_runner import capture_sizes
from pagedllm.core.loader import load_model
from pagedllm.core.model_runner import ModelRunner, ModelRunnerOutput
from pagedllm.core.models.moe import experts_sync_with_host
from pagedllm.core.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


class Worker:
    """Loads the model on its device and runs steps; the executor owns one (or one per rank).

    With ``world_size > 1`` it first joins the tensor-parallel group at ``distributed_init``; its model and
    KV cache then hold this rank's share of the heads.
    """

    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        backend_cls: type[Backend],
        block_size: int,
        rank: int = 0,
        world_size: int = 1,
        distributed_init: DistributedInit | None = None,
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.backend = backend_cls()
        self.backend.configure(config.extra)
        self.backend.init_device(rank, world_size)
        self.device = self.backend.device(rank)
        self.rank = rank
        self.tp_group = TensorParallelGroup()
        if world_size > 1:
            if distributed_init is None:
                raise ValueError("a worker of a tensor-parallel group (world_size > 1) needs distributed_init")
            self.tp_group = init_tensor_parallel(
                self.backend.dist_backend, distributed_init, rank, world_size, self.device
            )
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, model_config.dtype)
        with use_tp_group(self.tp_group):
            model = load_model(model_config, self.backend, self.device, config.load_format, config.seed,
                               config.quantization, self.kv_dtype)
        self.backend.weights_loaded()
        self.runner = ModelRunner(model, self.backend, self.device, block_size, model_config.max_model_len)
        if config.enable_lora:
            with use_tp_group(self.tp_group):
                self.runner.enable_lora(config.max_loras, config.max_lora_rank)
        self.num_kv_heads = kv_heads_per_rank(model_config.num_kv_heads, world_size)  # this rank's share

    def bytes_per_block(self) -> int:
        """KV bytes one block takes on this worker, all layers together."""
        return self.runner.kv_cache_bytes_per_block(
            self.num_kv_heads, self.model_config.head_dim, self.kv_dtype
        )

    def kv_cache_budget_bytes(self, max_num_batched_tokens: int) -> int:
        """Profile a forward at the token budget, then ask the backend how many bytes the pool may take."""
        self.runner.profile_run(
            max_num_batched_tokens, self.num_kv_heads, self.model_config.head_dim, self.kv_dtype
        )
        return self.backend.kv_cache_budget_bytes(self.config.gpu_memory_utilization)

    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate the KV pool of ``num_blocks`` blocks, record decode graphs if the backend can, then, for a
        backend whose kernels compile on first launch (``compiles_kernels``), run the warm-up steps of
        :meth:`ModelRunner.warm_up` (decode steps too when no graphs were recorded: the capture ran them)."""
        self.runner.allocate_kv_cache(
            num_blocks, self.num_kv_heads, self.model_config.head_dim, self.kv_dtype
        )
        captured = self._capture_decode_graphs()
        if self.backend.capabilities().compiles_kernels:
            start = time.perf_counter()
            steps = self.runner.warm_up(() if captured else self.runner.warm_up_sizes(self.config.max_num_seqs))
            logger.info("warm-up: %d steps in %.1f s", steps, time.perf_counter() - start)

    def _capture_decode_graphs(self) -> bool:
        """Record decode graphs if the backend can and ``enforce_eager`` is off; returns whether it did.

        With tensor parallelism, graphs are recorded only when every rank got a device communicator from
        its backend (:meth:`Backend.create_communicator`): decode all-reduces then go through it inside the
        graphs; the LM head is recorded too if the communicator can all-gather its output, else it runs
        after the replay (its all-gather through ``torch.distributed``).
        """
        if not self.backend.capabilities().can_capture_graphs or self.config.enforce_eager:
            return False
        if experts_sync_with_host(self.runner.model, self.backend):
            logger.info("backend %r computes the model's experts with the default fused_moe (it syncs with the "
                        "host); decode runs without graphs", self.backend.name)
            return False
        max_batch = capture_sizes(self.config.max_num_seqs)[-1]
        with_logits = True
        if self.tp_group.world_size > 1:
            dtype = self.model_config.dtype  # what the all-reduces and the all-gather carry
            element = dtype.itemsize
            world = self.tp_group.world_size
            max_bytes = max_batch * self.model_config.hidden_size * element
            gather_bytes = max_batch * -(-self.model_config.vocab_size // world) * element  # the LM head's slice
            comm = self.backend.create_communicator(self.tp_group.process_group, self.device, dtype, max_bytes,
                                                    gather_bytes)
            if not self.tp_group.all_agree(comm is not None, self.device):
                logger.info("tensor parallel: backend %r gave no device communicator on every rank; decode runs "
                            "without graphs", self.backend.name)
                return False
            self.tp_group.communicator = comm
            # the LM head joins the graphs only if its all-gather can go through the communicator
            with_logits = self.tp_group.all_agree(comm.max_gather_bytes >= gather_bytes, self.device)
        self.runner.capture_decode_graphs(self.config.max_num_seqs, with_logits=with_logits)
        return True

    def execute(self, scheduler_output: SchedulerOutput, sampled_token_ids: torch.Tensor | None = None
                ) -> ModelRunnerOutput:
        """Run one step (``sampled_token_ids``: see :meth:`ModelRunner.execute`). With tensor parallelism
        only rank 0 holds the sampled tokens; the rows the step reads are broadcast to the other ranks on
        their devices first (no host involved)."""
        if self.config.async_scheduling and self.tp_group.world_size > 1:  # else no step has pending tokens
            rows = [r.token_from_row for r in scheduler_output.scheduled if r.token_from_row is not None]
            if rows:
                sampled_token_ids = self.tp_group.broadcast_from_first(sampled_token_ids, max(rows) + 1, self.device)
        return self.runner.execute(scheduler_output, sampled_token_ids)

    def shutdown(self) -> None:
        """Leave the tensor-parallel group (no-op on one device)."""
        destroy_tensor_parallel(self.tp_group)
        self.tp_group = TensorParallelGroup()
