"""The one ``pagedllm serve`` process that ``test_server_api``, ``test_server_errors`` and
``test_server_concurrency`` share for the session (a start costs seconds, mostly imports).

Its KV pool is small on purpose: 63 usable blocks of 16 tokens hold 1008 tokens, about two requests at
the full 512-token context, so the concurrency test preempts. It runs with ``--async-scheduling``, while the
tests' offline references run synchronously, so every server test also checks that the two agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedllm.testing.server import ServerProcess, shared_server

MODEL = "tiny"
API_KEY = "test-key"
MAX_MODEL_LEN = 512
KV_CACHE_BYTES = 1 << 19  # 64 blocks of 16 tokens x 2 layers x 2 KV heads x 16 dims x float32 K and V
SERVER_ARGS = ("--device", "cpu", "--dtype", "float32", "--served-model-name", MODEL, "--max-model-len",
               str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--disable-access-log",
               "--async-scheduling",  # the offline references run synchronously: a cross-check
               "--enable-auto-tool-choice", "--tool-call-parser", "hermes")


def start_shared_server(model_dir: Path, config: pytest.Config) -> ServerProcess:
    """The shared server for ``model_dir`` (started on first use, stopped at the end of the session)."""
    return shared_server(model_dir, SERVER_ARGS, API_KEY, config.add_cleanup)
