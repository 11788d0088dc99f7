"""4-bit weights on a real GPU (``"w4a16"``: AWQ, GPTQ, compressed-tensors checkpoints): the Triton kernel against
the float32 reference on the CPU at Llama-3-8B's projection shapes, and greedy generation from 4-bit checkpoints
equal to the ``cpu`` backend's.

Skipped without CUDA; run with ``python -m pytest tests/gpu -q``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from pagedllm.backends.w4a16_linear import quantize_w4a16_act_order, reference_linear_w4a16  # noqa: E402
from tests.gpu.test_cuda_backend import DTYPES, _generate, assert_close_to_reference, assert_same_tokens  # noqa: E402
from tests.gpu.test_cuda_fp8_linear import assert_bf16_generation_agrees_with_cpu  # noqa: E402


def _layer(n: int, k: int, group_size: int, act_order: bool) -> tuple[torch.Tensor, ...]:
    """A random ``[n, k]`` weight in 4 bits on the GPU: ``(weight, scales, zeros, g_idx or None)``."""
    weight = torch.randn(n, k) * k**-0.5
    perm = torch.randperm(k) if act_order else torch.arange(k)
    packed, scales, zeros, g_idx = quantize_w4a16_act_order(weight, group_size, perm, scale_dtype=torch.float32)
    return packed.cuda(), scales.cuda(), zeros.cuda(), g_idx.cuda() if act_order else None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize(("n", "k", "group_size", "act_order"), [
    (6144, 4096, 128, False), (4096, 14336, 128, False), (28672, 4096, 64, False), (1000, 4096, 32, False),
    (4096, 4096, 128, True)])
def test_linear_w4a16_matches_the_reference(dtype: torch.dtype, rows: int, n: int, k: int, group_size: int,
                                            act_order: bool) -> None:
    """``CudaBackend().linear_w4a16`` (one token and a few through split-K, more through the tiled product; with
    a bias) against the float32 reference on the CPU."""
    from pagedllm.backends.cuda.backend import CudaBackend

    weight, scales, zeros, g_idx = _layer(n, k, group_size, act_order)
    x = torch.randn(rows, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    out = CudaBackend().linear_w4a16(x, weight, scales, zeros, group_size, g_idx, bias)
    assert out.shape == (rows, n) and out.dtype == dtype
    expected = reference_linear_w4a16(x.float().cpu(), weight.cpu(), scales.cpu(), zeros.cpu(), group_size,
                                      None if g_idx is None else g_idx.cpu(), bias.float().cpu())
    assert_close_to_reference(out, expected, dtype)


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pagedllm.testing.checkpoints import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.mark.parametrize("scheme", ["awq", "gptq-act-order", "compressed-tensors-asym"])
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_w4a16_checkpoint_greedy_equals_cpu_fp32(llama_checkpoint: Path, tmp_path: Path, scheme: str,
                                                 enforce_eager: bool) -> None:
    """A 4-bit checkpoint loads onto the GPU as it is and generates the cpu backend's tokens from the same file
    (float32; eager and in decode graphs)."""
    from pagedllm.testing.w4a16_checkpoints import write_w4a16_checkpoint

    quantized, _ = write_w4a16_checkpoint(llama_checkpoint, tmp_path, scheme)
    expected, _ = _generate(quantized, "cpu", "float32")
    got, llm = _generate(quantized, "cuda", "float32", enforce_eager=enforce_eager)
    assert llm.llm_engine.config.quantization == "w4a16"
    assert llm.llm_engine.executor.worker.runner.model.model.layers[0].mlp.down_proj.weight.is_cuda
    assert_same_tokens(got, expected)


def test_w4a16_bf16_generation_runs_with_graphs(llama_checkpoint: Path, tmp_path: Path) -> None:
    """bf16 activations over an AWQ checkpoint through the kernel (decode graphs): runs, stays in the vocabulary
    and agrees with the cpu backend's first tokens on most prompts."""
    from pagedllm.testing.w4a16_checkpoints import write_w4a16_checkpoint

    quantized, _ = write_w4a16_checkpoint(llama_checkpoint, tmp_path, "awq")
    assert_bf16_generation_agrees_with_cpu(quantized, "w4a16")
