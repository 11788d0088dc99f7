"""Fixture plugin whose backend never says which interface version it implements: it must be refused."""

from __future__ import annotations

from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.backends.hookspecs import hookimpl
from pagedllm.backends.interface import Backend


class UndeclaredBackend(CpuBackend):
    """Inherits ``interface_version`` instead of declaring it."""

    name = "undeclared"


@hookimpl
def pagedllm_register_backends() -> list[type[Backend]]:
    """Provide the backend without a declared version."""
    return [UndeclaredBackend]
