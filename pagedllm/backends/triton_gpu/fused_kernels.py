"""Fused element-wise ops overriding the ``Backend`` defaults: RMSNorm (with residual add), rotary
embedding (also with per-head q/k norms before it), SiLU-and-mul; and RMSNorm and SiLU-and-mul quantizing
their output for an fp8 projection, per token or per token and group of 128 (one program per row, so a
row's scales are known before it is stored).

They round exactly where the Hugging Face / ``Backend`` default code rounds (after each PyTorch op in the
activation dtype), computing each op in float32 in between, so on the GPU they match the defaults to the
last bit except for the order of RMSNorm's sum of squares. FMA contraction is turned off for the same
reason: these kernels are bound by memory, not arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.backends.fp8_linear import FP8_BLOCK, FP8_DTYPE
from pagedllm.backends.fp8_linear import quantize_groups as reference_quantize_groups
from pagedllm.backends.fp8_linear import quantize_rows as reference_quantize_rows
from pagedllm.backends.triton_gpu.fp8_linear import (
    MAX_ROW,
    fused_quantize_store,
    fused_row_offsets,
    group_outputs,
    padded_rows,
    row_warps,
)

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _rms_norm_kernel(
    out_ptr,
    x_ptr,
    residual_ptr,
    weight_ptr,
    scale_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_s,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    QUANTIZE: tl.constexpr,
    ROUND_TO: tl.constexpr,
    BLOCK: tl.constexpr,
    GROUP: tl.constexpr = 0,
):
    row = tl.program_id(0).to(tl.int64)
    offs = fused_row_offsets(BLOCK, GROUP if QUANTIZE else 0)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # HF adds in the activation dtype
        tl.store(residual_ptr + row * stride_r + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    if QUANTIZE and GROUP > 0:
        variance = tl.sum(tl.sum(x32 * x32, 1), 0) / hidden
    else:
        variance = tl.sum(x32 * x32, 0) / hidden
    normed = (x32 * tl.rsqrt(variance + eps)).to(x.dtype)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    if QUANTIZE:  # e4m3 of the output rounded as the unfused norm returns it; scale_ptr gets its scale(s)
        fused_quantize_store(out_ptr + row * stride_o + offs, scale_ptr, stride_s, row,
                             out.to(ROUND_TO).to(tl.float32), mask, hidden, BLOCK, GROUP)
    else:
        tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as ``[rows, last_dim]`` with a contiguous last dim (copies only when it must)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm(x2: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
          quantize: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the norm over the rows of ``x2: [rows, hidden]`` (``residual``: added first, in place);
    returns ``(out, None)`` in the dtype of ``weight * x``, or quantized (``quantize``: ``"rows"``, ``"groups"``)
    ``(e4m3 out, scale)`` as :func:`_quantized_outputs` gives them."""
    num_rows, hidden = x2.shape
    dtype = torch.result_type(weight, x2)
    block = triton.next_power_of_2(hidden)
    if quantize is None:
        out, scale = torch.empty(x2.shape, dtype=dtype, device=x2.device), None
    else:
        out, scale, block = _quantized_outputs(num_rows, hidden, block, quantize, x2.device)
    if num_rows:
        res = x2 if residual is None else residual
        _rms_norm_kernel[(num_rows,)](
            out, x2, res, weight.contiguous(), out if scale is None else scale, x2.stride(0), res.stride(0),
            out.stride(0), 0 if scale is None or scale.dim() == 1 else scale.stride(0), hidden, eps,
            HAS_RESIDUAL=residual is not None, QUANTIZE=quantize is not None, ROUND_TO=_TL_DTYPES[dtype], BLOCK=block,
            GROUP=FP8_BLOCK if quantize == "groups" else 0, num_warps=_norm_warps(hidden), enable_fp_fusion=False,
        )  # fmt: skip
    return _quantized_views(out, scale, num_rows)


def _quantized_outputs(rows: int, cols: int, block: int, quantize: str,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(q, scale, block)`` for a row kernel quantizing ``[rows, cols]``: per token ``q [rows, cols]``, ``scale
    [rows]``; per group the storage of ``cuda.fp8_linear.group_outputs`` (rows padded, scales column-major)
    and a block of at least one group."""
    if quantize == "groups":
        return (*group_outputs(padded_rows(rows), cols, device), max(block, FP8_BLOCK))
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=device)
    return q, torch.empty(rows, dtype=torch.float32, device=device), block


def _quantized_views(q: torch.Tensor, scale: torch.Tensor | None,
                     rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``rows`` rows of a kernel's outputs: group scales ``[groups, padded]`` seen as ``[rows,
    groups]`` (the interface's shape; ``linear_fp8_block_quantized`` widens them back without a copy)."""
    if scale is None or scale.dim() == 1:
        return q, scale
    return q[:rows], scale[:, :rows].t()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Hugging Face computes it. ``x``: ``[..., hidden]``; ``weight``: ``[hidden]``.

    Returns ``[..., hidden]`` in the dtype of ``weight * x`` (PyTorch promotion).
    """
    return _norm(_rows(x), None, weight, eps, quantize=None)[0].view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm in one pass; returns ``(rms_norm(x + residual), x + residual)``.

    ``x``/``residual``: ``[num_tokens, hidden]`` of one dtype, ``residual`` contiguous (the sum is written
    into it in place, and it is the second element returned); ``weight``: ``[hidden]``.
    """
    x2 = _rows(x)
    out, _ = _norm(x2, residual.view(x2.shape), weight, eps, quantize=None)
    return out.view(x.shape), residual


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 quantize: str = "rows") -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows(rms_norm(x, weight, eps))`` in one pass: ``x: [num_tokens, hidden]`` -> ``(q [num_tokens,
    hidden] e4m3, scale [num_tokens] float32)``; bit for bit but for the order of the sum of squares, which
    this compilation of the kernel may reduce differently from :func:`rms_norm`'s (RESULTS.md run 69). With
    ``quantize="groups"``, ``quantize_groups`` of it instead: ``scale [num_tokens, ceil(hidden / 128)]``."""
    return _norm(_rows(x), None, weight, eps, quantize=quantize)  # type: ignore[return-value]


def add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     quantize: str = "rows") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`add_rms_norm` with its normed output quantized per token (or per token and group: ``quantize``
    as in :func:`rms_norm_fp8`) in the same pass: returns ``(q, scale, x + residual)`` (the sum written into
    ``residual``, contiguous, in place)."""
    x2 = _rows(x)
    q, scale = _norm(x2, residual.view(x2.shape), weight, eps, quantize=quantize)
    return q, scale, residual  # type: ignore[return-value]


def _norm_warps(hidden: int) -> int:
    return 4 if hidden <= 1024 else 8 if hidden <= 4096 else 16


@triton.jit
def _rotate_heads(
    out_ptr,
    in_ptr,
    weight_ptr,
    stride_in_h,
    stride_out_h,
    cos,
    sin,
    eps,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    NORM: tl.constexpr,
):
    """Rotate every head of one token: ``out = x * cos + rotate_half(x) * sin`` rounding as PyTorch does; with
    ``NORM``, each head is first RMS-normed over its ``2 * HALF`` elements with ``weight_ptr``'s ``[2 * HALF]``
    weights, rounded as :func:`rms_norm` rounds a row (Qwen3's q/k norms)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    mask = (offs_h < NUM_HEADS)[:, None] & d_mask[None, :]
    src = in_ptr + offs_h[:, None] * stride_in_h + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    dt = x1.dtype
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    if NORM:
        variance = (tl.sum(x1f * x1f, 1) + tl.sum(x2f * x2f, 1)) / (2 * HALF)
        inverse_rms = tl.rsqrt(variance + eps)[:, None]
        w1 = tl.load(weight_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(weight_ptr + HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        x1f = (w1 * (x1f * inverse_rms).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x2f = (w2 * (x2f * inverse_rms).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    c = cos.to(dt).to(tl.float32)[None, :]  # the default casts cos/sin to the activation dtype first
    s = sin.to(dt).to(tl.float32)[None, :]
    o1 = ((x1f * c).to(dt).to(tl.float32) - (x2f * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2f * c).to(dt).to(tl.float32) + (x1f * s).to(dt).to(tl.float32)).to(dt)
    dst = out_ptr + offs_h[:, None] * stride_out_h + offs_d[None, :]
    tl.store(dst, o1, mask=mask)
    tl.store(dst + HALF, o2, mask=mask)


@triton.jit
def _rotary_kernel(
    q_out_ptr,
    k_out_ptr,
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_sin_ptr,
    q_weight_ptr,
    k_weight_ptr,
    eps,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cs,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    NORM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_d, mask=d_mask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_d, mask=d_mask, other=0.0)
    _rotate_heads(q_out_ptr + token * stride_qot, q_ptr + token * stride_qt, q_weight_ptr, stride_qh, stride_qoh,
                  cos, sin, eps, NUM_Q_HEADS, HALF, BLOCK_HQ, BLOCK_HALF, NORM)  # fmt: skip
    _rotate_heads(k_out_ptr + token * stride_kot, k_ptr + token * stride_kt, k_weight_ptr, stride_kh, stride_koh,
                  cos, sin, eps, NUM_K_HEADS, HALF, BLOCK_HK, BLOCK_HALF, NORM)  # fmt: skip


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor,
    head_norms: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, NeoX / "rotate half" layout, of query and key in one launch.

    ``positions``: ``[num_tokens]`` int64; ``query``: ``[num_tokens, num_heads, head_dim]``; ``key``:
    ``[num_tokens, num_kv_heads, head_dim]`` (views of a fused QKV tensor are fine); ``cos_sin_cache``:
    ``[max_position, head_dim]`` float32, cos in the first half, sin in the second; ``head_norms``: ``(q_weight
    [head_dim], k_weight [head_dim], eps)`` to RMS-norm every head of query and key first, in the same pass
    (``Backend.qk_norm_rotary_embedding``; weights in the activation dtype). Returns new rotated ``(query,
    key)`` tensors of the same shapes and dtypes; the inputs are not modified.
    """
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    cos_sin_cache = cos_sin_cache.contiguous()
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    q_weight, k_weight, eps = (query, key, 0.0) if head_norms is None else head_norms  # unread without norms
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            q_out, k_out, query, key, positions, cos_sin_cache, q_weight.contiguous(), k_weight.contiguous(), eps,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
            NUM_Q_HEADS=num_heads, NUM_K_HEADS=num_kv_heads, HALF=half,
            BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
            BLOCK_HALF=triton.next_power_of_2(half), NORM=head_norms is not None, num_warps=4, enable_fp_fusion=False,
        )  # fmt: skip
    return q_out, k_out


@triton.jit
def silu_mul_values(gate, up):
    """``silu(gate) * up`` of two blocks of one dtype, in that dtype, rounded as PyTorch rounds."""
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # silu as PyTorch computes it, rounded like it
    return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _silu_mul(x_row_ptr, cols, mask, d):
    """``silu(gate) * up`` of one row's columns ``cols``, in the input dtype, rounded as PyTorch rounds."""
    gate = tl.load(x_row_ptr + cols, mask=mask, other=0.0)
    up = tl.load(x_row_ptr + d + cols, mask=mask, other=0.0)
    return silu_mul_values(gate, up)


@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    out = _silu_mul(x_ptr + row * stride_x, cols, mask, d)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_fp8_kernel(q_ptr, scale_ptr, x_ptr, stride_x, stride_s, d, BLOCK: tl.constexpr,
                             GROUP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = fused_row_offsets(BLOCK, GROUP)
    mask = cols < d
    out = _silu_mul(x_ptr + row * stride_x, cols, mask, d).to(tl.float32)
    fused_quantize_store(q_ptr + row * d + cols, scale_ptr, stride_s, row, out, mask, d, BLOCK, GROUP)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :d]) * x[:, d:]``; ``x``: ``[num_tokens, 2 * d]``, returns ``[num_tokens, d]``."""
    x2 = _rows(x)
    num_rows, d = x2.shape[0], x2.shape[1] // 2
    out = torch.empty((num_rows, d), dtype=x.dtype, device=x.device)
    if num_rows:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(num_rows, triton.cdiv(d, block))](
            out, x2, x2.stride(0), out.stride(0), d, BLOCK=block, num_warps=4, enable_fp_fusion=False
        )
    return out.view(*x.shape[:-1], d)


def silu_and_mul_fp8(x: torch.Tensor, quantize: str = "rows") -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows(silu_and_mul(x))`` in one pass, bit for bit: ``x: [num_tokens, 2 * d]`` -> ``(q
    [num_tokens, d] e4m3, scale [num_tokens] float32)``; with ``quantize="groups"``, ``quantize_groups`` of it
    (``scale [num_tokens, ceil(d / 128)]``, as :func:`rms_norm_fp8` lays it out). One program per row (wider
    rows than MAX_ROW: the two ops apart)."""
    x2 = _rows(x)
    num_rows, d = x2.shape[0], x2.shape[1] // 2
    block = triton.next_power_of_2(d)
    if block > MAX_ROW:
        quantizer = reference_quantize_rows if quantize == "rows" else reference_quantize_groups
        return quantizer(silu_and_mul(x2))
    q, scale, block = _quantized_outputs(num_rows, d, block, quantize, x.device)
    if num_rows:
        _silu_and_mul_fp8_kernel[(num_rows,)](q, scale, x2, x2.stride(0), scale.stride(0) if scale.dim() == 2 else 0,
                                              d, BLOCK=block, GROUP=FP8_BLOCK if quantize == "groups" else 0,
                                              num_warps=row_warps(block), enable_fp_fusion=False)
    return _quantized_views(q, scale, num_rows)  # type: ignore[return-value]
