"""The LoRA update inside the linear layers: every adapted layer's ``linear_op`` is wrapped so that it adds, to
each token's base output, ``scaling * B_s A_s x`` of the adapter in the token's slot ``s``.

Each adapted layer holds ``max_loras`` slots of its adapters' matrices, zero-padded to ``max_lora_rank`` per
part (q, k, v of a fused q|k|v projection; gate, up of gate|up): ``a [slots * parts * rank, in]`` and ``b [out,
slots * parts * rank]`` (the scaling folded into ``b``; part p's rows of ``b`` use only part p's columns). A step
sets one one-hot ``[num_tokens, slots]`` row per token (zeros: the base model), and the update is two products
over every slot at once, ``((x a^T) * onehot) b^T``: static shapes, no host sync. Under tensor parallelism a
column-parallel layer holds this rank's rows of ``b`` and all of ``a``; a row-parallel one this rank's columns of
``a`` and all of ``b``, so its update is a partial sum that the layer's all-reduce completes.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.core.distributed.parallel_layers import MergedColumnParallelLinear, RowParallelLinear
from pagedllm.core.models.layers import LinearOp


class LoRAStepState:
    """What the adapted layers of one model read at each step: ``onehot`` ``[num_tokens, max_loras]`` in the
    model dtype (None: no token of the step has an adapter, and the layers add nothing)."""

    def __init__(self) -> None:
        self.onehot: torch.Tensor | None = None


class LoRALinearOp:
    """A layer's ``linear_op`` plus the LoRA update of its slots (see the module docstring). Called as the
    base op is: ``(x [num_tokens, in], weight, bias) -> [num_tokens, out]``."""

    def __init__(self, base: LinearOp, layer: nn.Module, state: LoRAStepState, max_loras: int, max_rank: int) -> None:
        self.base, self.state, self.max_rank = base, state, max_rank
        self.layer = layer
        weight = layer.weight
        self.parts = len(layer.shard_sizes) if isinstance(layer, MergedColumnParallelLinear) else 1
        out_features, in_features = weight.shape
        width = max_loras * self.parts * max_rank
        self.a = torch.zeros(width, in_features, dtype=weight.dtype, device=weight.device)
        self.b = torch.zeros(out_features, width, dtype=weight.dtype, device=weight.device)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.base(x, weight, bias)
        onehot = self.state.onehot
        if onehot is None:
            return y
        h = x @ self.a.T  # [num_tokens, slots * parts * rank]
        num_tokens, slots = onehot.shape
        h = (h.view(num_tokens, slots, -1) * onehot[:, :, None]).view(num_tokens, -1)
        return y.addmm_(h, self.b.T)  # the sum in the product's epilogue: y is read and written once

    def clear(self, slot: int) -> None:
        """Zero slot ``slot`` (an adapter that does not train this layer leaves it so)."""
        width = self.parts * self.max_rank
        self.a[slot * width:(slot + 1) * width].zero_()
        self.b[:, slot * width:(slot + 1) * width].zero_()

    def load_fused(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Put an adapter of the whole fused projection (Phi-3's ``qkv_proj`` or ``gate_up_proj``) in slot
        ``slot``: ``lora_a [r, in]`` and ``lora_b [sum of the parts' unsharded outputs, r]``. Each part takes
        ``lora_a`` and its own rows of ``lora_b``, which computes the same update: ``B A x`` row by row."""
        layer = self.layer
        if not isinstance(layer, MergedColumnParallelLinear):
            raise ValueError("a fused adapter needs a fused projection")
        if lora_b.shape[0] != sum(layer.full_shard_sizes):
            raise ValueError(f"lora_B has {lora_b.shape[0]} rows; the fused projection has "
                             f"{sum(layer.full_shard_sizes)} outputs")
        for part, rows in enumerate(lora_b.split(layer.full_shard_sizes)):
            self.load(slot, part, lora_a, rows, scaling)

    def load(self, slot: int, part: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Put one part's matrices of an adapter in slot ``slot``: ``lora_a [r, in_full]`` and ``lora_b [out_full,
        r]`` as the checkpoint holds them (this rank's share taken here), ``lora_b`` times ``scaling``."""
        r = lora_a.shape[0]
        if r > self.max_rank:
            raise ValueError(f"adapter rank {r} exceeds max_lora_rank {self.max_rank}")
        layer = self.layer
        column = slot * self.parts * self.max_rank + part * self.max_rank
        if isinstance(layer, RowParallelLinear):
            start = layer.tp.rank * layer.in_features_per_rank
            lora_a = lora_a[:, start:start + layer.in_features_per_rank]
            rows = slice(0, self.b.shape[0])
        else:
            assert isinstance(layer, MergedColumnParallelLinear)
            size = layer.shard_sizes[part]
            start = layer.shard_start(part)
            lora_b = lora_b[start:start + size]
            offset = sum(layer.shard_sizes[:part])
            rows = slice(offset, offset + size)
        if tuple(lora_a.shape) != (r, self.a.shape[1]) or lora_b.shape[0] != rows.stop - rows.start:
            raise ValueError(f"adapter matrices of shapes {tuple(lora_a.shape)} and {tuple(lora_b.shape)} do not fit "
                             f"the layer ({self.b.shape[0]} outputs, {self.a.shape[1]} inputs on this rank)")
        self.a[column:column + r] = lora_a.to(self.a.dtype)
        self.b[rows, column:column + r] = (lora_b.float() * scaling).to(self.b.dtype)
