"""Mixture-of-experts helpers any backend may use: the reference routing and expert computation, and the
device-side sort of (token, expert) pairs by expert that grouped-GEMM kernels read.

Shapes: ``num_tokens`` rows of ``hidden`` features; ``num_experts`` SwiGLU experts of ``inter`` features (this
rank's share under tensor parallelism); each token routed to ``top_k`` of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def route_tokens(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                 round_to: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``top_k`` experts by softmax probability (in float32) and their weights, renormalized to
    sum to one when ``renormalize``, then rounded through ``round_to`` when given (Qwen-MoE routers return
    their weights in the model dtype): ``router_logits [num_tokens, num_experts]`` -> ``(topk_weights
    [num_tokens, top_k] float32, topk_ids [num_tokens, top_k] int32)``, each row's experts by falling
    probability. Device ops only (graphs may capture them); the reference of ``Backend.topk_softmax``."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if round_to is not None:
        weights = weights.to(round_to).float()
    return weights, ids.to(torch.int32)


def moe_reference(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.linear,
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` over the ``top_k`` experts
    ``e = topk_ids[t, j]`` of each token, as transformers computes it: expert by expert over the tokens routed
    to it, each expert's output weighted in float32 and summed in float32.

    ``x``: ``[num_tokens, hidden]``; ``w13``: ``[num_experts, 2 * inter, hidden]`` (gate rows, then up rows);
    ``w2``: ``[num_experts, hidden, inter]``; ``topk_weights``: ``[num_tokens, top_k]`` float32;
    ``topk_ids``: ``[num_tokens, top_k]`` integer. ``linear`` and ``silu_and_mul`` compute each expert (a
    backend passes its own). Returns ``[num_tokens, hidden]`` in ``x``'s dtype. Reads the routed experts back
    to the host (one sync): not for graph capture.
    """
    if silu_and_mul is None:
        def silu_and_mul(t: torch.Tensor) -> torch.Tensor:
            gate, up = t.chunk(2, dim=-1)
            return torch.nn.functional.silu(gate) * up

    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in torch.unique(topk_ids).tolist():
        tokens, slots = torch.where(topk_ids == expert)
        y = linear(silu_and_mul(linear(x[tokens], w13[expert])), w2[expert])
        out.index_add_(0, tokens, y.float() * topk_weights[tokens, slots, None].float())
    return out.to(x.dtype)


@dataclass(frozen=True)
class ExpertBlocks:
    """The (token, slot) pairs of a step sorted by expert, each expert's run padded to whole blocks of
    ``block_m`` rows, for a grouped GEMM that gives every block one expert. Built on the device with no host
    sync (so graphs may capture it), at a size fixed by the shapes alone.

    - ``sorted_ids``: ``[max_rows]`` int32: the flat pair index ``token * top_k + slot`` of each row, or
      ``num_pairs`` (``num_tokens * top_k``) for padding;
    - ``block_experts``: ``[max_rows // block_m]`` int32: the expert of each block, ``num_experts`` for a
      block past the last expert's (the kernel skips it);
    - ``block_m``, ``num_pairs``.
    """

    sorted_ids: torch.Tensor
    block_experts: torch.Tensor
    block_m: int
    num_pairs: int


def expert_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Sort the step's pairs by expert (stable: by token within an expert) into blocks of ``block_m`` rows.

    ``topk_ids``: ``[num_tokens, top_k]`` integer. At most ``num_pairs + num_experts * (block_m - 1)`` rows
    are used; the buffers hold that, rounded up to whole blocks.
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    device = flat.device
    max_blocks = -(-(num_pairs + num_experts * (block_m - 1)) // block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=device) - first_of_expert[sorted_experts]
    rows = (padded_end - padded)[sorted_experts] + rank
    sorted_ids = torch.full((max_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[rows] = order.to(torch.int32)
    block_starts = torch.arange(max_blocks, device=device) * block_m
    block_experts = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return ExpertBlocks(sorted_ids, block_experts, block_m, num_pairs)
