"""The pluggy plugin pagedllm loads through the ``pagedllm`` entry point: one function per hook."""

from __future__ import annotations

import argparse

from torch import nn

from pagedllm.backends.hookspecs import hookimpl
from pagedllm.backends.interface import Backend


@hookimpl
def pagedllm_register_backends() -> list[type[Backend]]:
    """Provide the ``acme`` backend (imported here, not at plugin load)."""
    from acme_pagedllm.backend import AcmeBackend

    return [AcmeBackend]


@hookimpl
def pagedllm_register_models() -> dict[str, type[nn.Module]]:
    """Add an architecture name of Acme's own: a Llama variant Acme ships checkpoints for."""
    from pagedllm.core.models.llama import LlamaForCausalLM

    class AcmeLlamaForCausalLM(LlamaForCausalLM):
        """Llama under Acme's architecture name."""

    return {"AcmeLlamaForCausalLM": AcmeLlamaForCausalLM}


@hookimpl
def pagedllm_add_cli_options(parser: argparse.ArgumentParser, command: str) -> None:
    """``--acme-profile`` on every command (a real plugin would pass it to its runtime)."""
    group = parser.add_argument_group("acme")
    group.add_argument("--acme-profile", action="store_true", help="record an Acme profiler trace")
