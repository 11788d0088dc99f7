"""The one ``pagedllm serve`` process that ``test_server_api``, ``test_server_errors`` and
``test_server_concurrency`` share for the session (a start costs seconds, mostly imports).

Its KV pool is small on purpose: 63 usable blocks of 16 tokens hold 1008 tokens, about two requests at
the full 512-token context, so the concurrency test preempts. It runs with ``--async-scheduling``, while the
tests' offline references run synchronously, so every server test also checks that the two agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


@contextmanager
def in_process_client(model_dir: Path, engine_args: dict[str, Any] | None = None,
                      **settings: Any) -> Iterator[tuple[Any, Any]]:
    """``(openai client, engine)`` of an app built in this process for ``model_dir`` with these ``EngineConfig``
    fields and ``ServerSettings`` fields (for settings the shared server does not have), served through
    Starlette's ``TestClient``; the engine runs while the context is open."""
    import openai
    from fastapi.testclient import TestClient

    from pagedllm.core.config import EngineConfig
    from pagedllm.core.engine import LLMEngine
    from pagedllm.entrypoints.openai.api_server import ServerSettings, build_app

    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN,
                                    kv_cache_memory_bytes=KV_CACHE_BYTES, **(engine_args or {})))
    with TestClient(build_app(engine, ServerSettings(MODEL, **settings))) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http,
                            max_retries=0), engine
