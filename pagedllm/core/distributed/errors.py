"""The error a distributed executor raises when one of its workers dies or fails."""

from __future__ import annotations


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker died or raised; the engine cannot go on and must be shut down and rebuilt.

    The message names the rank, the process (or actor) and how it ended, with the worker's traceback when
    it sent one.
    """
