"""What the probe scripts share: the device time of a few GPU calls by CUDA events, and writing their results.

Imported by the scripts next to it (``python benchmarks/attention_probe.py`` puts this folder on the path).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch


def device_time_us(step: Callable[[int], object], iters: int = 20, runs: int = 3, warmup: int = 1) -> float:
    """Median over ``runs`` of the mean device time, in microseconds, of ``step(i)`` over ``iters`` calls.

    ``step`` is called with the call's index ``i`` (``0 .. iters - 1``; e.g. to rotate over weight copies);
    ``warmup`` calls (indices ``0 .. warmup - 1``) and a synchronize come first. Each run is timed by a pair of
    CUDA events around its ``iters`` calls on the current stream.
    """
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    means = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            step(i)
        end.record()
        end.synchronize()
        means.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(means)


def write_results(out_dir: str | Path, name: str, results: object) -> Path:
    """Write ``results`` (JSON-serializable) as ``out_dir/name`` (the folder is created); returns the path."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return path
