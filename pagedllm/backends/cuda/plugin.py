"""Pluggy plugin registering the ``cuda`` backend, the same way a third-party plugin would."""

from __future__ import annotations

from pagedllm.backends.hookspecs import hookimpl
from pagedllm.backends.interface import Backend


@hookimpl
def pagedllm_register_backends() -> list[type[Backend]]:
    """Provide the ``cuda`` backend (imported lazily: neither triton nor CUDA is touched at plugin load)."""
    from pagedllm.backends.cuda.backend import CudaBackend

    return [CudaBackend]
