"""The errors of distributed executors: a worker that died or failed, a call they cannot serve."""

from __future__ import annotations


def refuse_sampled_tokens(sampled_token_ids: object) -> None:
    """Raise ValueError for device-side input tokens: the other ranks cannot read the driver's device
    (asynchronous scheduling needs ``tensor_parallel_size`` 1)."""
    if sampled_token_ids is not None:
        raise ValueError("tensor-parallel executors take input tokens from the host only: asynchronous "
                         "scheduling needs tensor_parallel_size 1")


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker died or raised; the engine cannot go on and must be shut down and rebuilt.

    The message names the rank, the process (or actor) and how it ended, with the worker's traceback when
    it sent one.
    """
