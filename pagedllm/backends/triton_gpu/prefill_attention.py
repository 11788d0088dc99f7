"""Varlen causal flash attention over the paged cache for the prefill requests of a batch.

One program handles one tile of query tokens of one prefill request for one KV head. The rows of the tile
are (token, query head of the GQA group) pairs, ``BLOCK_Q = BLOCK_M // group`` tokens times ``group``
heads, so each key/value tile read through the block table serves the whole group. Every key, whether it
was cached by an earlier step or written by this one, is read from the cache (``write_kv_cache`` ran
first), so a prefill over cached prefix blocks is the same code as a fresh one.

Host values used: ``metadata.max_query_len`` sizes the grid (tiles past a request's own length exit at
once). Prefill steps are not captured in CUDA graphs, so this is allowed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.backends.interface import AttentionMetadata, AttentionSpec
from pagedllm.backends.triton_gpu.attention_common import LOG2_E, attend_tiles, block_d, dot_precision, unmasked_tiles


# ``first_request`` (the number of decodes) changes every step: unspecialized, one compiled variant serves
# all its values instead of a fresh compile mid-run the first time it is 1, a multiple of 16, or neither.
@triton.jit(do_not_specialize=["first_request"])
def _prefill_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_loc_ptr,
    first_request,
    qk_scale,
    v_scale,
    max_blocks,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UNMASKED_TILES: tl.constexpr,
    V_SCALED: tl.constexpr,
):
    # Last tiles first: under the causal mask they see the most keys, so the long programs start early.
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    req = first_request + tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    tile_start = q_tile * BLOCK_Q
    if tile_start < q_len:
        context_len = tl.load(context_lens_ptr + req)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        tokens = tile_start + offs_m // GROUP  # [BLOCK_M] token index within the request's chunk
        heads = kv_head * GROUP + offs_m % GROUP
        row_mask = (offs_m < BLOCK_Q * GROUP) & (tokens < q_len)
        mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        rows = (q_start + tokens).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=mask,
                    other=0.0)  # fmt: skip
        q_pos = context_len + tokens
        # Keys visible to some row of the tile: [kv_lo, kv_hi), kv_hi one past the tile's last position.
        kv_hi = context_len + tl.minimum(tile_start + BLOCK_Q, q_len)
        if SLIDING_WINDOW > 0:
            kv_lo = tl.maximum(context_len + tile_start - SLIDING_WINDOW + 1, 0)
        else:
            kv_lo = context_len * 0
        # Key tiles up to the tile's first position are visible to every row: no causal mask there.
        tile_full_hi = kv_lo // BLOCK_N if SLIDING_WINDOW > 0 else (context_len + tile_start + 1) // BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, m_i, l_i = attend_tiles(
            acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_tables_ptr + req.to(tl.int64) * stride_bt,
            kv_head, kv_lo // BLOCK_N, tile_full_hi, tl.cdiv(kv_hi, BLOCK_N), kv_lo, kv_hi, qk_scale, max_blocks,
            stride_cache_block, stride_cache_tok, stride_cache_head,
            HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, SLIDING_WINDOW, SOFT_CAP, DOT_PRECISION, UNMASKED_TILES,
        )  # fmt: skip
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        if V_SCALED:  # the cache holds values divided by v_scale
            o = o * v_scale
        out_offs = rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + out_offs, o.to(out_ptr.dtype.element_ty), mask=mask)


def prefill_tiles(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """Return ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of the prefill kernel on NVIDIA GPUs for a head size and
    query dtype.

    fp16/bf16: 64x32 tiles on tensor cores, 4 warps (8 for heads wider than 128), 2 stages. On an H200, prompts of
    512 tokens, Llama-3-8B heads: 158 us per layer for 16 prompts against 206 us with 128x64 tiles and
    8 warps, the best of 26 choices (``benchmarks/attention_probe.py``). fp32 (exact, not a speed path)
    uses 32x32 tiles so its shared memory fits every GPU.
    """
    if dtype == torch.float32:
        return 32, 32, 4, 2
    return 64, 32, 4 if head_dim <= 128 else 8, 2


def prefill_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    spec: AttentionSpec,
    block_m: int | None = None,
    tiles: tuple[int, int, int] | None = None,
    v_scale: float = 1.0,
) -> None:
    """Attention of the prefill requests (those after the first ``metadata.num_decodes``), into ``out``.

    ``out``/``query``: ``[num_tokens, num_heads, head_dim]`` (last dim contiguous); ``kv_cache``:
    ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` already holding this step's keys and values.
    ``block_m``: force the query-tile row count (tests); None picks it from the head size. ``tiles``:
    force ``(BLOCK_N, num_warps, num_stages)`` (benchmarks sweep them); None: :func:`prefill_tiles`.
    ``v_scale``: the output times it (a cache of values divided by it; a key scale is folded into
    ``spec.scale``).
    """
    num_decodes = metadata.num_decodes
    num_prefills = metadata.num_requests - num_decodes
    num_kv_heads, head_dim = spec.num_kv_heads, spec.head_dim
    group = spec.num_heads // num_kv_heads
    tile_m, block_n, num_warps, num_stages = prefill_tiles(head_dim, query.dtype)
    block_n, num_warps, num_stages = tiles or (block_n, num_warps, num_stages)
    tile_m = max(block_m or tile_m, triton.next_power_of_2(group), 16)
    block_q = tile_m // group  # tokens per tile; rows past block_q * group are idle when group is not 2^k
    max_query_len = metadata.max_query_len
    if max_query_len <= 0:  # not filled in: the longest possible chunk
        max_query_len = query.shape[0] - num_decodes
    block_tables = metadata.block_tables
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    grid = (triton.cdiv(max_query_len, block_q), num_kv_heads, num_prefills)
    _prefill_kernel[grid](
        out, query, k_cache, v_cache, block_tables, metadata.context_lens, metadata.query_start_loc,
        num_decodes, spec.scale * LOG2_E, v_scale, block_tables.shape[1],
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=tile_m, BLOCK_Q=block_q, BLOCK_D=block_d(head_dim),
        BLOCK_N=block_n, BLOCK_SIZE=kv_cache.shape[2], SLIDING_WINDOW=spec.sliding_window or 0,
        SOFT_CAP=(spec.logits_soft_cap or 0.0) * LOG2_E,
        DOT_PRECISION=dot_precision(query.dtype), UNMASKED_TILES=unmasked_tiles(query.dtype),
        V_SCALED=v_scale != 1.0, num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True,
    )  # fmt: skip
