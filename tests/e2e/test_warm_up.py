"""The engine's start runs warm-up steps for backends whose kernels compile on first launch
(``BackendCapabilities.compiles_kernels``): a mixed step, and decode steps at the graph-capture batch sizes
when no graphs are recorded. Checked on the CPU with ``cpu`` backends that claim the capability and record
the attention batches they see; on a GPU ``tests/gpu`` checks that no Triton kernel compiles after start."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.backends.interface import AttentionMetadata, AttentionSpec, BackendCapabilities
from pagedllm.core.graph_runner import capture_sizes
from pagedllm.core.model_runner import ModelRunner
from tests.conftest import assert_pool_free
from tests.e2e.graph_cpu_backend import GraphCpuBackend

ENGINE_KWARGS: dict[str, object] = dict(device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=48,
                                        max_num_seqs=40, kv_cache_memory_bytes=1 << 22, async_scheduling=False)
PROMPTS = [[1, 2, 3, 4, 5], list(range(10, 90)), [42]]
# the mixed warm-up step's (decodes, requests, tokens): a decode, a chunk of 2 blocks + 1 that samples nothing
# (block_size 4), a 5-token prompt end
MIXED_STEP = (1, 3, 1 + (2 * 4 + 1) + 5)


class Batches:
    """``(num_decodes, num_requests, num_tokens)`` of every attention call, and whether any wrote a slot."""

    seen: ClassVar[list[tuple[int, int, int]]] = []
    wrote: ClassVar[bool] = False


class CompilingCpuBackend(CpuBackend):
    """The ``cpu`` backend claiming ``compiles_kernels``, recording the batches of its attention calls."""

    name = "cpucompiling"

    def capabilities(self) -> BackendCapabilities:
        return dataclasses.replace(super().capabilities(), compiles_kernels=True)

    def write_kv_cache(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
        Batches.wrote |= bool((slot_mapping >= 0).any())
        super().write_kv_cache(key, value, kv_cache, slot_mapping)

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                  metadata: AttentionMetadata, spec: AttentionSpec) -> torch.Tensor:
        Batches.seen.append((metadata.num_decodes, metadata.num_requests, metadata.num_tokens))
        return super().attention(query, key, value, kv_cache, metadata, spec)


class CompilingGraphCpuBackend(CompilingCpuBackend, GraphCpuBackend):
    """The same, also "capturing" decode graphs (the step is run once at capture)."""

    name = "cpucompilinggraph"

    def capabilities(self) -> BackendCapabilities:
        return dataclasses.replace(GraphCpuBackend.capabilities(self), compiles_kernels=True)


def _start(model_dir: Path, backend: type, monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> LLM:
    from pagedllm.backends.registry import get_registry

    monkeypatch.setattr(get_registry(), "resolve_backend", lambda device: backend)
    Batches.seen, Batches.wrote = [], False
    return LLM(str(model_dir), **{**ENGINE_KWARGS, **kwargs})


def _steps(seen: list[tuple[int, int, int]], num_layers: int) -> list[tuple[int, int, int]]:
    """One entry per step: the first layer's batch (the last layer of a mixed step sees its sampled rows)."""
    return seen[::num_layers]


def test_eager_start_warms_up_a_mixed_step_and_every_decode_size(llama_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    llm = _start(llama_dir, CompilingCpuBackend, monkeypatch, enforce_eager=True)
    runner = llm.llm_engine.executor.worker.runner
    layers = len(runner.model.attention_layers())
    warm = _steps(Batches.seen, layers)  # an explicit KV budget: no profiling run before
    assert warm[0] == MIXED_STEP
    assert Batches.seen[layers - 1] == (2, 2, 2)  # whose last layer attends only the two sampled rows
    assert [w[0] for w in warm[1:]] == [1, 2, 4, 8, 16, 32, 40]  # powers of two, then max_num_seqs
    assert all(n == r == t for n, r, t in warm[1:])
    assert not Batches.wrote, "a warm-up step wrote to the KV cache"
    assert all(not cache.any() for cache in runner.kv_caches)
    assert_pool_free(llm)


def test_with_graphs_the_capture_covers_the_decode_sizes(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = _start(llama_dir, CompilingGraphCpuBackend, monkeypatch)
    runner = llm.llm_engine.executor.worker.runner
    assert runner.graph_runner is not None
    layers = len(runner.model.attention_layers())
    steps = _steps(Batches.seen, layers)
    # the capture's decode steps (largest first), then the one mixed warm-up step
    assert [s[0] for s in steps[:-1]] == capture_sizes(40)[::-1] == [40, 32, 24, 16, 8, 4, 2, 1]
    assert steps[-1] == MIXED_STEP
    assert all(not cache.any() for cache in runner.kv_caches)


def test_warm_up_leaves_generation_unchanged(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=2)
    plain = LLM(str(llama_dir), **ENGINE_KWARGS).generate(PROMPTS, params, use_tqdm=False)
    llm = _start(llama_dir, CompilingCpuBackend, monkeypatch, enforce_eager=True)
    warmed = llm.generate(PROMPTS, params, use_tqdm=False)
    for a, b in zip(plain, warmed, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [{t: round(lp.logprob, 5) for t, lp in s.items()} for s in a.outputs[0].logprobs] == \
            [{t: round(lp.logprob, 5) for t, lp in s.items()} for s in b.outputs[0].logprobs]
    assert_pool_free(llm)


@pytest.mark.timeout(180)
def test_tensor_parallel_ranks_warm_up_together(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tp=2 in eager mode: both ranks run the warm-up steps (their all-reduces pair up), then generate what
    tp=1 without a warm-up does."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(str(llama_dir), **ENGINE_KWARGS).generate(PROMPTS, params,
                                                                                              use_tqdm=False)]
    llm = _start(llama_dir, CompilingCpuBackend, monkeypatch, enforce_eager=True, tensor_parallel_size=2)
    try:
        layers = len(llm.llm_engine.executor.worker.runner.model.attention_layers())
        assert len(_steps(Batches.seen, layers)) == 1 + len(ModelRunner.warm_up_sizes(40))  # rank 0's start
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)] == expected
    finally:
        llm.llm_engine.shutdown()


def test_warm_up_sizes() -> None:
    assert ModelRunner.warm_up_sizes(1) == [1]
    assert ModelRunner.warm_up_sizes(2) == [1, 2]
    assert ModelRunner.warm_up_sizes(1024) == [1 << k for k in range(11)]
    assert ModelRunner.warm_up_sizes(1000) == [*(1 << k for k in range(10)), 1000]


def test_decode_split_count_moves_at_most_one_step_per_doubling() -> None:
    """The contract the eager warm-up relies on, for ``cuda``'s split count (pure shapes, no GPU needed)."""
    pytest.importorskip("triton")
    from pagedllm.backends.triton_gpu.decode_attention import choose_num_splits

    for num_sms in (16, 66, 78, 108, 132, 144):
        for kv_heads in (1, 2, 4, 8):
            for max_context in (256, 1024, 8192, 131072):
                splits = [choose_num_splits(n, kv_heads, max_context, 64, num_sms) for n in range(1, 1025)]
                assert all(a >= b for a, b in itertools.pairwise(splits))  # monotone
                for k in range(10):
                    lo, hi = splits[(1 << k) - 1], splits[(2 << k) - 1]
                    assert set(splits[(1 << k) - 1:(2 << k)]) <= {lo, hi}


def test_backends_that_do_not_compile_skip_it(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(ModelRunner, "warm_up", lambda self, sizes: calls.append(sizes) or 0)
    LLM(str(llama_dir), **ENGINE_KWARGS)
    assert calls == []
    assert not CpuBackend().capabilities().compiles_kernels
