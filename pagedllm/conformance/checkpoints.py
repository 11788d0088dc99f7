"""Tiny checkpoints for the engine-level tests, built once and kept in a cache directory.

Building one takes about 10 s (a tokenizer is trained), so each is kept under a name that holds every
input of the build (architecture, head size, pagedllm and transformers versions) and is published with
an atomic rename: concurrent runs never see a half-written checkpoint.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

# arch -> (num_attention_heads, num_key_value_heads); the hidden size is heads * head size
ARCH_HEADS: dict[str, tuple[int, int]] = {"llama": (4, 2), "qwen2": (4, 1), "mistral": (4, 2), "qwen3": (4, 2),
                                          "gemma2": (4, 2), "gemma3": (4, 2), "mixtral": (4, 2), "qwen3_moe": (4, 2),
                                          "qwen2_moe": (4, 2)}
"""GQA Llama, MQA Qwen2, GQA Mistral with a sliding window, GQA Qwen3 with per-head q/k norms, Gemma 2 (attention
scores soft-capped, sliding and full layers), Gemma 3 (sliding and full layers with their own ropes, GeGLU through
``Backend.gelu_and_mul``), and three mixtures
of experts through ``Backend.fused_moe``: Mixtral (8 experts, 2 per token), Qwen3-MoE (8 experts, 3 per token,
one dense layer) and Qwen2-MoE (a gated shared expert beside the routed ones) (from
``pagedllm.testing.checkpoints``)."""


def cached_checkpoint(root: Path, arch: str, head_dim: int) -> Path:
    """Return a tiny random ``arch`` checkpoint with heads of ``head_dim`` under ``root``, building it unless
    it is already there. ``arch`` is a key of :data:`ARCH_HEADS`."""
    from pagedllm.testing.checkpoints import build_checkpoint

    heads, kv_heads = ARCH_HEADS[arch]
    return _cached(root, f"{arch}-h{head_dim}", lambda building: build_checkpoint(
        building, arch, hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, intermediate_size=128))


def cached_fp8_kv_checkpoint(root: Path, head_dim: int) -> Path:
    """Return the tiny GQA Llama of :func:`cached_checkpoint` stored as an ``-FP8-KV`` checkpoint (llm-compressor's
    FP8 with KV-cache scales: e4m3 weights, static input scales and per-layer ``k_scale``/``v_scale``, calibrated
    through transformers), building it under ``root`` unless it is already there."""
    from pagedllm.testing.fp8_checkpoints import write_fp8_checkpoint

    source = cached_checkpoint(root, "llama", head_dim)
    path = _cached(root, f"llama-h{head_dim}-fp8kv", lambda building: write_fp8_checkpoint(
        source, building, "compressed-tensors-static", kv_cache_scales=True))
    return path / "fp8"


def _cached(root: Path, name: str, build: Callable[[Path], object]) -> Path:
    """``root / name`` (with the pagedllm and transformers versions appended), made by ``build(directory)`` in a
    directory of this process and published by an atomic rename unless a complete one is already there."""
    import transformers

    from pagedllm.version import __version__

    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}-pagedllm{__version__}-transformers{transformers.__version__}"
    if (path / ".complete").is_file():
        return path
    building = root / f".{path.name}.{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    build(building)
    (building / ".complete").touch()
    try:
        building.rename(path)
    except OSError:  # another process published it first
        shutil.rmtree(building, ignore_errors=True)
    return path
