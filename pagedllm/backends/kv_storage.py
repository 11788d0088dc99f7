"""KV cache storage shared by backends: the cast on store, the 8-bit float test, and moving entries by bytes
with PyTorch indexing (block copies, slot reads)."""

from __future__ import annotations

import math
import struct

import torch


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is an 8-bit float (``float8_e4m3fn``, ``float8_e5m2``, ...): the KV formats that
    saturate on store and move as bytes."""
    return dtype.itemsize == 1 and dtype.is_floating_point


def to_cache_dtype(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return ``values`` cast to the cache's ``dtype`` as the interface defines the store: to nearest, ties
    to even, and for 8-bit floats saturated at the format's largest finite value (NaN stays NaN).

    Called by backends on keys and values ``[num_tokens, num_kv_heads, head_dim]`` before storing them, and
    by references of what a cache holds. Saturation is explicit: torch's own cast to ``float8_e4m3fn``
    gives NaN past 464 in releases before 2.12 (one outlier key would poison a whole attention row).
    """
    if is_fp8(dtype):
        largest = torch.finfo(dtype).max
        values = values.clamp(-largest, largest)
    return values.to(dtype)


def divide_by_scale(values: torch.Tensor, scale: float) -> torch.Tensor:
    """Return ``values / scale`` as a scaled KV cache stores them before the cast: float32 ``values`` times the
    float32 inverse of ``scale`` (what a kernel computes from an inverse passed as a 32-bit float argument).

    Called by ``Backend.write_kv_cache_scaled`` and references of what a scaled cache holds. ``values``: any
    shape and float dtype; ``scale``: a positive finite float. Returns a float32 tensor of the same shape.
    """
    return values.float() * inverse_scale(scale)


def inverse_scale(scale: float) -> float:
    """``1 / scale`` rounded to float32 (returned as a Python float holding exactly that value): the multiplier
    every implementation of a scaled KV store uses, so they round alike. Raises ValueError unless ``scale`` is a
    positive finite number."""
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"KV cache scale {scale!r}: expected a positive finite number")
    inverse = struct.unpack("f", struct.pack("f", 1.0 / scale))[0]  # the C cast: to nearest, ties to even
    if math.isinf(inverse):
        raise ValueError(f"KV cache scale {scale!r}: its inverse exceeds float32's range")
    return inverse


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` itself, or for 8-bit floats a ``torch.uint8`` view of the same memory and shape.

    Called by backends before copying, scattering or gathering KV cache entries with PyTorch indexing:
    torch has no ``index_copy_``/``index_put_`` kernels for ``float8_*`` on some devices, and copying the
    bytes copies the values exactly. ``tensor``: any shape; the view has the same shape.
    """
    return tensor.view(torch.uint8) if is_fp8(tensor.dtype) else tensor


def read_slots(kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the keys and values stored at ``slot_mapping`` with PyTorch indexing (by bytes for 8-bit floats).

    Called by backends' ``Backend.read_kv_cache`` (tests and the conformance kit). ``kv_cache``: one layer,
    ``[2, num_blocks, block_size, num_kv_heads, head_dim]``; ``slot_mapping``: ``[num_slots]`` int64 on its
    device. Returns two ``[num_slots, num_kv_heads, head_dim]`` tensors in the cache's dtype.
    """
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    cache = byte_view(kv_cache)
    return (
        cache[0].reshape(-1, num_kv_heads, head_dim)[slot_mapping].view(kv_cache.dtype),
        cache[1].reshape(-1, num_kv_heads, head_dim)[slot_mapping].view(kv_cache.dtype),
    )


def copy_blocks(kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
    """Copy whole KV blocks ``src -> dst`` in every layer with PyTorch indexing (by bytes for 8-bit floats).

    Called by backends' ``Backend.copy_blocks`` (copy-on-write of a shared block; rare, so no kernel).
    ``kv_caches``: each layer's cache, ``[2, num_blocks, ...]``; ``src_to_dst``: ``[num_pairs, 2]`` int64,
    on any device (moved to the caches' without a sync). Returns None.
    """
    if not kv_caches or src_to_dst.numel() == 0:
        return
    pairs = src_to_dst.to(kv_caches[0].device, non_blocking=True)
    src, dst = pairs[:, 0], pairs[:, 1]
    for kv_cache in kv_caches:
        cache = byte_view(kv_cache)
        cache[:, dst] = cache[:, src]
