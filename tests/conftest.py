"""Shared fixtures: tiny Hugging Face checkpoints built once per session, and engine helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm.testing.checkpoints import build_checkpoint


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory):
    """Build (once per session and arguments) a tiny checkpoint; returns its directory."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", dtype: torch.dtype = torch.float32, **overrides: object) -> Path:
        key = (arch, dtype, repr(sorted(overrides.items())))
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"{arch}_{str(dtype).split('.')[-1]}")
            cache[key] = build_checkpoint(directory, arch, dtype=dtype, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_dir(checkpoint_factory) -> Path:
    """A tiny float32 Llama checkpoint with tokenizer."""
    return checkpoint_factory("llama")


def assert_pool_free(llm) -> None:
    """After a run to completion, every KV block is back in the pool."""
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache_usage() == 0.0
    assert engine.block_manager.block_tables == {}


@pytest.fixture(autouse=True)
def every_finished_engine_frees_its_blocks(monkeypatch: pytest.MonkeyPatch):
    """After each test, every engine it built that has no unfinished request holds no KV block."""
    from pagedllm.core.engine import LLMEngine

    engines: list[LLMEngine] = []
    original_init = LLMEngine.__init__

    def tracking_init(self: LLMEngine, *args: object, **kwargs: object) -> None:
        original_init(self, *args, **kwargs)
        engines.append(self)

    monkeypatch.setattr(LLMEngine, "__init__", tracking_init)
    yield
    for engine in engines:
        if not engine.has_unfinished_requests():
            assert engine.kv_cache_usage() == 0.0, "an engine finished all its requests but still holds KV blocks"
            assert engine.block_manager.block_tables == {}
