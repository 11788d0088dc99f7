"""The KV cache stored in fp8 (``kv_cache_dtype="fp8"``): what it computes, what it holds, what it refuses."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pagedllm import LLM
from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.core.config import EngineConfig, resolve_kv_cache_dtype
from pagedllm.entrypoints.engine_args import add_engine_args, engine_config_from_args
from tests.e2e.hf_reference import assert_greedy_matches_rounded_reference

MAX_TOKENS = 10


def test_names_resolve_and_bad_names_are_refused() -> None:
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16) is torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("fp8_e5m2", torch.float16) is torch.float8_e5m2
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of auto, .*fp8.*; got 'int4'"):
        EngineConfig(kv_cache_dtype="int4")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args(["--kv-cache-dtype", "fp8"])).kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int4"])


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_greedy_equals_transformers_attending_over_rounded_kv(checkpoint_factory, kv_cache_dtype: str) -> None:
    """Token for token what transformers generates when its attention sees keys and values rounded to the
    same fp8 format, under chunked prefill, prefix caching and preemption; the pool holds 4x the tokens of
    a float32 cache in the same bytes."""
    model_dir = checkpoint_factory("llama")
    budget = 1 << 20
    llm = LLM(str(model_dir), device="cpu", dtype="float32", kv_cache_dtype=kv_cache_dtype, block_size=4,
              max_num_batched_tokens=64, kv_cache_memory_bytes=budget)
    engine = llm.llm_engine
    worker = engine.executor.worker
    fp32_bytes = worker.runner.kv_cache_bytes_per_block(worker.num_kv_heads, engine.model_config.head_dim,
                                                        torch.float32)
    assert engine.executor.bytes_per_block() * 4 == fp32_bytes
    assert engine.block_manager.pool.num_blocks == budget // (fp32_bytes // 4)
    kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype, torch.float32)
    assert_greedy_matches_rounded_reference(llm, model_dir, MAX_TOKENS, kv_dtype=kv_dtype)


def test_a_format_the_backend_does_not_claim_is_refused(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    claimed = CpuBackend().capabilities()
    only_model_dtypes = replace(claimed, kv_cache_dtypes=claimed.dtypes)
    monkeypatch.setattr(CpuBackend, "capabilities", lambda self: only_model_dtypes)
    refused = r"backend 'cpu' does not support kv_cache_dtype 'fp8' \(torch.float8_e4m3fn\); supported: "
    with pytest.raises(ValueError, match=refused):
        LLM(str(llama_dir), device="cpu", kv_cache_dtype="fp8", num_kv_blocks=16)
