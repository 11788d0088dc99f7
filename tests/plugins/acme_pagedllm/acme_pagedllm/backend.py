"""The ``acme`` backend: pagedllm's cpu reference kernels under another name, counting its calls.

A real vendor backend would import its SDK inside ``is_available`` and the kernel methods. This one
"finds its device" when ``ACME_PAGEDLLM_DEVICE=1``, so that, while the fixture is installed in a shared
environment, ``--device auto`` keeps picking what it picked before unless a test asks for Acme.
"""

from __future__ import annotations

import os
from collections import Counter

import torch

from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.backends.interface import AttentionMetadata, AttentionSpec, BackendCapabilities

DEVICE_ENV = "ACME_PAGEDLLM_DEVICE"

CALLS: Counter[str] = Counter()
"""Calls per method in this process (``attention``, ``write_kv_cache``), for tests to read."""


class AcmeBackend(CpuBackend):
    """Acme: paged attention for the Acme accelerator (here: the cpu kernels)."""

    name = "acme"
    interface_version = (1, 0)  # the pagedllm backend interface this plugin was written against

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        """Available when an Acme device is present (emulated: ``ACME_PAGEDLLM_DEVICE=1``)."""
        if os.environ.get(DEVICE_ENV) == "1":
            return True, ""
        return False, f"no Acme accelerator found (set {DEVICE_ENV}=1 to emulate one on the CPU)"

    def capabilities(self) -> BackendCapabilities:
        """A narrower claim than cpu's, as a real device would make: the kit tests exactly this."""
        return BackendCapabilities(
            dtypes=(torch.float32, torch.bfloat16),
            kv_cache_dtypes=(torch.float32, torch.bfloat16),
            block_sizes=(16, 32),
            head_sizes=(64, 128),
        )

    def write_kv_cache(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Count, then store through the cpu kernels."""
        CALLS["write_kv_cache"] += 1
        super().write_kv_cache(key, value, kv_cache, slot_mapping)

    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        spec: AttentionSpec,
    ) -> torch.Tensor:
        """Count, then attend through the cpu kernels."""
        CALLS["attention"] += 1
        return super().attention(query, key, value, kv_cache, metadata, spec)
