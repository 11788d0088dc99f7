"""The ``ray`` executor: every rank is a Ray actor, placed by Ray on an existing cluster, so a model can span
machines (``ray start --head`` on one, ``ray start --address HEAD:6379`` on the others, then run pagedllm
on any of them). Without a running cluster, ``ray.init()`` starts a local one.

Ranks reserve one bundle each of a placement group (one ``GPU`` per rank for device backends, one ``CPU``
for ``cpu``); rank 0 serves the ``torch.distributed`` store on its node. Each step the
:class:`SchedulerOutput` is put in Ray's object store once and every actor runs it; rank 0 returns the
logits (on the host: the engine samples on the CPU with this executor). A dead actor surfaces as
:class:`WorkerFailedError` within :data:`POLL_INTERVAL_S` plus Ray's own failure detection.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

import torch

from pagedllm.backends.interface import Backend
from pagedllm.core.config import EngineConfig, ModelConfig
from pagedllm.core.distributed.errors import WorkerFailedError
from pagedllm.core.distributed.parallel_state import DistributedInit, free_port
from pagedllm.core.executor import Executor
from pagedllm.core.model_runner import ModelRunnerOutput
from pagedllm.core.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
"""How often a waiting driver re-checks its actors."""
ERROR_GRACE_S = 2.0
"""After one rank fails, how long to wait for the others' errors (a dead actor explains a peer's error)."""
PLACEMENT_TIMEOUT_S = 60.0
"""How long to wait for Ray to reserve the ranks' resources before giving up."""
SHUTDOWN_TIMEOUT_S = 10.0


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            "distributed_executor_backend='ray' needs Ray: pip install 'pagedllm[distributed]' (or 'ray>=2.9')"
        ) from exc
    return ray


class RayWorkerActor:
    """One rank inside a Ray actor process (wrapped with ``ray.remote`` at run time)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.worker: Any = None

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port on it, for the store rank 0 will serve."""
        import ray

        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def pid(self) -> int:
        """The actor's process id."""
        return os.getpid()

    def start(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        backend_cls: type[Backend],
        block_size: int,
        world_size: int,
        init: DistributedInit,
    ) -> None:
        """Join the group and load this rank's shard of the model."""
        from pagedllm.core.worker import Worker

        self.worker = Worker(config, model_config, backend_cls, block_size, self.rank, world_size, init)

    def call(self, method: str, *args: object) -> object:
        """Run a Worker method (``bytes_per_block``, ``kv_cache_budget_bytes``, ``initialize_cache``); after
        ``initialize_cache`` (the start is over) this actor's process freezes its heap
        (:func:`~pagedllm.core.heap.freeze_heap`)."""
        from pagedllm.core.heap import freeze_heap

        value = getattr(self.worker, method)(*args)
        if method == "initialize_cache":
            freeze_heap()
        return value

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        """Run one step; rank 0 returns its logits moved to the host, the others None."""
        output = self.worker.execute(scheduler_output)
        if self.rank != 0:
            return None
        prompt = output.prompt_logprobs
        return ModelRunnerOutput(output.request_ids, output.logits.cpu(), None if prompt is None else prompt.wait())

    def shutdown(self) -> None:
        """Leave the process group."""
        if self.worker is not None:
            self.worker.shutdown()


def _release(actors: list[Any], placement_group: Any) -> None:
    """Ask every actor to leave, then kill them and free their placement group (also run at exit)."""
    ray = _import_ray()
    if not ray.is_initialized():
        return
    refs = [actor.shutdown.remote() for actor in actors]
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_TIMEOUT_S)
    for actor in actors:
        ray.kill(actor)
    if placement_group is not None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(placement_group)


class RayExecutor(Executor):
    """Tensor parallelism with one Ray actor per rank; the driver process holds no rank."""

    def __init__(
        self, config: EngineConfig, model_config: ModelConfig, backend_cls: type[Backend], block_size: int
    ) -> None:
        ray = _import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            logger.info("connecting to the Ray cluster (RAY_ADDRESS or the latest local one), else starting one")
            ray.init()
        self.world_size = world_size = config.tensor_parallel_size
        self._shares_host_memory = backend_cls().device_count() is None
        self._failure: str | None = None
        self._actors: list[Any] = []
        # Ray's name for the accelerator resource it schedules on; the cpu backend needs a core per rank.
        resource = "CPU" if backend_cls.device_type == "cpu" else "GPU"
        available = ray.cluster_resources().get(resource, 0)
        if available < world_size:
            raise ValueError(
                f"tensor_parallel_size={world_size} needs {world_size} {resource} in the Ray cluster, which has "
                f"{available:g}: add nodes (ray start --address=HEAD:6379) or lower tensor_parallel_size"
            )
        self._placement_group = placement_group([{resource: 1}] * world_size, strategy="PACK")
        self._finalizer = weakref.finalize(self, _release, self._actors, self._placement_group)
        try:
            ray.get(self._placement_group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError as exc:
            self.shutdown()
            raise RuntimeError(
                f"Ray could not reserve {world_size} x {resource} within {PLACEMENT_TIMEOUT_S:.0f} s "
                f"(available now: {ray.available_resources().get(resource, 0):g}); free them or lower "
                f"tensor_parallel_size"
            ) from exc
        remote_cls = ray.remote(RayWorkerActor)
        amount = {"num_cpus": 1} if resource == "CPU" else {"num_cpus": 0, "num_gpus": 1}
        try:
            for rank in range(world_size):
                strategy = PlacementGroupSchedulingStrategy(self._placement_group, placement_group_bundle_index=rank)
                self._actors.append(remote_cls.options(scheduling_strategy=strategy, **amount).remote(rank))
            host, port = self._get([self._actors[0].rendezvous_address.remote()], "start-up")[0]
            init = DistributedInit(host, port)
            self._get([actor.start.remote(config, model_config, backend_cls, block_size, world_size, init)
                       for actor in self._actors], "start-up")
            self.worker_pids = self._get([actor.pid.remote() for actor in self._actors], "start-up")
        except BaseException:
            self.shutdown()
            raise
        self.device = torch.device("cpu")  # rank 0's logits arrive on the host
        logger.info("tensor parallel (ray): %d actors, pids %s", world_size, self.worker_pids)

    # ------------------------------------------------------------------ Executor
    def bytes_per_block(self) -> int:
        """See :class:`Executor`."""
        return self._get([self._actors[0].call.remote("bytes_per_block")], "bytes_per_block")[0]

    def kv_cache_budget_bytes(self, max_num_batched_tokens: int) -> int:
        """See :class:`Executor`: the smallest budget among ranks (split when ranks share host memory)."""
        refs = [actor.call.remote("kv_cache_budget_bytes", max_num_batched_tokens) for actor in self._actors]
        budget = min(self._get(refs, "kv_cache_budget_bytes"))
        if self._shares_host_memory:  # e.g. cpu ranks: they may share one host's memory
            budget //= self.world_size
        return budget

    def initialize_cache(self, num_blocks: int) -> None:
        """See :class:`Executor`."""
        self._get([actor.call.remote("initialize_cache", num_blocks) for actor in self._actors], "initialize_cache")

    def execute(self, scheduler_output: SchedulerOutput, sampled_token_ids: torch.Tensor | None = None
                ) -> ModelRunnerOutput:
        """See :class:`Executor`: every actor runs the step; rank 0's logits come back."""
        if sampled_token_ids is not None:  # rank 0 is an actor: the driver's device is not its own
            raise ValueError("the ray executor takes input tokens from the host only: asynchronous scheduling "
                             "with tensor parallelism needs the mp executor")
        ray = _import_ray()
        ref = ray.put(scheduler_output)
        return self._get([actor.execute.remote(ref) for actor in self._actors], "execute")[0]

    def shutdown(self) -> None:
        """Stop the actors and free their placement group (the Ray cluster itself is left running)."""
        self._finalizer()

    # ------------------------------------------------------------------ waiting
    def _get(self, refs: list[Any], what: str) -> list[Any]:
        """Wait for one call per rank, in rank order; raises :class:`WorkerFailedError` naming every rank that
        died or raised."""
        ray = _import_ray()
        if self._failure is not None:
            raise WorkerFailedError(self._failure)
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending = list(refs)
        errors: dict[int, str] = {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=ERROR_GRACE_S if errors else POLL_INTERVAL_S)
            if not ready and errors:
                break
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    errors[rank_of[ref]] = f"actor died: {exc}"
                except ray.exceptions.RayError as exc:
                    errors[rank_of[ref]] = f"raised: {exc}"
        if errors:
            died = [rank for rank, text in errors.items() if text.startswith("actor died")]
            lines = [f"rank {rank} {errors[rank]}" for rank in sorted(errors, key=lambda r: (r not in died, r))]
            self._failure = f"tensor-parallel worker failure during {what}:\n" + "\n".join(lines)
            logger.error("%s", self._failure)
            raise WorkerFailedError(
                f"{self._failure}\nshut the engine down (LLMEngine.shutdown()) and build a new one"
            )
        return ray.get(refs)
