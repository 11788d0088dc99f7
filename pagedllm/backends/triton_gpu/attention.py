"""Paged attention of a mixed batch: the decode requests through split-K, the prefills through varlen
flash attention, both reading keys and values through the block tables."""

from __future__ import annotations

import torch

from pagedllm.backends.interface import AttentionMetadata, AttentionSpec
from pagedllm.backends.triton_gpu.decode_attention import decode_attention
from pagedllm.backends.triton_gpu.prefill_attention import prefill_attention
from pagedllm.backends.triton_gpu.tuning import KernelTuning


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    spec: AttentionSpec,
    num_splits: int | None = None,
    block_m: int | None = None,
    v_scale: float = 1.0,
    tuning: KernelTuning | None = None,
) -> torch.Tensor:
    """Causal attention of every request of the batch over the paged cache.

    ``query``: ``[num_tokens, num_heads, head_dim]``; ``kv_cache``: ``[2, num_blocks, block_size,
    num_kv_heads, head_dim]`` already holding this step's keys and values. ``num_splits``/``block_m``
    override the decode split count and prefill tile rows (tests). ``v_scale``: the output times it, in
    float32 before the cast (a cache of values divided by it; a key scale is folded into ``spec.scale``).
    ``tuning``: the GPU family's tiles (None: the kernels' NVIDIA defaults).
    Returns ``[num_tokens, num_heads, head_dim]`` in ``query``'s dtype; rows of padding tokens are left
    uninitialized.
    """
    if query.stride(-1) != 1:
        query = query.contiguous()
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if metadata.num_decodes > 0:
        decode_tiles = tuning.decode(spec.head_dim, kv_cache.dtype) if tuning is not None else None
        decode_attention(out, query, kv_cache, metadata, spec, num_splits=num_splits, tiles=decode_tiles,
                         v_scale=v_scale)  # fmt: skip
    if metadata.num_requests > metadata.num_decodes:
        prefill_tiles: tuple[int, int, int] | None = None
        if tuning is not None:
            tile_m, block_n, num_warps, num_stages = tuning.prefill(spec.head_dim, query.dtype)
            block_m, prefill_tiles = block_m or tile_m, (block_n, num_warps, num_stages)
        prefill_attention(out, query, kv_cache, metadata, spec, block_m=block_m, tiles=prefill_tiles,
                          v_scale=v_scale)  # fmt: skip
    return out
