"""4-bit-weight linear layers (``"w4a16"``) on ``cuda`` and ``rocm``: a Triton GEMM that dequantizes the weight as
it reads it and a GEMV for one-token steps, ``y = x @ W.T + bias`` with ``W[n, k] = (q[n, k] - zeros[n, g(k)]) *
scales[n, g(k)]``.

The layout is :mod:`pagedllm.backends.w4a16_linear`'s (``weight [out, in // 8]`` int32, eight 4-bit values a word
along the input features; ``scales``/``zeros [out, in // group_size]``; ``g_idx [in]`` or None) and the result
is :func:`~pagedllm.backends.w4a16_linear.reference_linear_w4a16`'s up to rounding: each GEMM program owns a
``[BLOCK_M, BLOCK_N]`` tile of outputs and walks the input features in steps of ``BLOCK_K``. A step loads the
input's ``[BLOCK_M, BLOCK_K]`` tile and the ``[BLOCK_N, BLOCK_K // 8]`` words of the weight tile (each word read
once; ``tl.interleave`` repeats it for its eight features, which shift their nibble out), dequantizes in float32
(:data:`MAGIC_BITS`: no integer-to-float conversions) — one scale and zero point per output row when the step
lies in one group (no ``g_idx``, ``BLOCK_K`` dividing ``group_size``), else gathered per feature (act-order
checkpoints whose groups differ in size: the loader sorts the others by group) — casts to the input's dtype and
multiplies on the tensor cores with float32 accumulation (``"ieee"`` for float32 inputs, so they match the
float32 reference). Steps of up to 32 rows compute each tile transposed (``W x^T``: the weight's rows fill the
tall side of the tensor-core product). The tiles by step rows are the GPU family's (``KernelTuning.w4a16``;
:data:`TILES` on NVIDIA).

One-token steps without ``g_idx`` take the GEMV (:func:`gemv_w4a16`: no tensor cores, no shuffles; nibble ``j``
of each word meets input feature ``8 w + j`` in eight passes over the words as loaded, each group's zero point
applied as ``sum q x - z sum x``). Decode steps have few output tiles: the input features are then split over
:func:`split_k` programs per output tile so that about two programs per SM stream the weight, each writing its
float32 partial sums, and a second kernel adds the splits in a fixed order (deterministic), adds the bias and
rounds to the input's dtype. The tiles and the split depend on shapes only (no host sync, nothing read from the
device), so decode steps can be captured in CUDA graphs.

On an H200 (Triton 3.6, bf16, group size 128, in CUDA graphs, weights rotated past L2; RESULTS.md run 140),
Llama-3-8B's projections take about what bf16 cuBLAS takes for one to 16 tokens (one token through the GEMV:
q|k|v 17.2 us against 16.9, o 11.6 against 13.7, gate|up 49.1 against 56.8, down 28.3 against 32.3) — 0.6 to
1.3 TB/s of 4-bit weight, a third of the bandwidth — 0.55 to 0.82x cuBLAS at 64 tokens and 0.35 to 0.46x from
256 on (gate|up at 1024 tokens 687 us against 309). Nsight Compute on gate|up at one token: L1/shared memory 86%
busy, DRAM 17% (the dequantized tile is staged through shared memory for the product). Gathering a scale and a
zero point per feature (``g_idx``) runs 5 to 9 times slower (o_proj 77 us at one token). A Triton kernel
dequantizing the whole weight for cuBLAS was slower still (1.06 ms for gate|up) and is not used.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pagedllm.backends.triton_gpu.attention_common import dot_precision
from pagedllm.backends.triton_gpu.tuning import W4A16Table, W4A16Tiles
from pagedllm.backends.w4a16_linear import PACK

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GROUP_M = 8
"""Output tiles are visited in groups of this many row tiles down each column of tiles, so the weight tiles a
group reads stay in L2 while its rows are computed (large steps only; a decode step has one row tile)."""
MIN_STEPS_PER_SPLIT = 4
"""No split of the input features is shorter than this many ``BLOCK_K`` steps: each split writes a float32
partial tile, which should stay small against the weight it streams."""
MAX_SPLIT_K = 16
DEFAULT_NUM_SMS = 132
"""SMs assumed where no CUDA device is asked (the interpreter on the CPU): an H100's or H200's count."""
REDUCE_BLOCK = 1024
GEMV_ROWS = 1
"""Steps of up to this many tokens (without act-order) take the GEMV (:func:`gemv_w4a16`), which streams the
weight once per token: on an H200 (``benchmarks/w4a16_probe.py``, RESULTS.md run 140) one token through a
Llama-3-8B layer's four projections took 106 us against the GEMM's 127 (bf16 cuBLAS on the dense weights: 120);
from two tokens on the GEMM was faster."""
GEMV_TILES = (128, 16, 8)
"""The GEMV's ``(BLOCK_N, BLOCK_W, num_warps)``: 128 output rows by 16 words (128 features) a step, 8 warps; the
best of seven tiles on all four projections at one token (run 140)."""
MAGIC = tl.constexpr(8388608.0)
MAGIC_BITS = tl.constexpr(0x4B000000)
"""2^23 and its float32 bits: ``bits | v`` for an integer ``0 <= v < 2^23`` is the float32 ``2^23 + v``, so 4-bit
values and zero points become floats by an OR and their difference by one exact subtraction."""


TILES: W4A16Table = (
    (16, W4A16Tiles(16, 128, 128, 4, 3, swap_ab=True)),
    (32, W4A16Tiles(32, 64, 128, 4, 4, swap_ab=True)),
    (64, W4A16Tiles(64, 64, 64, 4, 4)),
    (1 << 62, W4A16Tiles(128, 128, 64, 8, 3)),
)
"""``(largest row count, tiles)`` by the rows of the step, first match: four variants, each taking whole
power-of-two decode batches (the engine warms 1, 2, 4, ... rows). The best or within 5% of the best of 4 to 13
tiles timed on an H200 (Triton 3.6, bf16, group size 128) for Llama-3-8B's o_proj, gate_up and down at 1, 16,
32, 64, 256, 1024 and 4096 rows, except 64 rows' gate_up (within 8%)."""


def w4a16_tiles(rows: int, table: W4A16Table = TILES) -> W4A16Tiles:
    """The tiles for a step of ``rows`` input rows (tokens): the first entry of ``table`` (a GPU family's, default
    :data:`TILES`, NVIDIA's) taking that many. Called at every launch (host side, shapes only); ``BLOCK_M`` grows
    with ``rows``."""
    return next(tiles for limit, tiles in table if rows <= limit)


def step_length(block_k: int, group_size: int, in_features: int) -> int:
    """``BLOCK_K`` of a launch whose tiles allow ``block_k`` (a power of two, at least 32): the longest power of
    two not above it and at least 32 dividing ``group_size`` (then every step lies in one group), else dividing
    ``in_features``, else 32 (the last step then masked). Not 16: 16-feature steps gave wrong sums with 16- and
    32-row tiles (bf16 and fp16, Triton 3.6 on an H200; 64-row tiles and float32 were right)."""
    for divisor in (group_size, in_features):
        length = block_k
        while length > 32 and divisor % length:
            length //= 2
        if divisor % length == 0:
            return length
    return 32


def split_k(tiles_mn: int, k_steps: int, num_sms: int) -> int:
    """How many programs share each output tile's input features: 1 when the ``tiles_mn`` output tiles cover the
    ``num_sms`` SMs once; else enough ``tiles_mn * split`` programs to give every SM about two, each with at least
    :data:`MIN_STEPS_PER_SPLIT` of the ``k_steps`` steps, at most :data:`MAX_SPLIT_K`; rounded down to a power of
    two. From shapes only (a captured graph replays it). On an H200, 1024 rows of a 4096 x 4096 layer (256 tiles)
    took 90 us unsplit and 153 us in two splits; 256 rows (64 tiles) 60 us unsplit and 45 us in four."""
    if tiles_mn >= num_sms:
        return 1
    wanted = triton.cdiv(2 * num_sms, max(1, tiles_mn))
    cap = max(1, k_steps // MIN_STEPS_PER_SPLIT)
    n = max(1, min(wanted, cap, MAX_SPLIT_K))
    return 1 << (n.bit_length() - 1)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int:
    """The SMs of ``device`` (cached), or :data:`DEFAULT_NUM_SMS` off CUDA."""
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit(do_not_specialize=["M", "steps_per_split"])
def _w4a16_gemm_kernel(
    out_ptr, x_ptr, w_ptr, scales_ptr, zeros_ptr, g_idx_ptr, bias_ptr,
    M, N, K, steps_per_split,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_out_split, stride_out_m,
    GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr, GROUP_PER_STEP: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Output tile ``program_id(0)`` (grouped order), input features ``[s * steps_per_split, (s + 1) *
    steps_per_split)`` steps of ``BLOCK_K`` for split ``s = program_id(1)``: stores the float32 sum (plus the bias
    when ``HAS_BIAS``) at ``out_ptr + s * stride_out_split``, rounded to ``out_ptr``'s dtype. Rows and columns
    past ``M`` and ``N`` read row and column ``i % M``, ``i % N`` (no masks in the loop) and store nothing.
    ``SWAP_AB``: the tile is computed transposed, ``W x^T`` (the dequantized weight the dot's first operand)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = (offs_m % M).to(tl.int64)
    rows_n = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_word = tl.arange(0, BLOCK_K // 8)
    shifts = (offs_k % 8) * 4  # feature k sits in bits 4 * (k % 8) of word k // 8

    first_step = split * steps_per_split
    last_step = tl.minimum(first_step + steps_per_split, tl.cdiv(K, BLOCK_K))
    if SWAP_AB:  # x^T: [BLOCK_K, BLOCK_M]
        x_ptrs = x_ptr + rows_m[None, :] * stride_xm + (first_step * BLOCK_K + offs_k)[:, None]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        x_ptrs = x_ptr + rows_m[:, None] * stride_xm + (first_step * BLOCK_K + offs_k)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + (first_step * (BLOCK_K // 8) + offs_word)[None, :]
    scale_rows = scales_ptr + rows_n * stride_sn
    zero_rows = zeros_ptr + rows_n * stride_zn
    for step in range(first_step, last_step):
        k0 = step * BLOCK_K
        if EVEN_K:
            x = tl.load(x_ptrs)
            words = tl.load(w_ptrs)
        else:  # the last step runs past K (K a multiple of 8, not of BLOCK_K): zeros there
            k_ok = k0 + offs_k < K
            if SWAP_AB:
                x = tl.load(x_ptrs, mask=k_ok[:, None], other=0.0)
            else:
                x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            words = tl.load(w_ptrs, mask=(k0 // 8 + offs_word < K // 8)[None, :], other=0)
        words = tl.interleave(words, words)
        words = tl.interleave(words, words)
        words = tl.interleave(words, words)  # [BLOCK_N, BLOCK_K]: word k // 8 at column k
        # 2^23 + q as a float32 by its bits (no int-to-float conversion, which sm_90 runs at 16 a clock per SM)
        q = (((words >> shifts[None, :]) & 0xF) | MAGIC_BITS).to(tl.float32, bitcast=True)
        if GROUP_PER_STEP:  # the step lies in group k0 // GROUP_SIZE: one scale and zero per output row
            group = k0 // GROUP_SIZE
            scale = tl.load(scale_rows + group).to(tl.float32)[:, None]
            zero = tl.load(zero_rows + group).to(tl.float32)[:, None] + MAGIC
        else:
            if HAS_G_IDX:
                if EVEN_K:
                    groups = tl.load(g_idx_ptr + k0 + offs_k)
                else:
                    groups = tl.load(g_idx_ptr + k0 + offs_k, mask=k_ok, other=0)
            else:
                groups = (k0 + offs_k) // GROUP_SIZE
                if not EVEN_K:
                    groups = tl.where(k_ok, groups, 0)
            scale = tl.load(scale_rows[:, None] + groups[None, :]).to(tl.float32)
            zero = tl.load(zero_rows[:, None] + groups[None, :]).to(tl.int32)
            zero = (zero | MAGIC_BITS).to(tl.float32, bitcast=True)
        w = ((q - zero) * scale).to(x_ptr.dtype.element_ty)  # q - zero: exact
        if SWAP_AB:
            acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 8
    if SWAP_AB:
        acc = tl.trans(acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
    out_ptrs = (out_ptr + split.to(tl.int64) * stride_out_split + offs_m.to(tl.int64)[:, None] * stride_out_m
                + offs_n[None, :])  # fmt: skip
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit(do_not_specialize=["size", "num_splits"])
def _split_k_sum_kernel(y_ptr, partial_ptr, bias_ptr, size, N, num_splits, HAS_BIAS: tl.constexpr,
                        BLOCK: tl.constexpr):
    """``y = sum_s partial[s] (+ bias)`` over ``BLOCK`` of the ``size = M * N`` outputs, splits added in order
    (the same sum at every run), rounded once to ``y``'s dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    ptrs = partial_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(num_splits):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += size
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["steps_per_split"])
def _w4a16_gemv_kernel(
    out_ptr, x_ptr, w_ptr, scales_ptr, zeros_ptr, bias_ptr,
    N, steps_per_split,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_out_split, stride_out_m,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Rows ``[program_id(0) * BLOCK_N, ...)`` of ``x[program_id(2)] @ W.T``, over steps ``[s * steps_per_split,
    (s + 1) * steps_per_split)`` of ``8 * BLOCK_W`` features for split ``s = program_id(1)`` (each step within one
    group). No tensor cores and no shuffles: nibble ``j`` of every word of the ``[BLOCK_N, BLOCK_W]`` tile meets
    input feature ``8 w + j``, in eight passes over the tile as loaded; each step's sums take their group's zero
    point as ``sum q x - z sum x`` and its scale once. Stores the float32 sum (plus the bias when ``HAS_BIAS``),
    rounded to ``out_ptr``'s dtype, at ``out_ptr + s * stride_out_split``."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_n = (offs_n % N).to(tl.int64)
    offs_w = tl.arange(0, BLOCK_W)
    first_step = split * steps_per_split
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + (first_step * BLOCK_W + offs_w)[None, :]
    x_ptrs = x_ptr + row * stride_xm + first_step * BLOCK_W * 8 + offs_w * 8
    scale_rows = scales_ptr + rows_n * stride_sn
    zero_rows = zeros_ptr + rows_n * stride_zn
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for step in range(first_step, first_step + steps_per_split):
        words = tl.load(w_ptrs, eviction_policy="evict_first")
        group = step * BLOCK_W * 8 // GROUP_SIZE
        scale = tl.load(scale_rows + group).to(tl.float32)
        zero = tl.load(zero_rows + group).to(tl.float32)
        dot = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_W,), dtype=tl.float32)
        for j in tl.static_range(8):
            x = tl.load(x_ptrs + j).to(tl.float32)
            q = (((words >> (4 * j)) & 0xF) | MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC  # exact
            dot += q * x[None, :]
            x_sum += x
        acc += scale[:, None] * (dot - zero[:, None] * x_sum[None, :])
        w_ptrs += BLOCK_W
        x_ptrs += BLOCK_W * 8
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows_n).to(tl.float32)
    out_ptrs = out_ptr + split.to(tl.int64) * stride_out_split + row * stride_out_m + offs_n
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def gemv_tiles(group_size: int, tiles: tuple[int, int, int] = GEMV_TILES) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_W, num_warps)`` of the GEMV for a layer in groups of ``group_size``: ``tiles`` (default
    :data:`GEMV_TILES`), its step (``8 * BLOCK_W`` features) shortened to the group."""
    block_n, block_w, warps = tiles
    return block_n, min(block_w, group_size // PACK), warps


def gemv_w4a16(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, num_splits: int | None = None,
               tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """:func:`linear_w4a16` through the GEMV (no ``g_idx``; ``x`` contiguous along its features), whatever the
    number of tokens: the path of steps of up to :data:`GEMV_ROWS` tokens. ``num_splits`` overrides
    :func:`split_k`, ``tiles`` (``(BLOCK_N, BLOCK_W, num_warps)``) :func:`gemv_tiles` (tests and
    ``benchmarks/w4a16_probe.py``)."""
    m, k = x.shape
    n = weight.shape[0]
    block_n, block_w, warps = gemv_tiles(group_size, tiles or GEMV_TILES)
    steps = k // (8 * block_w)
    tiles_n = triton.cdiv(n, block_n)
    splits = num_splits or split_k(tiles_n, steps, device_sms(x.device))
    while steps % splits:  # every split takes whole steps, the same number
        splits //= 2
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    out = y if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    _w4a16_gemv_kernel[(tiles_n, splits, m)](
        out, x, weight, scales, zeros, bias if bias is not None and splits == 1 else weight,
        n, steps // splits, x.stride(0), weight.stride(0), scales.stride(0), zeros.stride(0),
        m * n if splits > 1 else 0, n,
        GROUP_SIZE=group_size, HAS_BIAS=bias is not None and splits == 1, BLOCK_N=block_n, BLOCK_W=block_w,
        num_warps=warps,
    )  # fmt: skip
    if splits > 1:
        _sum_splits(y, out, bias)
    return y


def _sum_splits(y: torch.Tensor, partial: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``y [m, n] = sum_s partial[s] (+ bias)``, ``partial [splits, m, n]`` float32 (:func:`_split_k_sum_kernel`)."""
    splits, m, n = partial.shape
    _split_k_sum_kernel[(triton.cdiv(m * n, REDUCE_BLOCK),)](
        y, partial, bias if bias is not None else partial, m * n, n, splits, HAS_BIAS=bias is not None,
        BLOCK=REDUCE_BLOCK, num_warps=4,
    )  # fmt: skip


def _check(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
           g_idx: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    """Raise ValueError unless the inputs have the shapes, dtypes and unit last strides the kernel reads."""
    if x.dim() != 2 or x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"w4a16 linear: x must be [num_tokens, in] float16/bfloat16/float32, got {tuple(x.shape)} "
                         f"{x.dtype}")
    in_features = x.shape[1]
    if weight.dim() != 2 or weight.dtype != torch.int32 or weight.shape[1] * PACK != in_features:
        raise ValueError(f"w4a16 linear: weight must be [out, in // {PACK}] = [out, {in_features // PACK}] int32 "
                         f"for in = {in_features}, got {tuple(weight.shape)} {weight.dtype}")
    out_features = weight.shape[0]
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"w4a16 linear: group_size {group_size} must be positive and divide in = {in_features}")
    groups = (out_features, in_features // group_size)
    if tuple(scales.shape) != groups or scales.dtype not in SCALE_DTYPES:
        raise ValueError(f"w4a16 linear: scales must be {list(groups)} float16/bfloat16/float32, got "
                         f"{tuple(scales.shape)} {scales.dtype}")
    if tuple(zeros.shape) != groups or zeros.dtype != torch.uint8:
        raise ValueError(f"w4a16 linear: zeros must be {list(groups)} uint8, got {tuple(zeros.shape)} {zeros.dtype}")
    if g_idx is not None and (tuple(g_idx.shape) != (in_features,) or g_idx.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"w4a16 linear: g_idx must be [{in_features}] int32, got {tuple(g_idx.shape)} {g_idx.dtype}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"w4a16 linear: bias must be [{out_features}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("scales", scales), ("zeros", zeros), ("g_idx", g_idx), ("bias", bias)):
        if t is not None and t.numel() and t.stride(-1) != 1:
            raise ValueError(f"w4a16 linear: {name} must be contiguous along its last dimension")


def linear_w4a16(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None, tiles: W4A16Tiles | None = None,
    num_splits: int | None = None, table: W4A16Table = TILES,
) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` the 4-bit weight dequantized on the fly; the ``cuda`` and ``rocm`` backends'
    ``linear_w4a16``, called for every projection of a ``quantization="w4a16"`` model at every step.

    ``x: [num_tokens, in]`` float16/bfloat16/float32; ``weight: [out, in // 8]`` int32; ``scales: [out, in //
    group_size]`` float16/bfloat16/float32; ``zeros: [out, in // group_size]`` uint8; ``g_idx: [in]`` int32 or
    int64 (each value below ``in // group_size``; not checked, which would sync) or None; ``bias: [out]`` or None
    (the layout of :mod:`pagedllm.backends.w4a16_linear`). Returns ``[num_tokens, out]`` in ``x.dtype``, summed
    in float32. ``table``: the GPU family's tiles by rows (a ``KernelTuning``'s ``w4a16``); ``tiles`` overrides
    them, ``num_splits`` :func:`split_k` (tests and benchmarks).
    Raises ValueError for inputs of other shapes or dtypes, or weights not contiguous along their last dimension
    (an ``x`` that is not is copied). No host sync: capturable in a CUDA graph.
    """
    _check(x, weight, scales, zeros, group_size, g_idx, bias)
    m, k = x.shape
    n = weight.shape[0]
    if m == 0 or n == 0:
        return x.new_empty(m, n)
    if x.stride(1) != 1:
        x = x.contiguous()
    if tiles is None and m <= GEMV_ROWS and g_idx is None:
        return gemv_w4a16(x, weight, scales, zeros, group_size, bias, num_splits)
    tiles = tiles or w4a16_tiles(m, table)
    block_k = step_length(tiles.block_k, group_size, k)
    k_steps = triton.cdiv(k, block_k)
    tiles_mn = triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n)
    splits = num_splits or split_k(tiles_mn, k_steps, device_sms(x.device))
    steps_per_split = triton.cdiv(k_steps, splits)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    out = y if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    _w4a16_gemm_kernel[(tiles_mn, splits)](
        out, x, weight, scales, zeros, g_idx if g_idx is not None else weight,
        bias if bias is not None and splits == 1 else weight,
        m, n, k, steps_per_split,
        x.stride(0), weight.stride(0), scales.stride(0), zeros.stride(0), m * n if splits > 1 else 0, n,
        GROUP_SIZE=group_size, HAS_G_IDX=g_idx is not None,
        GROUP_PER_STEP=g_idx is None and group_size % block_k == 0, EVEN_K=k % block_k == 0,
        HAS_BIAS=bias is not None and splits == 1, DOT_PRECISION=dot_precision(x.dtype), SWAP_AB=tiles.swap_ab,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    if splits > 1:
        _sum_splits(y, out, bias)
    return y
