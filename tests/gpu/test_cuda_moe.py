"""Mixture-of-experts on a real GPU: the ``cuda`` backend's grouped-GEMM ``fused_moe`` against the float32
reference in fp32/fp16/bf16 (tiny and Qwen3-30B-A3B-sized layers), replayed in a CUDA graph with new routing,
and greedy Mixtral / Qwen3-MoE generation equal to the ``cpu`` backend's, eager and with decode graphs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from pagedllm.backends.moe import moe_reference  # noqa: E402
from tests.gpu.test_cuda_backend import DTYPES, TOLERANCE, Completions, _engine, _prompts, assert_same_tokens  # noqa: E402
from tests.unit.test_moe import routed_inputs  # noqa: E402

# (tokens, experts, top_k, hidden, inter): tiny; decode batches (the GEMVs up to GEMV_MAX_TOKENS) and a prefill
# chunk of Qwen3-30B-A3B's layer
SHAPES = [(5, 8, 2, 64, 48), (3, 8, 2, 64, 48), (1, 128, 8, 2048, 768), (4, 128, 8, 2048, 768),
          (64, 128, 8, 2048, 768), (700, 128, 8, 2048, 768)]


def backend():
    from pagedllm.backends.cuda.backend import CudaBackend

    return CudaBackend()


def check(got: torch.Tensor, x, w13, w2, weights, ids, dtype: torch.dtype) -> None:
    expected = moe_reference(x.to(dtype).float(), w13.to(dtype).float(), w2.to(dtype).float(), weights, ids)
    elementwise, relative = TOLERANCE[dtype]
    got = got.float().cpu()
    assert got.shape == expected.shape
    assert torch.linalg.norm(got - expected) / torch.linalg.norm(expected) < relative
    torch.testing.assert_close(got, expected, **elementwise)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_moe_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x, w13, w2, weights, ids = routed_inputs(*shape)
    dev = dict(device="cuda", dtype=dtype)
    got = backend().fused_moe(x.to(**dev), w13.to(**dev), w2.to(**dev), weights.cuda(), ids.cuda())
    assert got.dtype == dtype
    check(got, x, w13, w2, weights, ids, dtype)


@pytest.mark.parametrize("tokens", [2, 32], ids=["gemv", "gemm"])
def test_fused_moe_replays_in_a_graph_with_new_routing(tokens: int) -> None:
    """Captured once (the sort into expert blocks included), replayed over other tokens and routing."""
    dtype = torch.bfloat16
    shape = (tokens, 128, 8, 2048, 768)
    x, w13, w2, weights, ids = routed_inputs(*shape)
    cuda = backend()
    w13_d, w2_d = w13.to("cuda", dtype), w2.to("cuda", dtype)
    static = [x.to("cuda", dtype), weights.cuda(), ids.cuda()]
    cuda.fused_moe(static[0], w13_d, w2_d, static[1], static[2])  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda.fused_moe(static[0], w13_d, w2_d, static[1], static[2])
    for seed in (1, 2):
        x2, _, _, weights2, ids2 = routed_inputs(*shape, seed=seed)
        for buf, new in zip(static, (x2.to(dtype), weights2, ids2), strict=True):
            buf.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        check(out.clone(), x2, w13, w2, weights2, ids2, dtype)


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from pagedllm.testing.checkpoints import build_checkpoint

    return {arch: build_checkpoint(tmp_path_factory.mktemp(arch), arch) for arch in ("mixtral", "qwen3_moe")}


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_greedy_equals_cpu_fp32(moe_checkpoints: dict[str, Path], arch: str, enforce_eager: bool) -> None:
    """Chunked prefill, mixed and decode steps, asynchronous scheduling; graphs replay the decode steps."""
    from pagedllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    cpu = _engine(moe_checkpoints[arch], "cpu", "float32")
    gpu = _engine(moe_checkpoints[arch], "cuda", "float32", enforce_eager=enforce_eager)
    assert (gpu.llm_engine.executor.worker.runner.graph_runner is None) == enforce_eager
    prompts = _prompts(cpu.get_tokenizer())
    want = Completions(cpu.generate(prompts, params, use_tqdm=False))
    got = Completions(gpu.generate(prompts, params, use_tqdm=False))
    assert_same_tokens(got, want)


def test_moe_bf16_generation_runs_with_graphs(moe_checkpoints: dict[str, Path]) -> None:
    from pagedllm import SamplingParams

    llm = _engine(moe_checkpoints["qwen3_moe"], "cuda", "bfloat16")
    outputs = llm.generate(_prompts(llm.get_tokenizer()), SamplingParams(temperature=0.0, max_tokens=16,
                                                                          ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outputs)
