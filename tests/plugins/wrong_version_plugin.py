"""Fixture plugin whose backend implements a backend interface from the future: it must be refused."""

from __future__ import annotations

from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.backends.hookspecs import hookimpl
from pagedllm.backends.interface import Backend


class FutureBackend(CpuBackend):
    """The cpu kernels, declaring interface 2.0."""

    name = "future"
    interface_version = (2, 0)


@hookimpl
def pagedllm_register_backends() -> list[type[Backend]]:
    """Provide the backend with the incompatible interface version."""
    return [FutureBackend]
