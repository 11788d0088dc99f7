"""The tiles a GPU backend launches the shared Triton kernels with.

The kernels are the same Triton programs on every GPU; what suits one family does not suit another (NVIDIA's
warps are 32 lanes and Hopper's shared memory 228 KiB per SM; AMD CDNA's wavefronts are 64 lanes and its LDS
64 KiB per CU, and its Triton pipeliner stages loads through LDS). Each backend therefore hands the kernels a
:class:`KernelTuning`; :func:`nvidia` gives the ``cuda`` backend's, measured on an H100 and an H200.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

DecodeTiles = Callable[[int, torch.dtype], tuple[int, int, int]]
"""``(head_dim, kv_cache_dtype) -> (BLOCK_N, num_warps, num_stages)`` of the split-K decode kernel."""
PrefillTiles = Callable[[int, torch.dtype], tuple[int, int, int, int]]
"""``(head_dim, query_dtype) -> (BLOCK_M, BLOCK_N, num_warps, num_stages)`` of the varlen prefill kernel."""
@dataclass(frozen=True)
class W4A16Tiles:
    """One launch's tiles: ``block_k`` is the longest step taken; it is shortened to divide ``group_size``
    (:func:`step_length`). ``swap_ab``: each tile is computed as ``W x^T``, the dequantized weight the product's
    first operand (few rows: the weight then fills the tensor cores' tall side)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    swap_ab: bool = False


W4A16Table = tuple[tuple[int, W4A16Tiles], ...]
"""``(largest row count, tiles)`` by the rows of a step, first match: the 4-bit GEMM's tiles
(``pagedllm.backends.triton_gpu.w4a16_linear``)."""


@dataclass(frozen=True)
class KernelTuning:
    """One GPU family's tiles for the attention and mixture-of-experts kernels.

    ``decode`` and ``prefill`` are called at every attention launch (host side, cheap); ``moe`` is the grouped
    GEMMs' ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``; ``w4a16`` the 4-bit GEMM's tiles by step rows
    (:data:`W4A16Table`). Tiles depend on shapes and dtypes only, so a captured graph replays the variant it was
    captured with.
    """

    name: str
    decode: DecodeTiles
    prefill: PrefillTiles
    moe: tuple[int, int, int, int, int]
    w4a16: W4A16Table


def nvidia() -> KernelTuning:
    """The ``cuda`` backend's tuning: the kernel modules' own defaults (imports them, and so triton)."""
    from pagedllm.backends.triton_gpu import fused_moe, w4a16_linear
    from pagedllm.backends.triton_gpu.decode_attention import decode_tiles
    from pagedllm.backends.triton_gpu.prefill_attention import prefill_tiles

    return KernelTuning("nvidia", decode_tiles, prefill_tiles, fused_moe.TILES, w4a16_linear.TILES)
