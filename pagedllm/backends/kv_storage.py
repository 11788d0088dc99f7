"""KV cache storage helpers for backends written in PyTorch: the cast on store, and moving entries by bytes."""

from __future__ import annotations

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


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` itself, or for 8-bit floats a ``torch.uint8`` view of the same memory and shape.

    Called by backends before copying, scattering or gathering KV cache entries with PyTorch indexing:
    torch has no ``index_copy_``/``index_put_`` kernels for ``float8_*`` on some devices, and copying the
    bytes copies the values exactly. ``tensor``: any shape; the view has the same shape.
    """
    return tensor.view(torch.uint8) if is_fp8(tensor.dtype) else tensor
