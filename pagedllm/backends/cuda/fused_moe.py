"""Mixture-of-experts layers on the GPU: two grouped GEMMs over the step's (token, expert) pairs sorted by expert.

``pagedllm.backends.moe.expert_blocks`` sorts the pairs into blocks of ``BLOCK_M`` rows, one expert per block, on
the device (no host sync, so decode graphs capture it). The first GEMM multiplies each pair's token by its
expert's gate|up rows (``[num_pairs, 2 * inter]``), SiLU-and-mul runs on that (the backend's kernel), and the
second GEMM multiplies by the expert's down rows and by the pair's routing weight (``[num_pairs, hidden]``);
the ``top_k`` rows of each token are then summed in float32. Each program computes one block of rows against
one tile of output columns, reading only its expert's weights, so a decode step reads each routed expert once
per column tile. Blocks past the last expert's return at once.

The tiles (:data:`TILES`) are fixed (no compile per batch size once started); the pair count is not specialized on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from pagedllm.backends.cuda.attention_common import dot_precision
from pagedllm.backends.moe import ExpertBlocks, expert_blocks

TILES = (64, 128, 64, 4, 3)
"""BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages of both GEMMs."""


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, sorted_ids_ptr, block_experts_ptr, weights_ptr,
    num_pairs, N, K,
    stride_am, stride_be, stride_bn, stride_cm,
    NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, ROWS_ARE_TOKENS: tl.constexpr, MUL_WEIGHTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert >= NUM_EXPERTS:  # past the last expert's blocks
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + offs_m)
    valid = pairs < num_pairs
    rows = (pairs // TOP_K) if ROWS_ARE_TOKENS else pairs
    rows = tl.where(valid, rows, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_WEIGHTS:
        weights = tl.load(weights_ptr + pairs, mask=valid, other=0.0)
        acc = acc * weights[:, None]
    c_ptrs = c_ptr + tl.where(valid, pairs, 0).to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def _grouped_gemm(a: torch.Tensor, weights: torch.Tensor, blocks: ExpertBlocks, top_k: int, rows_are_tokens: bool,
                  routing: torch.Tensor | None, tiles: tuple[int, ...]) -> torch.Tensor:
    """``out[p] = a[row(p)] @ weights[expert(p)].T`` (times ``routing[p]`` when given) for every pair ``p``:
    ``a``: ``[rows, K]`` (tokens when ``rows_are_tokens``, else pairs); ``weights``: ``[num_experts, N, K]``;
    returns ``[num_pairs, N]`` in ``a``'s dtype."""
    num_experts, n, k = weights.shape
    block_m, block_n, block_k, num_warps, num_stages = tiles
    assert block_m == blocks.block_m
    out = torch.empty(blocks.num_pairs, n, dtype=a.dtype, device=a.device)
    grid = (blocks.block_experts.numel(), triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        a, weights, out, blocks.sorted_ids, blocks.block_experts, routing if routing is not None else out,
        blocks.num_pairs, n, k, a.stride(0), weights.stride(0), weights.stride(1), out.stride(0),
        NUM_EXPERTS=num_experts, TOP_K=top_k, ROWS_ARE_TOKENS=rows_are_tokens, MUL_WEIGHTS=routing is not None,
        DOT_PRECISION=dot_precision(a.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, silu_and_mul: Callable[[torch.Tensor], torch.Tensor],
              tiles: tuple[int, ...] = TILES) -> torch.Tensor:
    """``Backend.fused_moe`` (shapes there) through the two grouped GEMMs; ``silu_and_mul`` is the backend's;
    ``tiles`` as :data:`TILES` (a probe sweeps them)."""
    num_tokens, top_k = topk_ids.shape
    blocks = expert_blocks(topk_ids, w13.shape[0], tiles[0])
    gate_up = _grouped_gemm(x, w13, blocks, top_k, rows_are_tokens=True, routing=None, tiles=tiles)
    down = _grouped_gemm(silu_and_mul(gate_up), w2, blocks, top_k, rows_are_tokens=False,
                         routing=topk_weights.reshape(-1).to(torch.float32).contiguous(), tiles=tiles)
    return down.view(num_tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)


def takes(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the kernels take these operands: one dtype, contiguous rows (the last dimension unit-strided)."""
    return (x.dtype == w13.dtype == w2.dtype and x.stride(-1) == 1 and w13.stride(-1) == 1 and w2.stride(-1) == 1
            and x.dim() == 2 and x.shape[0] > 0)
