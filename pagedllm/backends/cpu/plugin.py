"""Pluggy plugin registering the ``cpu`` reference backend, the same way a third-party plugin would."""

from __future__ import annotations

from pagedllm.backends.hookspecs import hookimpl
from pagedllm.backends.interface import Backend


@hookimpl
def pagedllm_register_backends() -> list[type[Backend]]:
    """Provide the ``cpu`` backend (imported lazily: nothing heavy happens at plugin load)."""
    from pagedllm.backends.cpu.backend import CpuBackend

    return [CpuBackend]
