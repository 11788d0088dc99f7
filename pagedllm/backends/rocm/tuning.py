"""The tiles the ``rocm`` backend launches the shared Triton kernels with on AMD CDNA GPUs.

CDNA differs from the NVIDIA GPUs the ``cuda`` tiles were measured on: a wavefront is 64 lanes (``num_warps=4``
is 256 threads), the LDS is 64 KiB per CU on gfx90a and gfx942 (160 KiB on gfx950) against Hopper's 228 KiB,
and Triton's AMD pipeliner stages loads through the LDS, so the AMD flash-attention kernels run one stage
(``num_stages=1``) and larger query tiles (128 x 64, 4 wavefronts) than Hopper's best (64 x 32, 2 stages).
These choices follow AMD's own Triton attention kernels for CDNA. They are compile-checked for gfx90a, gfx942
and gfx950 (every variant fits the LDS and spills no register: ``tests/unit/test_rocm_backend.py``) and computed
against the float32 reference under Triton's interpreter, but **not measured on AMD hardware** (none was
available): a sweep there (``benchmarks/attention_probe.py`` sweeps the attention tiles; a ROCm build of torch
calls the GPU ``cuda`` too) should replace them. The element-wise kernels and the few-token MoE GEMVs launch with
the kernels' own defaults (per row or per expert; no tile to fit an LDS).
"""

from __future__ import annotations

import torch

from pagedllm.backends.kv_storage import is_fp8
from pagedllm.backends.triton_gpu.tuning import KernelTuning

LDS_BYTES = {"gfx90a": 64 << 10, "gfx942": 64 << 10, "gfx950": 160 << 10}
"""Local data share per compute unit: the most shared memory one program may use."""


def cdna_decode_tiles(head_dim: int, kv_dtype: torch.dtype) -> tuple[int, int, int]:
    """``(BLOCK_N, num_warps, num_stages)`` of the split-K decode kernel: 64-key tiles (32 for heads wider than
    128), 4 wavefronts, one stage; 2 wavefronts over an 8-bit cache (unclaimed today) as on NVIDIA."""
    return (64 if head_dim <= 128 else 32), (2 if is_fp8(kv_dtype) else 4), 1


def cdna_prefill_tiles(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of the prefill kernel: 128 x 64 tiles on the matrix cores
    with 4 wavefronts and one stage for heads up to 128; 64 x 32 for wider heads (the query tile and the
    accumulator live in registers: 512 VGPRs per SIMD); 32 x 32 for float32 (exact, not a speed path)."""
    if dtype == torch.float32:
        return 32, 32, 4, 1
    if head_dim > 128:
        return 64, 32, 4, 1
    return 128, 64, 4, 1


CDNA_MOE_TILES = (64, 128, 64, 4, 2)
"""The grouped MoE GEMMs' ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``: NVIDIA's tiles with two stages
instead of three, the most AMD's own Triton GEMMs use (on gfx950 each stage holds 24 KiB of bf16 A and B tiles
in LDS; gfx942's compiler keeps these at 16 KiB whatever the depth)."""


def cdna() -> KernelTuning:
    """The ``rocm`` backend's tuning for CDNA GPUs (gfx90a, gfx942, gfx950)."""
    return KernelTuning("cdna", cdna_decode_tiles, cdna_prefill_tiles, CDNA_MOE_TILES)
