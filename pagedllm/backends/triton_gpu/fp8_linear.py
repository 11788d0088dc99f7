"""fp8 linear layers on ``cuda``: a Triton kernel quantizes the input per token (``"fp8"``) or per token and
128 features (``"fp8_block"``) — or the norm or activation before the projection did (``fused_kernels``,
sharing this module's quantizing helpers) — and cuBLAS multiplies in e4m3.

The quantization is :func:`pagedllm.backends.fp8_linear.quantize_rows` bit for bit (correctly rounded
divisions and products, round to nearest even), over rows or groups; the product is ``torch._scaled_mm``
with row-wise scales (per token and per output row), which the backend claims from compute capability 9.0
(Hopper), or with block-wise scales (1 x 128 for the input, 128 x 128 for the weight: cuBLAS 12.9 and later,
Hopper only). On an H200 the projections of a 16384-token step of a Llama-3-8B-shaped model take 202.5 ms
row-wise against 333.7 ms in bf16 (``benchmarks/fp8_gemm_probe.py``; ~5 ms of the 202.5 are the quantizer);
the products alone 192.8 ms row-wise, 213.6 ms block-wise (``benchmarks/fp8_gemm_probe.py --block``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.backends.fp8_linear import (
    FP8_BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    MIN_SCALE,
    reference_linear_fp8,
    reference_linear_fp8_block,
    reference_linear_fp8_block_quantized,
    reference_linear_fp8_quantized,
)
from pagedllm.backends.fp8_linear import quantize_rows as reference_quantize_rows
from pagedllm.backends.fp8_linear import quantize_with_scale as reference_quantize_with_scale

MAX_ROW = 32768  # wider rows than this are quantized by the PyTorch reference (no model here has them)
E4M3_MAX = tl.constexpr(FP8_MAX)
E4M3_MIN_SCALE = tl.constexpr(MIN_SCALE)
"""e4m3's largest finite value and the smallest scale, as every Triton kernel that quantizes reads them."""


@triton.jit
def e4m3_scale(amax):
    """The rule of ``quantize_rows`` for a row's or group's largest magnitude ``amax`` (float32, a scalar or
    one per group): returns ``(scale, inverse)``, ``scale = max(amax / 448, MIN_SCALE)`` and ``inverse = 1 /
    scale``, both correctly rounded. Every Triton kernel that quantizes to e4m3 takes its scales from here."""
    scale = tl.maximum(tl.div_rn(amax, E4M3_MAX), E4M3_MIN_SCALE)
    return scale, e4m3_inverse(scale)


@triton.jit
def e4m3_inverse(scale):
    """``1 / scale`` correctly rounded (float32, a scalar or a vector): what a value is multiplied by before its
    cast to e4m3."""
    return tl.div_rn(scale * 0.0 + 1.0, scale)  # 1.0 shaped as scale


@triton.jit
def e4m3_scaled(x, inverse):
    """``x * inverse`` (float32) clamped to e4m3's finite range: the value a ``.to(float8e4nv)`` rounds."""
    return tl.clamp(x * inverse, -E4M3_MAX, E4M3_MAX)


@triton.jit
def quantize_row_store(q_ptrs, scale_ptr, x, mask):
    """Quantize one row ``x`` (float32, masked lanes 0) as ``quantize_rows`` does: store its e4m3 values at
    ``q_ptrs`` (where ``mask``) and its scale at ``scale_ptr``. Shared by the quantizer and the fused ops
    that hand fp8 projections their inputs (``fused_kernels``)."""
    scale, inverse = e4m3_scale(tl.max(tl.abs(x), axis=0))
    tl.store(q_ptrs, e4m3_scaled(x, inverse).to(q_ptrs.dtype.element_ty), mask=mask)
    tl.store(scale_ptr, scale)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n_cols, x_row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    quantize_row_store(q_ptr + row * n_cols + cols, scale_ptr + row, x, mask)


@triton.jit
def group_offsets(GROUPS: tl.constexpr, GROUP: tl.constexpr):
    """``[GROUPS, GROUP]`` offsets ``g * GROUP + c``: a row laid out one group per row of a 2-D block, so each
    group's largest magnitude is a reduction along axis 1 (no reshape of a 1-D row, which costs a layout
    conversion through shared memory)."""
    return tl.arange(0, GROUPS)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]


@triton.jit
def quantize_groups_store(q_ptrs, scale_ptr, scale_stride, row, x, mask, n_cols, GROUPS: tl.constexpr,
                          GROUP: tl.constexpr):
    """Quantize row ``row`` ``x`` (float32, ``[GROUPS, GROUP]`` at :func:`group_offsets`, lanes from ``n_cols`` on
    0) per group as ``quantize_groups`` does: store its e4m3 values at ``q_ptrs`` (the same shape; where ``mask``)
    and its scales column-major, group ``g`` at ``scale_ptr + g * scale_stride + row`` (groups from ``n_cols`` on
    not stored). Shared by the group quantizer and the fused ops for ``"fp8_block"`` projections
    (``fused_kernels``)."""
    scale, inverse = e4m3_scale(tl.max(tl.abs(x), axis=1))
    tl.store(q_ptrs, e4m3_scaled(x, inverse[:, None]).to(q_ptrs.dtype.element_ty), mask=mask)
    groups = tl.arange(0, GROUPS)
    tl.store(scale_ptr + groups * scale_stride + row, scale, mask=groups * GROUP < n_cols)


@triton.jit
def fused_row_offsets(BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """Offsets of one row of a fused op's ``BLOCK`` outputs: ``[BLOCK // GROUP, GROUP]`` (:func:`group_offsets`)
    when they are quantized per group of ``GROUP`` (``GROUP > 0``), else ``[BLOCK]``."""
    if GROUP > 0:
        offs = group_offsets(BLOCK // GROUP, GROUP)
    else:
        offs = tl.arange(0, BLOCK)
    return offs


@triton.jit
def fused_quantize_store(q_ptrs, scale_ptr, scale_stride, row, x, mask, n_cols, BLOCK: tl.constexpr,
                         GROUP: tl.constexpr):
    """Quantize row ``row`` of a fused op's output ``x`` (float32, at :func:`fused_row_offsets` ``(BLOCK, GROUP)``)
    for an fp8 projection: per group of ``GROUP`` (:func:`quantize_groups_store`; scales column-major,
    ``scale_stride`` apart per group) when ``GROUP > 0``, else per row (:func:`quantize_row_store`; its scale at
    ``scale_ptr + row``)."""
    if GROUP > 0:
        quantize_groups_store(q_ptrs, scale_ptr, scale_stride, row, x, mask, n_cols, BLOCK // GROUP, GROUP)
    else:
        quantize_row_store(q_ptrs, scale_ptr + row, x, mask)


@triton.jit
def _quantize_groups_kernel(x_ptr, q_ptr, scale_ptr, n_rows, n_cols, x_row_stride, scale_stride,
                            GROUPS: tl.constexpr, GROUP: tl.constexpr):
    """One row of ``x`` per program (rows from ``n_rows`` on read as zeros: padding); the scales stored
    column-major (group ``g`` of row ``r`` at ``g * scale_stride + r``)."""
    row = tl.program_id(0).to(tl.int64)
    offs = group_offsets(GROUPS, GROUP)
    mask = offs < n_cols
    valid = tl.where(row < n_rows, n_cols, 0)  # padding rows load nothing
    x = tl.load(x_ptr + row * x_row_stride + offs, mask=offs < valid, other=0.0).to(tl.float32)
    quantize_groups_store(q_ptr + row * n_cols + offs, scale_ptr, scale_stride, row, x, mask, n_cols, GROUPS, GROUP)


@triton.jit
def _quantize_with_scale_kernel(x_ptr, q_ptr, scale_ptr, row_scale_ptr, n_cols, x_row_stride, BLOCK: tl.constexpr):
    """One row per program, quantized with the given scale at ``scale_ptr`` (as ``quantize_with_scale``), the
    scale written for the row at ``row_scale_ptr``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr)
    q = e4m3_scaled(x, e4m3_inverse(scale))
    tl.store(q_ptr + row * n_cols + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(row_scale_ptr + row, scale)


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
        _quantize_rows_kernel[(rows,)](x, q, scale, cols, x.stride(0), BLOCK=block, num_warps=row_warps(block))
    return q, scale


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: [rows, cols]`` quantized with a static ``scale: [1]`` float32, bit for bit as
    ``pagedllm.backends.fp8_linear.quantize_with_scale``: ``(q [rows, cols] e4m3, scale [rows] float32)``; one
    read of ``x``, one program per row."""
    rows, cols = x.shape
    block = triton.next_power_of_2(cols)
    if block > MAX_ROW or x.stride(1) != 1 or scale.dtype != torch.float32:
        return reference_quantize_with_scale(x, scale)
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=x.device)
    row_scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        _quantize_with_scale_kernel[(rows,)](x, q, scale, row_scale, cols, x.stride(0), BLOCK=block,
                                             num_warps=row_warps(block))
    return q, row_scale


def padded_rows(rows: int) -> int:
    """``rows`` rounded up to a multiple of four: the rows of a block-scaled product's input, as cuBLAS takes
    them (its scales' leading dimension)."""
    return rows + (-rows) % 4


def group_outputs(padded: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Storage for ``padded`` rows (:func:`padded_rows`) of an input quantized per group for cuBLAS's
    block-scaled product: ``(q [padded, cols] e4m3, scale [ceil(cols / 128), padded] float32)`` — the scales
    transposed, as ``torch._scaled_mm`` takes 1 x 128 scales (column-major)."""
    q = torch.empty(padded, cols, dtype=FP8_DTYPE, device=device)
    return q, torch.empty(-(-cols // FP8_BLOCK), padded, dtype=torch.float32, device=device)


def quantize_groups(x: torch.Tensor, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: [rows, cols]`` (unit stride along cols, ``cols <= MAX_ROW``) quantized per group of 128 features
    as ``pagedllm.backends.fp8_linear.quantize_groups`` quantizes it, bit for bit, with zero rows appended up
    to ``padded``: ``(q [padded, cols] e4m3, scale [ceil(cols / 128), padded] float32)`` (see
    :func:`group_outputs`); one program per row."""
    rows, cols = x.shape
    q, scale = group_outputs(padded, cols, x.device)
    if padded:
        block_groups = triton.next_power_of_2(scale.shape[0])
        _quantize_groups_kernel[(padded,)](x, q, scale, rows, cols, x.stride(0), padded,
                                           GROUPS=block_groups, GROUP=FP8_BLOCK,
                                           num_warps=row_warps(block_groups * FP8_BLOCK))
    return q, scale


def as_group_operands(x_q: torch.Tensor, x_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An input quantized per group (``x_q: [rows, cols]`` e4m3, ``x_scale: [rows, groups]`` float32) as the
    block-scaled product takes it: ``(q [padded_rows(rows), cols], scale [groups, padded_rows(rows)])``. The
    views the fused ops return (:func:`group_outputs`' storage, cut to ``rows``) are widened back in place;
    other layouts are copied."""
    rows, cols = x_q.shape
    padded = padded_rows(rows)
    groups = x_scale.shape[1]
    if (x_q.stride() == (cols, 1) and x_q.storage_offset() == 0
            and x_q.untyped_storage().nbytes() >= padded * cols):
        q = x_q.as_strided((padded, cols), (cols, 1))
    else:
        q = torch.nn.functional.pad(x_q.contiguous().view(torch.uint8), (0, 0, 0, padded - rows)).view(FP8_DTYPE)
    if (x_scale.stride() == (1, padded) and x_scale.storage_offset() == 0
            and x_scale.untyped_storage().nbytes() >= 4 * groups * padded):
        return q, x_scale.as_strided((groups, padded), (padded, 1))
    return q, torch.nn.functional.pad(x_scale.t(), (0, padded - rows), value=1.0).contiguous()


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


def block_product_takes(n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether cuBLAS's block-scaled e4m3 product computes an ``[n, k]`` ``"fp8_block"`` layer with ``dtype``
    output here: whole 128-row tiles, a multiple of four 128-feature groups (other widths gave wrong sums on
    an H200 with torch 2.11: ``benchmarks/fp8_gemm_probe.py --block``, K = 384), not float32 (its accumulation is
    below float32's precision, as for row-wise scales)."""
    return n % FP8_BLOCK == 0 and k % (4 * FP8_BLOCK) == 0 and k <= MAX_ROW and dtype != torch.float32


def linear_fp8_block(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x: [num_tokens, in]`` (bf16/fp16/fp32), ``weight: [out, in]`` e4m3, ``weight_scale: [ceil(out / 128),
    ceil(in / 128)]`` float32 -> ``[num_tokens, out]`` in ``x.dtype``: the input quantized per token and
    group of 128 features by :func:`quantize_groups` (its rows padded to a multiple of four, which cuBLAS's
    block-scaled product needs), then ``torch._scaled_mm`` with 1 x 128 and 128 x 128 scales. Shapes and
    dtypes :func:`block_product_takes` declines go through the reference."""
    n, k = weight.shape
    if x.dim() != 2 or not block_product_takes(n, k, x.dtype):
        return reference_linear_fp8_block(x, weight, weight_scale, bias)
    rows = x.shape[0]
    if rows == 0:
        return x.new_empty(0, n)
    x_q, x_scale = quantize_groups(x if x.stride(1) == 1 else x.contiguous(), padded_rows(rows))
    return _block_product(x_q, x_scale, rows, weight, weight_scale, bias, x.dtype)


def linear_fp8_block_quantized(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                               weight_scale: torch.Tensor, bias: torch.Tensor | None,
                               out_dtype: torch.dtype) -> torch.Tensor:
    """The ``"fp8_block"`` product of an input already quantized per token and group (``x_q: [num_tokens, in]``
    e4m3, ``x_scale: [num_tokens, ceil(in / 128)]`` float32; from the fused ops, :func:`group_outputs`' layout
    cut to ``num_tokens``, which costs no copy) in ``out_dtype``, then the bias; the reference for what
    :func:`block_product_takes` declines."""
    n, k = weight.shape
    if x_q.dim() != 2 or not block_product_takes(n, k, out_dtype):
        return reference_linear_fp8_block_quantized(x_q, x_scale, weight, weight_scale, bias, out_dtype)
    rows = x_q.shape[0]
    if rows == 0:
        return x_q.new_empty(0, n, dtype=out_dtype)
    return _block_product(*as_group_operands(x_q, x_scale), rows, weight, weight_scale, bias, out_dtype)


def _block_product(x_q: torch.Tensor, x_scale: torch.Tensor, rows: int, weight: torch.Tensor,
                   weight_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLAS's block-scaled product of ``x_q: [padded, K]`` with scales ``x_scale: [K / 128, padded]`` and the
    tile-scaled ``weight``; the first ``rows`` rows, plus the bias."""
    y = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale.t(), scale_b=weight_scale.t(), out_dtype=out_dtype)
    y = y[:rows]
    return y if bias is None else y + bias
