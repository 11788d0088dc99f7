"""Triton GEMV: the linear layers of one-token steps (batch-1 decode), ``y = x @ W.T (+ b)`` for ``x: [1, K]``.

A batch-1 decode step reads every weight once and does almost nothing else, so its time is how fast the
linear layers stream their weights. cuBLAS reaches 2.3 to 3.2 TB/s on the projections of an 8B model and
its tensor-parallel halves on an H200 (copy bandwidth 4.2 TB/s); this kernel reaches 2.8 to 4.1 TB/s on
the same shapes (``benchmarks/gemv_probe.py``): each program owns ``BLOCK_N`` output rows, streams them in
``[BLOCK_N, BLOCK_K]`` tiles with a float32 accumulator of the tile's shape (one reduction at the end), and
there are enough programs (one per ``BLOCK_N`` rows) to keep every SM's loads in flight.

The fp8 GEMV (``quantization="fp8"``) streams e4m3 weights the same way, quantizes its input per token
inside each program (or takes it quantized by the norm or activation before it), and sums runs of products
before accumulating (:data:`FP8_GROUP`): 1.7 to 3.7 TB/s of e4m3 weight on the same shapes, the smallest
matrices slowest. With 128 x 128 tile scales (``quantization="fp8_block"``) it quantizes each 128-feature group
of its input and scales each group's sums by that group's input and weight-tile scales
(:func:`gemv_fp8_block`); cuBLAS's block-scaled product, which needs four rows, took 4.29 ms per token at
batch 1 on an H200 where the row-wise fp8 GEMV takes 3.0 (RESULTS.md run 74).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.backends.fp8_linear import FP8_BLOCK, FP8_DTYPE, block_scale_shape
from pagedllm.backends.triton_gpu.fp8_linear import e4m3_scale, e4m3_scaled


@triton.jit
def _gemv_kernel(
    y_ptr,
    x_ptr,
    w_ptr,
    bias_ptr,
    N,
    K,
    stride_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K
        w = tl.load(w_rows + (k + cols)[None, :], mask=row_mask[:, None], other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptr + k + cols)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def gemv_config(n: int, k: int) -> tuple[int, int, int] | None:
    """``(BLOCK_N, BLOCK_K, num_warps)`` for a ``[n, k]`` weight, or None when ``k`` is not a multiple of 64.

    Wide outputs (gate|up, the LM head) take short tiles and many programs; small matrices narrow
    programs; the others long tiles. Chosen from the sweep of ``benchmarks/gemv_probe.py`` on an H200.
    """
    block_k = next((b for b in (1024, 512, 256, 128, 64) if k % b == 0), None)
    if block_k is None:
        return None
    if n >= 8192:
        block_k = min(block_k, 256)
    block_n = 16 if n >= 4096 else 8 if n >= 1024 else 4
    if n * k <= 1 << 23:  # small matrices (an 8B model's o_proj split over two GPUs): more, shorter programs
        block_n, block_k = 4, min(block_k, 512)
    return block_n, block_k, 4 if block_n * block_k <= 4096 else 8


def _accepted_config(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_dtype: torch.dtype,
                     out_dtype: torch.dtype, config: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """``config`` (the tiles) for ``x @ weight.T`` over one row, or None when the kernels do not take the
    inputs or there are no tiles: ``x: [1, K]``, ``weight: [N, K]`` of ``weight_dtype`` with unit stride
    along K, ``bias: [N]`` in ``out_dtype`` or None, K a multiple of the tiles' ``BLOCK_K``."""
    n, k = weight.shape
    if x.shape != (1, k) or weight.stride(1) != 1 or weight.dtype != weight_dtype:
        return None
    if bias is not None and (bias.dtype != out_dtype or bias.shape != (n,)):
        return None
    return None if config is None or k % config[1] else config


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None) -> torch.Tensor | None:
    """``x @ weight.T + bias`` for one row, or None when the kernel does not take these inputs.

    ``x``: ``[1, K]``; ``weight``: ``[N, K]`` with unit stride along K; ``bias``: ``[N]`` or None; one
    floating dtype for all. ``config`` overrides :func:`gemv_config` (benchmarks sweep it). Returns ``[1, N]``
    in ``x``'s dtype.
    """
    n, k = weight.shape
    config = _accepted_config(x, weight, bias, x.dtype, x.dtype, config or gemv_config(n, k))
    if config is None:
        return None
    block_n, block_k, warps = config
    x = x.contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        y, x, weight, bias if bias is not None else weight, n, k, weight.stride(0), HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )  # fmt: skip
    return y


FP8_GROUP = 16
"""The fp8 GEMV sums each run of 16 products (one thread's 16-byte load of e4m3 weights) before adding it to
its accumulator: a 16 times smaller accumulator than the bf16 kernel's, which leaves registers for longer
tiles (on an H200: qkv 12.6 -> 9.1 us, gate_up 34.8 -> 31.4 us; RESULTS.md run 67)."""


@triton.jit
def _gemv_fp8_kernel(
    y_ptr,
    x_ptr,
    x_scale_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    N,
    K,
    stride_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    X_QUANTIZED: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_K)
    if X_QUANTIZED:  # x is e4m3 already, its scale at x_scale_ptr
        x_scale = tl.load(x_scale_ptr)
        x_inverse = 1.0
    else:  # every program scales x itself: one read of x from L2
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + k + cols).to(tl.float32)))
        x_scale, x_inverse = e4m3_scale(tl.max(amax, 0))
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K // GROUP], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K
        w = tl.load(w_rows + (k + cols)[None, :], mask=row_mask[:, None], other=0.0, eviction_policy="evict_first")
        if X_QUANTIZED:
            x = tl.load(x_ptr + k + cols).to(tl.float32)
        else:
            x = e4m3_scaled(tl.load(x_ptr + k + cols).to(tl.float32), x_inverse)
            x = x.to(w_ptr.dtype.element_ty).to(tl.float32)
        p = w.to(tl.float32) * x[None, :]
        acc += tl.sum(tl.reshape(p, [BLOCK_N, BLOCK_K // GROUP, GROUP]), 2)  # runs of GROUP summed first
    y = tl.sum(acc, 1) * x_scale * tl.load(w_scale_ptr + rows, mask=row_mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def gemv_fp8_config(n: int, k: int) -> tuple[int, int, int] | None:
    """``(BLOCK_N, BLOCK_K, num_warps)`` of the fp8 GEMV for a ``[n, k]`` e4m3 weight, or None when ``k`` is
    not a multiple of 64: wide outputs (gate|up) 16 rows by 512, the others 8 rows by 1024, four warps; the
    best or within 3% of it on every projection of an 8B model and its tp=2 slices in the sweep of
    ``benchmarks/gemv_probe.py --fp8`` on an H200."""
    wide = n >= 8192
    block_k = next((b for b in (1024, 512, 256, 128, 64) if k % b == 0 and (b <= 512 or not wide)), None)
    return None if block_k is None else (16 if wide else 8, block_k, 4)


def gemv_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
             config: tuple[int, int, int] | None = None) -> torch.Tensor | None:
    """The fp8 linear layer of ``pagedllm.backends.fp8_linear`` for one row, or None when the kernel does not
    take these inputs: ``x: [1, K]`` is quantized per token inside each program (the reference's rounding),
    each ``[BLOCK_N, BLOCK_K]`` tile of the e4m3 ``weight: [N, K]`` (unit stride along K) is widened to
    float32 and multiplied, the products summed in float32, and the sums scaled by both scales
    (``weight_scale: [N]`` float32). ``bias``: ``[N]`` in ``x``'s dtype or None. ``config`` overrides
    :func:`gemv_fp8_config` (benchmarks sweep it). Returns ``[1, N]`` in ``x``'s dtype.
    """
    return _gemv_fp8(x, None, weight, weight_scale, bias, x.dtype, config)


def gemv_fp8_quantized(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype,
                       config: tuple[int, int, int] | None = None) -> torch.Tensor | None:
    """:func:`gemv_fp8` of an input quantized already (``x_q: [1, K]`` e4m3, ``x_scale: [1]`` float32): no
    pass over x for its scale. ``bias`` in ``out_dtype``; returns ``[1, N]`` in ``out_dtype``, or None when
    the kernel does not take the inputs."""
    if x_q.dtype != FP8_DTYPE or x_scale.shape != (1,) or x_scale.dtype != torch.float32:
        return None
    return _gemv_fp8(x_q, x_scale, weight, weight_scale, bias, out_dtype, config)


@triton.jit
def _gemv_fp8_block_kernel(
    y_ptr,
    x_ptr,
    x_scale_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    N,
    K,
    stride_w,
    stride_s,
    stride_xs,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    TILE: tl.constexpr,
    X_QUANTIZED: tl.constexpr,
):
    """One program per ``BLOCK_N`` output rows (inside one row of 128 x 128 weight tiles: BLOCK_N divides
    TILE); per ``BLOCK_K`` columns, the input's ``BLOCK_K // TILE`` groups quantized as
    ``quantize_groups`` does (or, ``X_QUANTIZED``, read in e4m3 with their scales at ``x_scale_ptr``, one
    every ``stride_xs``), the products summed per group and scaled by both scales."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    GROUPS: tl.constexpr = BLOCK_K // TILE
    groups = tl.arange(0, GROUPS)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    scale_row = w_scale_ptr + ((pid * BLOCK_N) // TILE) * stride_s
    acc = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K
        w = tl.load(w_rows + (k + cols)[None, :], mask=row_mask[:, None], other=0.0, eviction_policy="evict_first")
        if X_QUANTIZED:
            x_scale = tl.load(x_scale_ptr + (k // TILE + groups) * stride_xs)
            x = tl.load(x_ptr + k + cols).to(tl.float32)
        else:
            x = tl.reshape(tl.load(x_ptr + k + cols).to(tl.float32), [GROUPS, TILE])
            x_scale, x_inverse = e4m3_scale(tl.max(tl.abs(x), axis=1))
            x = e4m3_scaled(x, x_inverse[:, None])
            x = tl.reshape(x.to(w_ptr.dtype.element_ty).to(tl.float32), [BLOCK_K])
        runs = tl.sum(tl.reshape(w.to(tl.float32) * x[None, :], [BLOCK_N, BLOCK_K // GROUP, GROUP]), 2)
        sums = tl.sum(tl.reshape(runs, [BLOCK_N, GROUPS, TILE // GROUP]), 2)
        acc += sums * (x_scale * tl.load(scale_row + k // TILE + groups))[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def gemv_fp8_block(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None = None, config: tuple[int, int, int] | None = None) -> torch.Tensor | None:
    """The ``"fp8_block"`` linear layer (``pagedllm.backends.fp8_linear.reference_linear_fp8_block``) for one
    row, or None when the kernel does not take these inputs: ``x: [1, K]`` (bf16/fp16/fp32) quantized per
    group of 128 features inside each program, ``weight: [N, K]`` e4m3 (unit stride along K, K a multiple of
    128), ``weight_scale: [ceil(N / 128), K / 128]`` float32, ``bias: [N]`` in ``x``'s dtype or None; the
    tiles of :func:`gemv_fp8_config` (or ``config``). Returns ``[1, N]`` in ``x``'s dtype."""
    return _gemv_fp8(x, None, weight, weight_scale, bias, x.dtype, config, block=True)


def gemv_fp8_block_quantized(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                             weight_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                             config: tuple[int, int, int] | None = None) -> torch.Tensor | None:
    """:func:`gemv_fp8_block` of an input quantized per group already (``x_q: [1, K]`` e4m3, ``x_scale: [1, K /
    128]`` float32, any strides): no quantization in the programs. ``bias`` in ``out_dtype``; returns ``[1,
    N]`` in ``out_dtype``, or None when the kernel does not take the inputs."""
    if x_q.dtype != FP8_DTYPE or x_scale.shape != (1, x_q.shape[-1] // FP8_BLOCK) or x_scale.dtype != torch.float32:
        return None
    return _gemv_fp8(x_q, x_scale, weight, weight_scale, bias, out_dtype, config, block=True)


def _gemv_fp8(x: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, config: tuple[int, int, int] | None,
              block: bool = False) -> torch.Tensor | None:
    """Launch the fp8 GEMV with per-row weight scales (``_gemv_fp8_kernel``) or, ``block``, with 128 x 128 tile
    scales (``_gemv_fp8_block_kernel``): ``x`` in its dtype (quantized in the programs) or, with ``x_scale``, in
    e4m3; None when the kernel does not take these inputs (see the public entry points)."""
    n, k = weight.shape
    config = _accepted_config(x, weight, bias, FP8_DTYPE, out_dtype, config or gemv_fp8_config(n, k))
    if config is None:
        return None
    block_n, block_k, warps = config
    if block:
        tiles_fit = block_k % FP8_BLOCK == 0 and FP8_BLOCK % block_n == 0
        if not tiles_fit or weight_scale.shape != block_scale_shape(n, k) or weight_scale.stride(1) != 1:
            return None
    elif weight_scale.shape != (n,):
        return None
    x = x.contiguous()
    y = torch.empty(1, n, dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(n, block_n),)
    operands = (y, x, weight_scale if x_scale is None else x_scale, weight, weight_scale,
                bias.contiguous() if bias is not None else weight_scale, n, k, weight.stride(0))
    flags = dict(HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=FP8_GROUP,
                 X_QUANTIZED=x_scale is not None, num_warps=warps)
    if block:
        _gemv_fp8_block_kernel[grid](*operands, weight_scale.stride(0), 1 if x_scale is None else x_scale.stride(1),
                                     TILE=FP8_BLOCK, **flags)  # fmt: skip
    else:
        _gemv_fp8_kernel[grid](*operands, **flags)
    return y
