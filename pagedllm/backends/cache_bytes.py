"""Moving KV cache entries of any dtype by their bytes."""

from __future__ import annotations

import torch


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` itself, or for 8-bit floats a ``torch.uint8`` view of the same memory and shape.

    Called by backends before copying, scattering or gathering KV cache entries with PyTorch indexing:
    torch has no ``index_copy_``/``index_put_`` kernels for ``float8_*`` on some devices, and copying the
    bytes copies the values exactly. ``tensor``: any shape; the view has the same shape.
    """
    return tensor.view(torch.uint8) if tensor.dtype.itemsize == 1 and tensor.is_floating_point() else tensor
