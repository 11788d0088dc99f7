"""Fixtures of the ``test_server_*`` modules that use the shared ``pagedllm serve`` process
(:mod:`tests.e2e.openai_server`)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def shared_server(llama_dir: Path, pytestconfig: pytest.Config):
    """The shared server (started on first use in the session), a ``ServerProcess``."""
    from tests.e2e.openai_server import start_shared_server

    return start_shared_server(llama_dir, pytestconfig)


@pytest.fixture(scope="module")
def shared_client(shared_server):
    """An official ``openai`` client of the shared server (no retries)."""
    return shared_server.client()
