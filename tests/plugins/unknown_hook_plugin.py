"""Fixture plugin implementing a hook no hookspec declares (a misspelling of pagedllm_register_backends)."""

from __future__ import annotations

from pagedllm.backends.hookspecs import hookimpl


@hookimpl
def pagedllm_register_backend() -> list[type]:
    """Misspelled: singular."""
    return []
