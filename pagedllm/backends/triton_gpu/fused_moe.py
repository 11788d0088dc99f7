"""Mixture-of-experts layers on the GPU: two grouped GEMMs over the step's (token, expert) pairs sorted by expert.

``pagedllm.backends.moe.expert_blocks`` sorts the pairs into blocks of ``BLOCK_M`` rows, one expert per block, on
the device (no host sync, so decode graphs capture it). The first GEMM multiplies each pair's token by its
expert's gate|up rows (``[num_pairs, 2 * inter]``), SiLU-and-mul runs on that (the backend's kernel), and the
second GEMM multiplies by the expert's down rows and by the pair's routing weight (``[num_pairs, hidden]``);
the ``top_k`` rows of each token are then summed in float32. Each program computes one block of rows against
one tile of output columns, reading only its expert's weights, so a decode step reads each routed expert once
per column tile. Blocks past the last expert's return at once.

Steps of at most :data:`GEMV_MAX_TOKENS` tokens (batch-1 and small decode batches) skip the sort: one GEMV
kernel gives each pair's gate|up rows and SiLU-and-mul of them (a program per pair and ``BLOCK_N`` features),
a second each token's down rows of its ``top_k`` experts, weighted and summed in float32 (a program per token
and ``BLOCK_N`` outputs). Two launches instead of about fifteen; each routed expert is read once per pair.

The tiles (:data:`TILES`, :data:`GEMV_TILES`) are fixed (no compile per batch size once started); the pair count
is not specialized on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from pagedllm.backends.moe import ExpertBlocks, expert_blocks
from pagedllm.backends.triton_gpu.attention_common import dot_precision
from pagedllm.backends.triton_gpu.fused_kernels import silu_mul_values

TILES = (64, 128, 64, 4, 3)
"""BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages of both GEMMs."""

GEMV_MAX_TOKENS = 16
"""Steps of up to this many tokens take the GEMV kernels (:func:`fused_moe_gemv`), larger ones the grouped GEMMs.
On Qwen3-30B-A3B's layer on an H200, in CUDA graphs (RESULTS.md run 117, the first GEMV tiles): 33 / 46 / 75 /
135 / 237 us at 1 / 2 / 4 / 8 / 16 tokens against the grouped GEMMs' best 81 / 105 / 134 / 189 / 248 us; at 32
tokens the GEMMs take 341 us (run 118)."""

GEMV_TILES = (8, 256, 2, 2, 256, 2, 4)
"""BLOCK_N, the largest BLOCK_K and num_warps of the gate|up GEMV, then of the down GEMV and how many experts'
tiles it loads at once. From ``benchmarks/moe_probe.py``'s sweeps on an H200 (runs 117-119): 25.4 / 75.7 / 229 us
at 1 / 4 / 16 tokens, within 3% of the best of each; the first tiles, one expert at a time, 33.3 / 75.5 / 236."""


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, sorted_ids_ptr, block_experts_ptr, weights_ptr,
    num_pairs, N, K,
    stride_am, stride_be, stride_bn, stride_cm,
    NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, ROWS_ARE_TOKENS: tl.constexpr, MUL_WEIGHTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert >= NUM_EXPERTS:  # past the last expert's blocks
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + offs_m)
    valid = pairs < num_pairs
    rows = (pairs // TOP_K) if ROWS_ARE_TOKENS else pairs
    rows = tl.where(valid, rows, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_WEIGHTS:
        weights = tl.load(weights_ptr + pairs, mask=valid, other=0.0)
        acc = acc * weights[:, None]
    c_ptrs = c_ptr + tl.where(valid, pairs, 0).to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def _grouped_gemm(a: torch.Tensor, weights: torch.Tensor, blocks: ExpertBlocks, top_k: int, rows_are_tokens: bool,
                  routing: torch.Tensor | None, tiles: tuple[int, ...]) -> torch.Tensor:
    """``out[p] = a[row(p)] @ weights[expert(p)].T`` (times ``routing[p]`` when given) for every pair ``p``:
    ``a``: ``[rows, K]`` (tokens when ``rows_are_tokens``, else pairs); ``weights``: ``[num_experts, N, K]``;
    returns ``[num_pairs, N]`` in ``a``'s dtype."""
    num_experts, n, k = weights.shape
    block_m, block_n, block_k, num_warps, num_stages = tiles
    assert block_m == blocks.block_m
    out = torch.empty(blocks.num_pairs, n, dtype=a.dtype, device=a.device)
    grid = (blocks.block_experts.numel(), triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        a, weights, out, blocks.sorted_ids, blocks.block_experts, routing if routing is not None else out,
        blocks.num_pairs, n, k, a.stride(0), weights.stride(0), weights.stride(1), out.stride(0),
        NUM_EXPERTS=num_experts, TOP_K=top_k, ROWS_ARE_TOKENS=rows_are_tokens, MUL_WEIGHTS=routing is not None,
        DOT_PRECISION=dot_precision(a.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


@triton.jit
def _moe_gate_up_gemv_kernel(
    h_ptr, x_ptr, w_ptr, ids_ptr,
    inter, K, stride_x, stride_we, stride_wn, stride_h,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``h[p, n] = silu(gate_e[n] . x_t) * (up_e[n] . x_t)`` for pair ``p`` (token ``t = p // TOP_K``, expert ``e
    = ids[p]``) and this program's ``BLOCK_N`` features ``n``; gate and up rounded to h's dtype before the
    activation, as the unfused GEMM and SiLU-and-mul round them."""
    pair = tl.program_id(0)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < inter
    cols = tl.arange(0, BLOCK_K)
    gate_rows = w_ptr + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn
    up_rows = gate_rows + inter * stride_wn
    x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_x
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_mask = k + cols < K
        mask = row_mask[:, None] & k_mask[None, :]
        x = tl.load(x_row + k + cols, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        gate = tl.load(gate_rows + (k + cols)[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        up = tl.load(up_rows + (k + cols)[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        acc_gate += gate.to(tl.float32) * x
        acc_up += up.to(tl.float32) * x
    dtype = h_ptr.dtype.element_ty
    h = silu_mul_values(tl.sum(acc_gate, 1).to(dtype), tl.sum(acc_up, 1).to(dtype))
    tl.store(h_ptr + pair.to(tl.int64) * stride_h + rows, h, mask=row_mask)


@triton.jit
def _moe_down_gemv_kernel(
    y_ptr, h_ptr, w_ptr, ids_ptr, weights_ptr,
    N, K, stride_h, stride_we, stride_wn, stride_y,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EXPERTS_AT_ONCE: tl.constexpr,
):
    """``y[t, n] = sum_j weights[p] * (down_e[n] . h[p])`` over token ``t``'s pairs ``p = t * TOP_K + j`` (expert
    ``e = ids[p]``) for this program's ``BLOCK_N`` outputs ``n``: each product rounded to y's dtype, then
    weighted and summed in float32, as the reference sums the experts. ``EXPERTS_AT_ONCE`` experts' tiles
    (a power of two) are loaded together, ``[EXPERTS_AT_ONCE, BLOCK_N, BLOCK_K]``: independent loads in flight."""
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    slots = tl.arange(0, EXPERTS_AT_ONCE)
    dtype = y_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(0, TOP_K, EXPERTS_AT_ONCE):
        slot_mask = j + slots < TOP_K
        pairs = token * TOP_K + j + slots
        experts = tl.load(ids_ptr + pairs, mask=slot_mask, other=0).to(tl.int64)
        w_rows = (w_ptr + experts[:, None, None] * stride_we
                  + rows[None, :, None].to(tl.int64) * stride_wn)  # [EXPERTS_AT_ONCE, BLOCK_N, 1]
        w_mask = slot_mask[:, None, None] & row_mask[None, :, None]
        h_rows = h_ptr + pairs[:, None].to(tl.int64) * stride_h  # [EXPERTS_AT_ONCE, 1]
        acc = tl.zeros([EXPERTS_AT_ONCE, BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            k_mask = k + cols < K
            h = tl.load(h_rows + (k + cols)[None, :], mask=slot_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_rows + (k + cols)[None, None, :], mask=w_mask & k_mask[None, None, :], other=0.0,
                        eviction_policy="evict_first")
            acc += w.to(tl.float32) * h.to(tl.float32)[:, None, :]
        weights = tl.load(weights_ptr + pairs, mask=slot_mask, other=0.0)
        total += tl.sum(tl.sum(acc, 2).to(dtype).to(tl.float32) * weights[:, None], 0)
    tl.store(y_ptr + token.to(tl.int64) * stride_y + rows, total.to(dtype), mask=row_mask)


def _block_k(k: int, largest: int) -> int:
    """The largest power of two up to ``largest`` that divides ``k`` (no masked tail), or ``largest`` when only
    small ones do (a masked tail beats many short iterations)."""
    for block in (largest, largest // 2, largest // 4):
        if block >= 64 and k % block == 0:
            return block
    return min(largest, triton.next_power_of_2(k))


def fused_moe_gemv(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, tiles: tuple[int, ...] = GEMV_TILES) -> torch.Tensor:
    """``Backend.fused_moe`` (shapes there) for a few tokens: the gate|up GEMV with SiLU-and-mul, then the down
    GEMV with the weighted sum; no sort, two launches. ``tiles`` as :data:`GEMV_TILES` (a probe sweeps them).
    Returns ``[num_tokens, hidden]`` in ``x``'s dtype."""
    num_tokens, top_k = topk_ids.shape
    inter, hidden = w13.shape[1] // 2, w13.shape[2]
    n13, k13, warps13, n2, k2, warps2, at_once = tiles
    ids = topk_ids.to(torch.int32).contiguous()
    h = torch.empty(num_tokens * top_k, inter, dtype=x.dtype, device=x.device)
    _moe_gate_up_gemv_kernel[(num_tokens * top_k, triton.cdiv(inter, n13))](
        h, x, w13, ids, inter, hidden, x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        TOP_K=top_k, BLOCK_N=n13, BLOCK_K=_block_k(hidden, k13), num_warps=warps13,
    )
    y = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    _moe_down_gemv_kernel[(num_tokens, triton.cdiv(hidden, n2))](
        y, h, w2, ids, topk_weights.to(torch.float32).contiguous(), hidden, inter, h.stride(0), w2.stride(0),
        w2.stride(1), y.stride(0), TOP_K=top_k, BLOCK_N=n2, BLOCK_K=_block_k(inter, k2),
        EXPERTS_AT_ONCE=min(at_once, triton.next_power_of_2(top_k)), num_warps=warps2,
    )
    return y


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, silu_and_mul: Callable[[torch.Tensor], torch.Tensor],
              tiles: tuple[int, ...] = TILES, gemv_max_tokens: int = GEMV_MAX_TOKENS) -> torch.Tensor:
    """``Backend.fused_moe`` (shapes there): :func:`fused_moe_gemv` for at most ``gemv_max_tokens`` tokens, else
    the two grouped GEMMs; ``silu_and_mul`` is the backend's; ``tiles`` as :data:`TILES` (a probe sweeps them)."""
    num_tokens, top_k = topk_ids.shape
    if num_tokens <= gemv_max_tokens:
        return fused_moe_gemv(x, w13, w2, topk_weights, topk_ids)
    blocks = expert_blocks(topk_ids, w13.shape[0], tiles[0])
    gate_up = _grouped_gemm(x, w13, blocks, top_k, rows_are_tokens=True, routing=None, tiles=tiles)
    down = _grouped_gemm(silu_and_mul(gate_up), w2, blocks, top_k, rows_are_tokens=False,
                         routing=topk_weights.reshape(-1).to(torch.float32).contiguous(), tiles=tiles)
    return down.view(num_tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)


MAX_ROUTED_EXPERTS = 1024
"""The most experts :func:`topk_softmax` takes (one program holds a token's logits)."""
TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _topk_softmax_kernel(
    weights_ptr, ids_ptr, logits_ptr, num_experts, stride_l,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    ROUND_TO: tl.constexpr,
):
    """One token: the softmax of its logits in float32, its ``TOP_K`` largest probabilities by repeated maximum
    (the lowest index first among equal ones), divided by their sum when ``RENORMALIZE``, rounded through
    ``ROUND_TO`` (a Triton dtype, or None)."""
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    valid = experts < num_experts
    logits = tl.load(logits_ptr + token * stride_l + experts, mask=valid, other=float("-inf")).to(tl.float32)
    exps = tl.exp(logits - tl.max(logits, 0))
    probs = exps / tl.sum(exps, 0)
    probs = tl.where(valid, probs, float("-inf"))
    slots = tl.arange(0, BLOCK_K)
    top_weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    top_ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(probs, 0)
        expert = tl.min(tl.where(probs == best, experts, BLOCK_E), 0)
        top_weights = tl.where(slots == j, best, top_weights)
        top_ids = tl.where(slots == j, expert, top_ids)
        probs = tl.where(experts == expert, float("-inf"), probs)
    if RENORMALIZE:
        top_weights = top_weights / tl.sum(top_weights, 0)
    if ROUND_TO is not None:
        top_weights = top_weights.to(ROUND_TO).to(tl.float32)
    out = token * TOP_K + slots
    tl.store(weights_ptr + out, top_weights, mask=slots < TOP_K)
    tl.store(ids_ptr + out, top_ids, mask=slots < TOP_K)


def topk_softmax(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                 round_to: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``Backend.topk_softmax`` (shapes there) in one launch, or None when the kernel does not take the router:
    more than :data:`MAX_ROUTED_EXPERTS` experts, a dtype other than float32/float16/bfloat16, or rows that are
    not unit-strided."""
    num_tokens, num_experts = router_logits.shape
    if (num_experts > MAX_ROUTED_EXPERTS or router_logits.dtype not in TRITON_DTYPES
            or (round_to is not None and round_to not in TRITON_DTYPES) or router_logits.stride(1) != 1):
        return None
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens:
        _topk_softmax_kernel[(num_tokens,)](
            weights, ids, router_logits, num_experts, router_logits.stride(0), TOP_K=top_k,
            BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_K=triton.next_power_of_2(top_k),
            RENORMALIZE=renormalize, ROUND_TO=TRITON_DTYPES.get(round_to), num_warps=4 if num_experts > 256 else 1,
        )
    return weights, ids


def takes(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the kernels take these operands: one dtype, contiguous rows (the last dimension unit-strided)."""
    return (x.dtype == w13.dtype == w2.dtype and x.stride(-1) == 1 and w13.stride(-1) == 1 and w2.stride(-1) == 1
            and x.dim() == 2 and x.shape[0] > 0)
