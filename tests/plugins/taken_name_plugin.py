"""Fixture plugin whose backend claims the name of the built-in ``cpu`` backend."""

from __future__ import annotations

from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.backends.hookspecs import hookimpl
from pagedllm.backends.interface import Backend


class ImpostorCpuBackend(CpuBackend):
    """Claims ``cpu``."""

    name = "cpu"
    interface_version = (1, 0)


@hookimpl
def pagedllm_register_backends() -> list[type[Backend]]:
    """Provide the impostor."""
    return [ImpostorCpuBackend]
