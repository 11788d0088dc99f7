"""Writing this step's keys and values into the paged KV cache, one program per token."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.backends.kv_storage import inverse_scale


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    k_inv_scale,
    v_inv_scale,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SCALED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    if slot >= 0:  # -1: a padding token, nothing to store
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
        dst = (
            (slot // BLOCK_SIZE) * stride_cache_block
            + (slot % BLOCK_SIZE) * stride_cache_tok
            + offs_h[:, None] * stride_cache_head
            + offs_d[None, :]
        )
        k = tl.load(key_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        if SCALED:  # kv_storage.divide_by_scale: float32 times the float32 inverse
            k = k.to(tl.float32) * k_inv_scale
            v = v.to(tl.float32) * v_inv_scale
        tl.store(k_cache_ptr + dst, _to_cache(k, k_cache_ptr), mask=mask)
        tl.store(v_cache_ptr + dst, _to_cache(v, v_cache_ptr), mask=mask)


@triton.jit
def _to_cache(x, cache_ptr):
    """``x`` in the dtype ``cache_ptr`` points to; 8-bit floats round to nearest even from float32 and
    saturate, as ``kv_storage.to_cache_dtype`` defines the store (Triton's interpreter rounds fp8 its own
    way, so CI leaves this path to the GPU tests)."""
    dtype = cache_ptr.dtype.element_ty
    if dtype.is_fp8():
        return x.to(tl.float32).to(dtype, fp_downcast_rounding="rtne")
    else:
        return x.to(dtype)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Store ``key``/``value`` rows at their slots of ``kv_cache``, in place; slots of -1 are skipped.

    ``key``/``value``: ``[>= num_slots, num_kv_heads, head_dim]`` (last dim contiguous; views of a fused
    QKV tensor are fine); ``kv_cache``: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``;
    ``slot_mapping``: ``[num_slots]`` int64. ``k_scale``/``v_scale`` other than 1.0: the keys and values are
    stored divided by them (in float32, times the float32 inverse: ``kv_storage.divide_by_scale``). An 8-bit
    float cache (``float8_e4m3fn``, ``float8_e5m2``) stores each value rounded to nearest even and saturated at
    the format's largest finite value, 448 or 57344 (``kv_storage.to_cache_dtype``). The grid is ``num_slots``
    programs, a shape, so the write can be captured in a CUDA graph.
    """
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    num_slots = min(slot_mapping.shape[0], key.shape[0])
    if num_slots == 0:
        return
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    scaled = k_scale != 1.0 or v_scale != 1.0
    k_inverse, v_inverse = (inverse_scale(k_scale), inverse_scale(v_scale)) if scaled else (1.0, 1.0)
    _write_kv_kernel[(num_slots,)](
        key, value, k_cache, v_cache, slot_mapping, k_inverse, v_inverse,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size, SCALED=scaled,
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
