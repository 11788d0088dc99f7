"""The Python heap of a process that runs an engine: freeze what the start built, time the collections after.

An engine's start leaves millions of long-lived objects (torch, Triton, the model, compiled kernels). Python's
full (generation 2) collections scan all of them: 0.3 s to 1.5 s each on the machines measured, on the host
thread that launches the steps, so each stalls the device. ``gc.freeze`` moves the objects alive at the end
of the start into a permanent generation the collector no longer scans (vLLM does the same after startup).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


def freeze_heap() -> int:
    """Collect, then move every object alive now out of the collector's reach (``gc.freeze``). Called once an
    engine has started (decode graphs and warm-up done) in a process pagedllm owns: the OpenAI server,
    ``pagedllm bench``, a tensor-parallel worker. Not called by ``LLM(...)``, which runs in the user's
    process: frozen objects are never collected as cycles. Returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@contextmanager
def frozen_heap(enabled: bool = True) -> Iterator[None]:
    """:func:`freeze_heap` for the duration of a block (a benchmark's timed run), then ``gc.unfreeze`` so that
    what the block's engine leaves as cycles can be collected after. ``enabled=False``: does nothing."""
    if not enabled:
        yield
        return
    freeze_heap()
    try:
        yield
    finally:
        gc.unfreeze()


@dataclass
class GcPauses:
    """While active (a context manager), the collections Python ran and the seconds they took, through
    ``gc.callbacks``: ``count``/``seconds`` per generation (0, 1, 2)."""

    count: list[int] = field(default_factory=lambda: [0, 0, 0])
    seconds: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    _started: float = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            generation = info["generation"]
            self.count[generation] += 1
            self.seconds[generation] += time.perf_counter() - self._started

    def summary(self) -> str:
        """``"N full (X s), M younger (Y s)"``."""
        young_n, young_s = self.count[0] + self.count[1], self.seconds[0] + self.seconds[1]
        return f"{self.count[2]} full ({self.seconds[2]:.3f} s), {young_n} younger ({young_s:.3f} s)"
