"""Pluggy plugin registering the ``rocm`` backend, the same way a third-party plugin would."""

from __future__ import annotations

from pagedllm.backends.hookspecs import hookimpl
from pagedllm.backends.interface import Backend


@hookimpl
def pagedllm_register_backends() -> list[type[Backend]]:
    """Provide the ``rocm`` backend (imported lazily: neither triton nor HIP is touched at plugin load)."""
    from pagedllm.backends.rocm.backend import RocmBackend

    return [RocmBackend]
