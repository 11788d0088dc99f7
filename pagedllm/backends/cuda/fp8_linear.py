"""fp8 linear layers on ``cuda``: a Triton kernel quantizes the input per token, cuBLAS multiplies in e4m3.

The quantization is :func:`pagedllm.backends.fp8_linear.quantize_rows` bit for bit (correctly rounded
divisions and products, round to nearest even); the product is ``torch._scaled_mm`` with row-wise scales
(per token and per output row), which the backend claims from compute capability 9.0 (Hopper). On an H200 the
projections of a 16384-token step of a Llama-3-8B-shaped model take 202.5 ms this way against 333.7 ms in
bf16 (``benchmarks/fp8_gemm_probe.py``; ~5 ms of the 202.5 are the quantizer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.backends.fp8_linear import (
    FP8_DTYPE,
    FP8_MAX,
    MIN_SCALE,
    reference_linear_fp8,
    reference_linear_fp8_quantized,
)
from pagedllm.backends.fp8_linear import quantize_rows as reference_quantize_rows

MAX_ROW = 32768  # wider rows than this are quantized by the PyTorch reference (no model here has them)


@triton.jit
def quantize_row_store(q_ptrs, scale_ptr, x, mask, FP8_MAX_C: tl.constexpr, MIN_SCALE_C: tl.constexpr):
    """Quantize one row ``x`` (float32, masked lanes 0) as ``quantize_rows`` does: store its e4m3 values at
    ``q_ptrs`` (where ``mask``) and its scale at ``scale_ptr``. Shared by the quantizer and the fused ops
    that hand fp8 projections their inputs (``fused_kernels``)."""
    scale = tl.maximum(tl.div_rn(tl.max(tl.abs(x), axis=0), FP8_MAX_C), MIN_SCALE_C)
    q = tl.clamp(x * tl.div_rn(1.0, scale), -FP8_MAX_C, FP8_MAX_C)
    tl.store(q_ptrs, q.to(q_ptrs.dtype.element_ty), mask=mask)
    tl.store(scale_ptr, scale)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n_cols, x_row_stride, FP8_MAX_C: tl.constexpr,
                          MIN_SCALE_C: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    quantize_row_store(q_ptr + row * n_cols + cols, scale_ptr + row, x, mask, FP8_MAX_C, MIN_SCALE_C)


def row_warps(block: int) -> int:
    """Warps for one program over a row of ``block`` (a power of two) elements."""
    return min(16, max(4, block // 1024))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: [rows, cols]`` (unit stride along cols) -> ``(q [rows, cols] e4m3, scale [rows] float32)``, as the
    reference computes them; one program per row."""
    rows, cols = x.shape
    block = triton.next_power_of_2(cols)
    if block > MAX_ROW or x.stride(1) != 1:
        return reference_quantize_rows(x)
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        _quantize_rows_kernel[(rows,)](x, q, scale, cols, x.stride(0), FP8_MAX_C=FP8_MAX, MIN_SCALE_C=MIN_SCALE,
                                       BLOCK=block, num_warps=row_warps(block))
    return q, scale


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x: [num_tokens, in]`` (bf16/fp16/fp32), ``weight: [out, in]`` e4m3, ``weight_scale: [out]`` float32 ->
    ``[num_tokens, out]`` in ``x.dtype``: the input quantized per token, then :func:`linear_fp8_quantized`.
    Through the reference instead: shapes cuBLAS's e4m3 product does not take (a dimension of ``weight`` not a
    multiple of 16), and float32 inputs — Hopper's e4m3 tensor cores add with about 2^-13 relative precision
    (9e-5 on these layers, measured), below bf16/fp16 output rounding but not float32's."""
    n, k = weight.shape
    if n % 16 or k % 16 or x.dtype == torch.float32:
        return reference_linear_fp8(x, weight, weight_scale, bias)
    return linear_fp8_quantized(*quantize_rows(x), weight, weight_scale, bias, x.dtype)


def linear_fp8_quantized(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The product of an input already quantized per token (``x_q: [num_tokens, in]`` e4m3, ``x_scale:
    [num_tokens]`` float32) with ``weight``: one e4m3 product with float32 accumulation scaled row- and
    column-wise in its epilogue, in ``out_dtype``, then the bias; the reference for the shapes and the
    float32 output :func:`linear_fp8` sends there."""
    n, k = weight.shape
    if n % 16 or k % 16 or out_dtype == torch.float32:
        return reference_linear_fp8_quantized(x_q, x_scale, weight, weight_scale, bias, out_dtype)
    y = torch._scaled_mm(x_q.contiguous(), weight.t(), scale_a=x_scale[:, None], scale_b=weight_scale[None, :],
                         out_dtype=out_dtype)
    return y if bias is None else y + bias
