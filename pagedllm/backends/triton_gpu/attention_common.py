"""The inner loop shared by the decode and prefill attention kernels, and host-side tile helpers.

Invariant of :func:`attend_tiles`: after visiting key tiles ``[tile_lo, tile_hi)``, ``acc / l_i`` is the
softmax-weighted sum of the values of every key visited so far that a query row may see, and ``m_i`` is
the running maximum of that row's scores (in log2 units); rows that saw no key keep ``m_i = -inf``,
``l_i = 0``, ``acc = 0``. Keys are read through the request's block table, one token row at a time, so a
tile of ``BLOCK_N`` keys may span several KV blocks (or part of one) whatever the block size.

KV cache layout (see ``CudaBackend.kv_cache_shape``): ``[2, num_blocks, block_size, num_kv_heads,
head_dim]``; the kernels get the key and value halves as two pointers with the same strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
"""Scores are kept in log2 units (``scale * log2(e)`` folded into one multiply) so ``exp2`` can be used."""


def block_d(head_dim: int) -> int:
    """Return the padded head dimension the kernels tile with: a power of two, at least 16 (tl.dot's K)."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str | None:
    """Return tl.dot's input precision: full fp32 ("ieee") for float32 inputs, so results match the fp32
    reference instead of TF32's 10-bit mantissa; for fp16/bf16 (where it changes nothing) None, the target's
    default (AMD's compiler refuses "tf32" on every CDNA but gfx942; NVIDIA's defaults to it)."""
    return "ieee" if dtype == torch.float32 else None


def unmasked_tiles(dtype: torch.dtype) -> bool:
    """Whether the kernels give fully visible key tiles a loop without masks: for fp16/bf16 (the speed
    path). fp32 keeps one masked loop: Triton 3.6 fails to compile the two loops for some fp32 tile shapes
    on sm_90 (a ``TritonGPURemoveLayoutConversions`` failure; MQA, head size 64, 32x32 tiles)."""
    return dtype != torch.float32


FP16_MAX = tl.constexpr(65504.0)
"""Largest finite float16: bfloat16 queries over an 8-bit float cache are clamped to it (see
:func:`_dot_operand`)."""


@triton.jit
def _dot_operand(q, k_cache_ptr):
    """``q`` in the dtype the tiles' products run in: float16 when ``q`` is bfloat16 and the cache holds
    8-bit floats, else ``q`` as it is.

    Every e4m3 or e5m2 value is exact in float16, and one instruction converts two of them (``cvt.rn.f16x2``);
    reaching bfloat16 takes three more per pair through float32 on sm_90's conversion unit, which then
    bounds the decode kernel (16 conversions per clock per SM: ~0.4 ms a layer at batch 1000, context 576,
    against ~0.3 ms to read the fp8 cache). float16 also keeps more of the query's and the probabilities'
    bits than bfloat16; queries beyond its range are clamped to +-65504 rather than becoming infinite.
    """
    if k_cache_ptr.dtype.element_ty.is_fp8() and q.dtype == tl.bfloat16:
        return tl.clamp(q.to(tl.float32), -FP16_MAX, FP16_MAX).to(tl.float16)
    else:
        return q


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    kv_head,
    tile,
    kv_lo,
    kv_hi,
    qk_scale,
    max_blocks,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One key tile of :func:`attend_tiles`; ``MASKED=False`` when every row may see every key of it."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    page = offs_n // BLOCK_SIZE
    if MASKED:
        n_valid = (offs_n >= kv_lo) & (offs_n < kv_hi)
        # A bad or padded row can never read past its block-table row: such keys fall back to block 0.
        block_ids = tl.load(block_table_ptr + page, mask=n_valid & (page < max_blocks), other=0).to(tl.int64)
        kv_mask = n_valid[:, None] & d_mask[None, :]
    else:
        block_ids = tl.load(block_table_ptr + page).to(tl.int64)
        kv_mask = (offs_n >= 0)[:, None] & d_mask[None, :]
    kv_offs = block_ids * stride_cache_block + (offs_n % BLOCK_SIZE) * stride_cache_tok + kv_head * stride_cache_head
    kv_ptrs = kv_offs[:, None] + offs_d[None, :]
    if MASKED or BLOCK_D != HEAD_DIM:
        k = tl.load(k_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0).to(q.dtype)
    else:
        k = tl.load(k_cache_ptr + kv_ptrs).to(q.dtype)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    if SOFT_CAP > 0:  # cap * tanh(s / cap) in log2 units (SOFT_CAP is the cap times log2(e)), tanh through exp
        scores = SOFT_CAP - (2.0 * SOFT_CAP) / (tl.exp(scores * (2.0 / SOFT_CAP)) + 1.0)
    if MASKED:
        allowed = n_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if SLIDING_WINDOW > 0:
            allowed = allowed & (offs_n[None, :] > q_pos[:, None] - SLIDING_WINDOW)
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # Rows that have seen no visible key yet keep m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:  # every score is finite, so is the new maximum
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED or BLOCK_D != HEAD_DIM:
        v = tl.load(v_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0).to(q.dtype)
    else:
        v = tl.load(v_cache_ptr + kv_ptrs).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def attend_tiles(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    kv_head,
    tile_lo,
    tile_full_hi,
    tile_hi,
    kv_lo,
    kv_hi,
    qk_scale,
    max_blocks,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UNMASKED_TILES: tl.constexpr,
):
    """Online-softmax attention of query rows ``q`` over key tiles ``[tile_lo, tile_hi)`` of one request.

    ``acc``: ``[BLOCK_M, BLOCK_D]`` fp32; ``m_i``/``l_i``: ``[BLOCK_M]`` fp32 running max / sum;
    ``q``: ``[BLOCK_M, BLOCK_D]`` (padded columns are 0); ``q_pos``: ``[BLOCK_M]`` int32 position of each
    row; ``block_table_ptr``: the request's row of the block tables. Keys at positions outside
    ``[kv_lo, kv_hi)``, after the row's position or outside its sliding window are masked. ``SOFT_CAP`` (0: none)
    soft-caps the scores, in the log2 units of ``qk_scale`` (the cap times log2(e)). The caller
    promises that the tiles before ``tile_full_hi`` (clamped to the range) hold only keys every row may see:
    with ``UNMASKED_TILES`` they run without masks (see :func:`unmasked_tiles`). Returns the updated
    ``(acc, m_i, l_i)``.
    """
    q = _dot_operand(q, k_cache_ptr)
    full_hi = tile_lo
    if UNMASKED_TILES:
        full_hi = tl.minimum(tl.maximum(tile_full_hi, tile_lo), tile_hi)
        for tile in range(tile_lo, full_hi):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head, tile, kv_lo, kv_hi,
                qk_scale, max_blocks, stride_cache_block, stride_cache_tok, stride_cache_head,
                HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, SLIDING_WINDOW, SOFT_CAP, DOT_PRECISION, False,
            )  # fmt: skip
    for tile in range(full_hi, tile_hi):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head, tile, kv_lo, kv_hi,
            qk_scale, max_blocks, stride_cache_block, stride_cache_tok, stride_cache_head,
            HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, SLIDING_WINDOW, SOFT_CAP, DOT_PRECISION, True,
        )  # fmt: skip
    return acc, m_i, l_i
