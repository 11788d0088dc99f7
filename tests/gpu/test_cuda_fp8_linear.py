"""fp8 linear layers on a real GPU (``quantization="fp8"``): the Triton quantizer and GEMV and cuBLAS's e4m3
product against the float32 reference on the CPU, and greedy generation equal to the ``cpu`` backend's.

Skipped without CUDA or below compute capability 9.0 (where the backend claims fp8 linear layers); run with
``python -m pytest tests/gpu -q``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                                reason="needs a CUDA GPU of compute capability 9.0 or above")

from pagedllm.backends.fp8_linear import quantize_blocks, quantize_groups, quantize_rows, reference_linear_fp8  # noqa: E402
from tests.gpu.test_cuda_backend import DTYPES, _generate, assert_close_to_reference, assert_same_tokens  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols"), [(1000, 4096), (7, 14336), (3, 20000), (2, 100)])
def test_quantizer_matches_the_cpu_reference_bit_for_bit(dtype: torch.dtype, rows: int, cols: int) -> None:
    """Scales and e4m3 bytes, for the Triton kernel and for the reference run on the GPU (weights are
    quantized there at load), equal the reference's on the CPU; outliers and an all-zero row included."""
    from pagedllm.backends.triton_gpu.fp8_linear import quantize_rows as triton_quantize_rows

    x = (torch.randn(rows, cols, device="cuda") * 5).to(dtype)
    x[0, 1] = 3e4
    x[-1] = 0
    want_q, want_scale = quantize_rows(x.cpu())
    for got_q, got_scale in (triton_quantize_rows(x), quantize_rows(x)):
        assert torch.equal(got_scale.cpu(), want_scale)
        assert torch.equal(got_q.cpu().view(torch.uint8), want_q.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_static_input_scale_matches_the_reference(dtype: torch.dtype, rows: int) -> None:
    """The Triton quantizer with a static scale bit for bit against the CPU reference (a scale half of what the
    input needs: the largest values saturate), and ``linear_fp8_static`` against the float32 reference."""
    from pagedllm.backends.cuda.backend import CudaBackend
    from pagedllm.backends.fp8_linear import quantize_with_scale, reference_linear_fp8_quantized
    from pagedllm.backends.triton_gpu.fp8_linear import quantize_with_scale as triton_quantize_with_scale

    x = (torch.randn(rows, 4096, device="cuda") * 3).to(dtype)
    scale = (x.float().abs().amax() / 448.0 / 2.0).reshape(1)
    got_q, got_scale = triton_quantize_with_scale(x, scale)
    want_q, want_scale = quantize_with_scale(x.cpu(), scale.cpu())
    assert torch.equal(got_scale.cpu(), want_scale) and got_q.float().abs().max() == 448
    assert torch.equal(got_q.cpu().view(torch.uint8), want_q.view(torch.uint8))
    weight, weight_scale = quantize_rows(torch.randn(6144, 4096, device="cuda") * 0.02)
    bias = torch.randn(6144, device="cuda").to(dtype)
    out = CudaBackend().linear_fp8_static(x, scale, weight, weight_scale, bias)
    assert out.shape == (rows, 6144) and out.dtype == dtype
    expected = reference_linear_fp8_quantized(want_q, want_scale, weight.cpu(), weight_scale.cpu(), bias.float().cpu(),
                                              torch.float32)
    assert_close_to_reference(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 14336), (1000, 4160)])
def test_linear_fp8_matches_the_reference(dtype: torch.dtype, rows: int, n: int, k: int) -> None:
    """One token through the fp8 GEMV, more through the quantizer and ``torch._scaled_mm`` (float32 inputs and
    an output size not a multiple of 16 through the reference), with a bias, against the float32 reference
    on the CPU."""
    assert_fp8_layer_matches_reference("linear_fp8", quantize_rows, reference_linear_fp8, dtype, rows, n, k)


def assert_fp8_layer_matches_reference(method: str, quantize: Callable, reference: Callable, dtype: torch.dtype,
                                       rows: int, n: int, k: int) -> None:
    """``CudaBackend().<method>`` on ``rows`` random ``dtype`` inputs, a random ``[n, k]`` weight quantized by
    ``quantize`` and a bias, against ``reference`` on the same values on the CPU in float32."""
    from pagedllm.backends.cuda.backend import CudaBackend

    weight, scale = quantize(torch.randn(n, k, device="cuda") * k**-0.5)
    bias = torch.randn(n, device="cuda").to(dtype)
    x = torch.randn(rows, k, device="cuda").to(dtype)
    out = getattr(CudaBackend(), method)(x, weight, scale, bias)
    assert out.shape == (rows, n) and out.dtype == dtype
    expected = reference(x.float().cpu(), weight.cpu(), scale.cpu(), bias.float().cpu())
    assert_close_to_reference(out, expected, dtype)


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pagedllm.testing.checkpoints import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_fp8_linear_greedy_equals_cpu_fp32(llama_checkpoint: Path, enforce_eager: bool) -> None:
    """``quantization="fp8"`` on both backends: the same e4m3 weights and per-token inputs, the same tokens
    (float32: several tokens through the reference's product on the GPU, one through the GEMV; graphs or not)."""
    expected, _ = _generate(llama_checkpoint, "cpu", "float32", quantization="fp8")
    got, llm = _generate(llama_checkpoint, "cuda", "float32", enforce_eager=enforce_eager, quantization="fp8")
    model = llm.llm_engine.executor.worker.runner.model
    assert model.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.float8_e4m3fn
    assert_same_tokens(got, expected)


def test_fp8_linear_bf16_generation_runs_with_graphs(llama_checkpoint: Path) -> None:
    """bf16 through ``torch._scaled_mm`` (prefill and decode steps of several requests): not bit-equal to the
    cpu backend (other summation orders), so it must run, stay in the vocabulary and agree with the cpu
    backend's fp8 bf16 tokens on most prompts' first tokens."""
    assert_bf16_generation_agrees_with_cpu(llama_checkpoint, "fp8")


def test_static_input_scales_bf16_generation_runs_with_graphs(llama_checkpoint: Path, tmp_path: Path) -> None:
    """An AutoFP8-style checkpoint with static input scales in bf16: inputs quantized with the checkpoint's
    scales, then ``torch._scaled_mm`` (and the fp8 GEMV at one token), decode graphs; as the dynamic case."""
    from pagedllm.testing.fp8_checkpoints import write_fp8_checkpoint

    fp8_dir, _ = write_fp8_checkpoint(llama_checkpoint, tmp_path, "fp8-static")
    assert_bf16_generation_agrees_with_cpu(fp8_dir, "fp8")


def assert_bf16_generation_agrees_with_cpu(model_dir: Path, quantization: str) -> None:
    """bf16 generation with ``quantization`` on ``cuda`` (decode graphs) runs, stays in the vocabulary and agrees
    with the cpu backend's on the first 4 tokens of at least half the prompts."""
    got, llm = _generate(model_dir, "cuda", "bfloat16", quantization=quantization)
    expected, _ = _generate(model_dir, "cpu", "bfloat16", quantization=quantization)
    vocab = llm.llm_engine.model_config.vocab_size
    assert all(len(t) == 24 and all(0 <= x < vocab for x in t) for t in got)
    agree = sum(ours[:4] == ref[:4] for ours, ref in zip(got, expected, strict=True))
    assert agree >= len(got) // 2, f"only {agree}/{len(got)} prompts agree on their first 4 tokens"


@pytest.mark.parametrize("scheme", ["compressed-tensors-channel", "fp8", "fp8-static"])
def test_fp8_checkpoint_greedy_equals_cpu_fp32(llama_checkpoint: Path, tmp_path: Path, scheme: str) -> None:
    """A checkpoint stored in fp8 (per-row or per-tensor scales; ``fp8-static``: with static input scales)
    loads onto the GPU as it is and generates the cpu backend's tokens from the same file (float32, decode
    graphs)."""
    from pagedllm.testing.fp8_checkpoints import write_fp8_checkpoint

    fp8_dir, _ = write_fp8_checkpoint(llama_checkpoint, tmp_path, scheme)
    expected, _ = _generate(fp8_dir, "cpu", "float32")
    got, llm = _generate(fp8_dir, "cuda", "float32")
    assert llm.llm_engine.config.quantization == "fp8"
    assert llm.llm_engine.executor.worker.runner.model.model.layers[0].mlp.down_proj.weight.is_cuda
    assert_same_tokens(got, expected)


FUSED_SCHEMES = {"fp8": ("", quantize_rows, quantize_rows, "linear_fp8"),
                 "fp8_block": ("_groups", quantize_groups, quantize_blocks, "linear_fp8_block")}
"""scheme -> (the fused ops' suffix, the input quantizer they fuse, the weight quantizer, the projection)."""


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 1000])
@pytest.mark.parametrize("scheme", list(FUSED_SCHEMES))
def test_fused_fp8_inputs_equal_the_unfused_ops(dtype: torch.dtype, rows: int, scheme: str) -> None:
    """SiLU-and-mul quantizing its output (per token, or per token and group of 128 for ``fp8_block``) gives
    the bytes and scales of the unfused op followed by the quantizer (the reference on the CPU). RMSNorm (with
    and without the residual add) too, up to the order of its sum of squares, which the two compilations of
    the kernel may reduce differently: scales within a few float32 ulps, nearly every byte equal and none more
    than one e4m3 step away. The projection of an input quantized beforehand (GEMV at one row, cuBLAS above;
    for groups, the fused ops' padded layout read in place and any other layout copied) equals the projection
    that quantizes it itself."""
    from pagedllm.backends.cuda.backend import CudaBackend

    suffix, quantize, quantize_weight, projection = FUSED_SCHEMES[scheme]
    backend = CudaBackend()
    if scheme not in backend.capabilities().quantizations:
        pytest.skip(f"{scheme} not claimed on this GPU")
    x = (2 * torch.randn(rows, 4096, device="cuda") + 1).to(dtype)
    residual = torch.randn(rows, 4096, device="cuda").to(dtype)
    weight = (1 + 0.1 * torch.randn(4096, device="cuda")).to(dtype)
    gate_up = (3 * torch.randn(rows, 2 * 14336, device="cuda")).to(dtype)
    got_q, got_scale = getattr(backend, "silu_and_mul_fp8" + suffix)(gate_up)
    want_q, want_scale = quantize(backend.silu_and_mul(gate_up).cpu())
    assert torch.equal(got_scale.cpu(), want_scale)
    assert torch.equal(got_q.cpu().view(torch.uint8), want_q.view(torch.uint8))
    normed, summed = backend.add_rms_norm(x, residual.clone(), weight, 1e-5)
    q, scale, fused_sum = getattr(backend, "add_rms_norm_fp8" + suffix)(x, residual.clone(), weight, 1e-5)
    assert torch.equal(fused_sum, summed)
    first = getattr(backend, "rms_norm_fp8" + suffix)(x, weight, 1e-6)
    for (got_q, got_scale), unfused in (((q, scale), normed), (first, backend.rms_norm(x, weight, 1e-6))):
        want_q, want_scale = quantize(unfused.cpu())
        torch.testing.assert_close(got_scale.cpu(), want_scale, rtol=2.0**-21, atol=0.0)
        same = (got_q.cpu().view(torch.uint8) == want_q.view(torch.uint8)).float().mean().item()
        assert same > 0.99, f"{same:.2%} of the bytes equal"
        got, want = got_q.cpu().float(), want_q.float()
        assert ((got - want).abs() <= 0.125 * want.abs() + 2.0**-9).all()
    w_q, w_scale = quantize_weight(torch.randn(6144, 4096, device="cuda") * 0.02)
    bias = torch.randn(6144, device="cuda").to(dtype)
    quantized = getattr(backend, projection + "_quantized")
    got = quantized(*quantize(normed), w_q, w_scale, bias, dtype)
    assert torch.equal(got, getattr(backend, projection)(normed, w_q, w_scale, bias))
    in_place = quantized(q, scale, w_q, w_scale, bias, dtype)  # the fused op's own layout
    assert torch.equal(in_place, quantized(q.clone(), scale.contiguous(), w_q, w_scale, bias, dtype))
