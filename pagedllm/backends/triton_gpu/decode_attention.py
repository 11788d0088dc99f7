"""Split-K ("flash-decoding") paged attention for the decode requests of a batch.

Each decode request adds one query token. One program handles one (request, KV head, split): the query
heads of that KV head's GQA group are the rows of one tile (padded to 16 for tl.dot), so each key and
value is read once per group and never repeated in memory. A request's visible keys are cut into
``num_splits`` nearly equal runs of tiles, one per split, so a few long requests still fill the GPU; a
reduce kernel then merges the splits' partial results through their log-sum-exp.

Programs are numbered KV head fastest, then split, then request: a request's KV heads run side by side and
together read each cached token's row of all heads (``[num_kv_heads, head_dim]``, contiguous) at about the
same time, rather than one head's 128- or 256-byte slice of it per visit. On an H200 (bf16, Llama-3-8B
heads; RESULTS.md run 54) that took 256 requests of context 2048 from 536 to 498 us a layer and left batch
1000 at context 576 as it was (~560 us).

CUDA-graph safety: the launch grids depend only on tensor shapes (number of decodes, heads, block-table
width); per-request lengths are read on the device. Padding requests (``seq_len`` 0 or 1, block table
row of zeros) read at most block 0 and produce finite garbage rows.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pagedllm.backends.interface import AttentionMetadata, AttentionSpec
from pagedllm.backends.kv_storage import is_fp8
from pagedllm.backends.triton_gpu.attention_common import LOG2_E, attend_tiles, block_d, dot_precision, unmasked_tiles

MAX_SPLITS = 32
"""Most splits per request: past this the reduce and the partial buffers cost more than they bring."""
MIN_TILES_PER_SPLIT = 4
"""A split covers at least this many key tiles of the longest context the block tables can hold."""


@triton.jit
def _decode_split_kernel(
    out_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    qk_scale,
    v_scale,
    num_heads,
    num_kv_heads,
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
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UNMASKED_TILES: tl.constexpr,
    V_SCALED: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = pid % num_kv_heads
    split = (pid // num_kv_heads) % NUM_SPLITS
    req = pid // (num_kv_heads * NUM_SPLITS)
    seq_len = tl.load(seq_lens_ptr + req)
    q_row = tl.load(query_start_loc_ptr + req).to(tl.int64)

    # Visible keys of the one query (position seq_len - 1): [kv_lo, seq_len).
    if SLIDING_WINDOW > 0:
        kv_lo = tl.maximum(seq_len - SLIDING_WINDOW, 0)
    else:
        kv_lo = seq_len * 0
    tile_first = kv_lo // BLOCK_N
    num_tiles = tl.cdiv(seq_len, BLOCK_N) - tile_first
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = tile_first + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, tile_first + num_tiles)
    # Tiles of keys all before seq_len need no mask (inside a sliding window, every tile keeps its mask).
    tile_full_hi = tile_lo if SLIDING_WINDOW > 0 else seq_len // BLOCK_N

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q = tl.load(
        q_ptr + q_row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + (seq_len - 1)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc, m_i, l_i = attend_tiles(
        acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_tables_ptr + req.to(tl.int64) * stride_bt,
        kv_head, tile_lo, tile_full_hi, tile_hi, kv_lo, seq_len, qk_scale, max_blocks,
        stride_cache_block, stride_cache_tok, stride_cache_head,
        HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, SLIDING_WINDOW, SOFT_CAP, DOT_PRECISION, UNMASKED_TILES,
    )  # fmt: skip
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if V_SCALED:  # the cache holds values divided by v_scale (the merge of splits is linear)
        o = o * v_scale
    mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        out_offs = q_row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + out_offs, o.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        mid_rows = (req.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(mid_o_ptr + mid_rows[:, None] * HEAD_DIM + offs_d[None, :], o, mask=mask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(mid_lse_ptr + mid_rows, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    query_start_loc_ptr,
    num_heads,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start_loc_ptr + req).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM
    rows = (req.to(tl.int64) * num_heads + head) * NUM_SPLITS + offs_s
    lse = tl.load(mid_lse_ptr + rows, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # every split empty: output 0
    weights = tl.exp2(lse - lse_max)
    total = tl.sum(weights, 0)
    o = tl.load(mid_o_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                other=0.0)  # fmt: skip
    result = tl.sum(o * weights[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + q_row * stride_ot + head * stride_oh + offs_d, result.to(out_ptr.dtype.element_ty),
             mask=d_mask)  # fmt: skip


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def decode_tiles(head_dim: int, kv_dtype: torch.dtype) -> tuple[int, int, int]:
    """Return the decode kernel's ``(BLOCK_N, num_warps, num_stages)`` on NVIDIA GPUs for a head size and cache
    dtype.

    64-key tiles (32 for heads wider than 128), 4 warps, 2 stages; 2 warps over an 8-bit float cache with
    heads up to 128. On an H200 with Llama-3-8B heads (RESULTS.md runs 21, 55, 56): bf16's tiles were the
    best of 28 choices and read K/V at ~4.2 TB/s; over fp8 at batch 1000 / context 576, 256 / 2048 and
    64 / 4096, 2 warps take 486, 384 and 189 us a layer against 524, 453 and 290 us with 4 (bf16: 561, 497,
    256 us).
    """
    block_n = 64 if head_dim <= 128 else 32
    return block_n, 2 if is_fp8(kv_dtype) and head_dim <= 128 else 4, 2


def choose_num_splits(num_decodes: int, num_kv_heads: int, max_context_tokens: int, block_n: int, num_sms: int) -> int:
    """Return the number of key splits per request, from shapes only (the same for every replay of a graph).

    Enough (request, KV head, split) programs to cover the SMs about twice, but no split shorter than
    ``MIN_TILES_PER_SPLIT`` tiles of the longest context ``max_context_tokens`` the block tables can
    hold; rounded down to a power of two so few kernel variants are compiled.
    """
    num_programs = max(1, num_decodes * num_kv_heads)
    wanted = triton.cdiv(2 * num_sms, num_programs)
    cap = max(1, triton.cdiv(max_context_tokens, block_n) // MIN_TILES_PER_SPLIT)
    n = max(1, min(wanted, cap, MAX_SPLITS))
    return 1 << (n.bit_length() - 1)


def decode_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    spec: AttentionSpec,
    num_splits: int | None = None,
    tiles: tuple[int, int, int] | None = None,
    v_scale: float = 1.0,
) -> None:
    """Attention of the first ``metadata.num_decodes`` requests (one query token each), into ``out``.

    ``out``/``query``: ``[num_tokens, num_heads, head_dim]`` (last dim contiguous); ``kv_cache``:
    ``[2, num_blocks, block_size, num_kv_heads, head_dim]``. ``num_splits``: force the split count (tests);
    None chooses it from shapes. ``tiles``: force ``(BLOCK_N, num_warps, num_stages)`` (benchmarks sweep
    them). ``v_scale``: the output times it (a cache of values divided by it; a key scale is folded into
    ``spec.scale``). Reads no device value on the host, so it can be captured in a CUDA graph.
    """
    num_decodes = metadata.num_decodes
    num_heads, num_kv_heads, head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
    group = num_heads // num_kv_heads
    block_size = kv_cache.shape[2]
    block_tables = metadata.block_tables
    block_n, num_warps, num_stages = tiles or decode_tiles(head_dim, kv_cache.dtype)
    if num_splits is None:
        num_sms = _num_sms(_device_index(query.device)) if query.is_cuda else 4
        num_splits = choose_num_splits(num_decodes, num_kv_heads, block_tables.shape[1] * block_size, block_n,
                                       num_sms)  # fmt: skip
    if num_splits > 1:
        mid_o = torch.empty((num_decodes, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device)
        mid_lse = torch.empty((num_decodes, num_heads, num_splits), dtype=torch.float32, device=query.device)
    else:
        mid_o = mid_lse = out  # unused
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _decode_split_kernel[(num_decodes * num_kv_heads * num_splits,)](
        out, mid_o, mid_lse, query, k_cache, v_cache, block_tables, metadata.seq_lens, metadata.query_start_loc,
        spec.scale * LOG2_E, v_scale, num_heads, num_kv_heads, block_tables.shape[1],
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d(head_dim), BLOCK_N=block_n, BLOCK_SIZE=block_size,
        SLIDING_WINDOW=spec.sliding_window or 0, SOFT_CAP=(spec.logits_soft_cap or 0.0) * LOG2_E, NUM_SPLITS=num_splits,
        DOT_PRECISION=dot_precision(query.dtype), UNMASKED_TILES=unmasked_tiles(query.dtype),
        V_SCALED=v_scale != 1.0, num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True,
    )  # fmt: skip
    if num_splits > 1:
        _decode_reduce_kernel[(num_decodes, num_heads)](
            out, mid_o, mid_lse, metadata.query_start_loc, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4, enable_fp_fusion=True,
        )  # fmt: skip
