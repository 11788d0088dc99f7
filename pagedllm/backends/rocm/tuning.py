"""The GPUs the ``rocm`` backend runs on and the tiles it launches the shared Triton kernels with on each family.

**CDNA** (Instinct) differs from the NVIDIA GPUs the ``cuda`` tiles were measured on: a wavefront is 64 lanes
(``num_warps=4`` is 256 threads), the LDS is 64 KiB per CU on gfx90a and gfx942 (160 KiB on gfx950) against
Hopper's 228 KiB, and Triton's AMD pipeliner stages loads through the LDS, so AMD's own Triton flash-attention
kernels for CDNA run one stage and larger query tiles (128 x 64, 4 wavefronts) than Hopper's best (64 x 32, 2
stages); these tiles follow them.

**RDNA** (Radeon) runs Triton's wavefronts at 32 lanes with fewer registers to a lane, and CDNA's tiles spill
there: compiled for gfx1100, the 128 x 64 prefill tile spills 1,367 vector registers to scratch memory. Its
tiles are the largest that compile without a spill on both RDNA3 (gfx1100) and RDNA4 (gfx1201) in a sweep of
decode key tiles 16-64 x 2-8 warps and prefill tiles 32-128 x 16-32 x 4-8 warps (``tests/unit/test_rocm_backend.py``
holds them to that): 16-key decode tiles with 4 warps, 64 x 16 prefill tiles with 8. Heads of 256 spill on RDNA3
with every tile tried (they run, slower); RDNA4 takes them without a spill.

Every variant is compile-checked for each listed architecture (fits the LDS, spills no register but where said) and
computed against the float32 reference under Triton's interpreter, but **none is measured on AMD hardware** (none
was available): a sweep there (``benchmarks/attention_probe.py --tuning cdna`` or ``rdna`` checks these tiles and
times them against the others; a ROCm build of torch calls the GPU ``cuda`` too) should replace them. The
element-wise kernels and the few-token MoE GEMVs launch with the kernels' own defaults (per row or per expert; no
tile to fit an LDS).
"""

from __future__ import annotations

import torch

from pagedllm.backends.kv_storage import is_fp8
from pagedllm.backends.triton_gpu.tuning import KernelTuning, W4A16Table, W4A16Tiles

CDNA_ARCHS = {
    "gfx90a": "AMD Instinct MI200 series (CDNA2)",
    "gfx942": "AMD Instinct MI300 series (CDNA3)",
    "gfx950": "AMD Instinct MI350 series (CDNA4)",
}
RDNA_ARCHS = {
    "gfx1100": "AMD Radeon RX 7900 series, Radeon PRO W7900/W7800 (RDNA3)",
    "gfx1101": "AMD Radeon RX 7800/7700 series (RDNA3)",
    "gfx1200": "AMD Radeon RX 9060 series (RDNA4)",
    "gfx1201": "AMD Radeon RX 9070 series, Radeon AI PRO R9700 (RDNA4)",
}
SUPPORTED_ARCHS = {**CDNA_ARCHS, **RDNA_ARCHS}
"""The GPU architectures whose code the kernels are compiled for in the tests, with what they are."""

OCP_FP8_ARCHS = ("gfx950", "gfx1200", "gfx1201")
"""Architectures that convert the OCP 8-bit floats (e4m3, e5m2: what an fp8 KV cache holds) in hardware."""

LDS_BYTES = {"gfx90a": 64 << 10, "gfx942": 64 << 10, "gfx950": 160 << 10, **dict.fromkeys(RDNA_ARCHS, 64 << 10)}
"""Local data share a workgroup may use: the most shared memory one program may take."""


def wave_size(arch: str) -> int:
    """Lanes of a wavefront as Triton compiles for ``arch``: 64 on CDNA, 32 on RDNA."""
    return 64 if arch in CDNA_ARCHS else 32


def cdna_decode_tiles(head_dim: int, kv_dtype: torch.dtype) -> tuple[int, int, int]:
    """``(BLOCK_N, num_warps, num_stages)`` of the split-K decode kernel on CDNA: 64-key tiles (32 for heads wider
    than 128), 4 wavefronts, one stage; 2 wavefronts over an 8-bit cache (gfx950), as on NVIDIA."""
    return (64 if head_dim <= 128 else 32), (2 if is_fp8(kv_dtype) else 4), 1


def cdna_prefill_tiles(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of the prefill kernel on CDNA: 128 x 64 tiles on the matrix
    cores with 4 wavefronts and one stage for heads up to 128; 64 x 32 for wider heads (the query tile and the
    accumulator live in registers: 512 VGPRs per SIMD); 32 x 32 for float32 (exact, not a speed path)."""
    if dtype == torch.float32:
        return 32, 32, 4, 1
    if head_dim > 128:
        return 64, 32, 4, 1
    return 128, 64, 4, 1


CDNA_MOE_TILES = (64, 128, 64, 4, 2)
"""The grouped MoE GEMMs' ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` on CDNA: NVIDIA's tiles with two
stages instead of three, the most AMD's own Triton GEMMs use (on gfx950 each stage holds 24 KiB of bf16 A and B
tiles in LDS; gfx942's compiler keeps these at 16 KiB whatever the depth)."""


def rdna_decode_tiles(head_dim: int, kv_dtype: torch.dtype) -> tuple[int, int, int]:
    """``(BLOCK_N, num_warps, num_stages)`` of the split-K decode kernel on RDNA: 16-key tiles, 4 warps, one
    stage (64-key tiles spill on gfx1100 at heads of 80 and 128)."""
    return 16, 4, 1


def rdna_prefill_tiles(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of the prefill kernel on RDNA: 64 x 16 tiles, 8 warps, one
    stage, every dtype (the one choice of the sweep that spills nothing on gfx1100 at heads of 64-128)."""
    return 64, 16, 8, 1


RDNA_MOE_TILES = (64, 64, 32, 4, 2)
"""The grouped MoE GEMMs' tiles on RDNA: half of CDNA's ``BLOCK_N`` and ``BLOCK_K`` (CDNA's spill on gfx1100)."""


CDNA_W4A16_TILES: W4A16Table = (
    (16, W4A16Tiles(16, 128, 64, 4, 1, swap_ab=True)),
    (32, W4A16Tiles(32, 64, 64, 4, 2, swap_ab=True)),
    (64, W4A16Tiles(64, 64, 64, 4, 2)),
    (1 << 62, W4A16Tiles(128, 128, 64, 8, 2)),
)
"""The 4-bit GEMM's tiles on CDNA: NVIDIA's with one or two pipeline stages and 64-feature steps (NVIDIA's
three- and four-stage tiles need more than the 64 KiB LDS of gfx90a and gfx942 with act-order's per-feature
scales, and gfx950's compiler fails on the largest). From a compile sweep: none spills, each fits the LDS of
every CDNA GPU, with and without act-order. Unmeasured."""

RDNA_W4A16_TILES: W4A16Table = (
    (16, W4A16Tiles(16, 64, 64, 4, 2, swap_ab=True)),
    (32, W4A16Tiles(32, 64, 32, 4, 2, swap_ab=True)),
    (64, W4A16Tiles(64, 64, 32, 4, 2)),
    (1 << 62, W4A16Tiles(128, 64, 64, 8, 2)),
)
"""The 4-bit GEMM's tiles on RDNA: the largest of the compile sweep that spill no register on gfx1100 and gfx1201
with and without act-order (wider tiles spill at 32 lanes a wavefront). Unmeasured."""


def cdna() -> KernelTuning:
    """The ``rocm`` backend's tuning for CDNA GPUs (gfx90a, gfx942, gfx950)."""
    return KernelTuning("cdna", cdna_decode_tiles, cdna_prefill_tiles, CDNA_MOE_TILES, CDNA_W4A16_TILES)


def rdna() -> KernelTuning:
    """The ``rocm`` backend's tuning for RDNA3/RDNA4 GPUs (gfx1100, gfx1101, gfx1200, gfx1201)."""
    return KernelTuning("rdna", rdna_decode_tiles, rdna_prefill_tiles, RDNA_MOE_TILES, RDNA_W4A16_TILES)


def tuning_for(arch: str) -> KernelTuning:
    """The tuning of ``arch``'s family (one of :data:`SUPPORTED_ARCHS`)."""
    return cdna() if arch in CDNA_ARCHS else rdna()
