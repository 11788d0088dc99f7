"""Tiny checkpoints for the engine-level tests, built once and kept in a cache directory.

Building one takes about 10 s (a tokenizer is trained), so each is kept under a name that holds every
input of the build (architecture, head size, pagedllm and transformers versions) and is published with
an atomic rename: concurrent runs never see a half-written checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# arch -> (num_attention_heads, num_key_value_heads); the hidden size is heads * head size
ARCH_HEADS: dict[str, tuple[int, int]] = {"llama": (4, 2), "qwen2": (4, 1), "mistral": (4, 2), "qwen3": (4, 2)}
"""GQA Llama, MQA Qwen2, GQA Mistral with a sliding window, GQA Qwen3 with per-head q/k norms (from
``pagedllm.testing.checkpoints``)."""


def cached_checkpoint(root: Path, arch: str, head_dim: int) -> Path:
    """Return a tiny random ``arch`` checkpoint with heads of ``head_dim`` under ``root``, building it unless
    it is already there. ``arch`` is a key of :data:`ARCH_HEADS`."""
    import transformers

    from pagedllm.testing.checkpoints import build_checkpoint
    from pagedllm.version import __version__

    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{arch}-h{head_dim}-pagedllm{__version__}-transformers{transformers.__version__}"
    if (path / ".complete").is_file():
        return path
    heads, kv_heads = ARCH_HEADS[arch]
    building = root / f".{path.name}.{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    build_checkpoint(building, arch, hidden_size=heads * head_dim, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=128)
    (building / ".complete").touch()
    try:
        building.rename(path)
    except OSError:  # another process published it first
        shutil.rmtree(building, ignore_errors=True)
    return path


def cached_fp8_kv_checkpoint(root: Path, head_dim: int) -> Path:
    """Return the tiny GQA Llama of :func:`cached_checkpoint` stored as an ``-FP8-KV`` checkpoint (llm-compressor's
    FP8 with KV-cache scales: e4m3 weights, static input scales and per-layer ``k_scale``/``v_scale``, calibrated
    through transformers), building it under ``root`` unless it is already there."""
    import transformers

    from pagedllm.testing.fp8_checkpoints import write_fp8_checkpoint
    from pagedllm.version import __version__

    source = cached_checkpoint(root, "llama", head_dim)
    path = root / f"llama-h{head_dim}-fp8kv-pagedllm{__version__}-transformers{transformers.__version__}"
    if (path / ".complete").is_file():
        return path / "fp8"
    building = root / f".{path.name}.{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    write_fp8_checkpoint(source, building, "compressed-tensors-static", kv_cache_scales=True)
    (building / ".complete").touch()
    try:
        building.rename(path)
    except OSError:  # another process published it first
        shutil.rmtree(building, ignore_errors=True)
    return path / "fp8"
