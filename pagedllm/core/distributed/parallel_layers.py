"""Tensor-parallel linear and embedding layers (Megatron-style), exact replacements of the plain ones at world
size 1.

- column parallel (:class:`MergedColumnParallelLinear`, :class:`QKVParallelLinear`): each rank holds a slice
  of the output rows; the output stays sharded (heads, MLP columns), no communication;
- row parallel (:class:`RowParallelLinear`): each rank holds a slice of the input columns and the partial
  products are summed with an all-reduce;
- vocabulary parallel (:class:`VocabParallelEmbedding`, :class:`ParallelLMHead`): each rank holds a slice of
  the vocabulary rows (padded to an equal size); embeddings are all-reduced, logits all-gathered.

Loading: every parameter that is sharded carries ``weight_loader(param, loaded)``, which reads only this
rank's part of a checkpoint tensor, and ``full_shape``, the unsharded shape. ``loaded`` may be a tensor or a
lazy safetensors slice (``safe_open(...).get_slice(name)``), so no rank ever reads the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from pagedllm.backends.fp8_linear import block_scale_shape, per_row_scale, scale_block_range
from pagedllm.core.distributed.parallel_state import TensorParallelGroup, get_tp_group, kv_heads_per_rank
from pagedllm.core.models.layers import LinearOp, MergedLinear, copy_checked


class LazyTensor(Protocol):
    """A checkpoint tensor not read yet (safetensors' ``PySafeSlice``): its shape, and reads of parts."""

    def get_shape(self) -> list[int]:
        """The tensor's shape."""

    def __getitem__(self, index: object) -> torch.Tensor:
        """Read the part selected by a tuple of slices."""


WeightLike = torch.Tensor | LazyTensor


def shape_of(loaded: WeightLike) -> tuple[int, ...]:
    """The shape of a checkpoint tensor, read or not."""
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def narrow_weight(loaded: WeightLike, dim: int, start: int, length: int) -> torch.Tensor:
    """Return ``loaded[start : start + length]`` along ``dim``; a lazy slice reads only that part from disk."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, length)
    index = [slice(None)] * len(loaded.get_shape())
    index[dim] = slice(start, start + length)
    return loaded[tuple(index)]


def materialize(loaded: WeightLike) -> torch.Tensor:
    """Read a whole checkpoint tensor (a no-op for a tensor)."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded[...]


def check_full_shape(loaded: WeightLike, expected: Sequence[int]) -> None:
    """Raise ValueError naming both shapes unless the unsharded checkpoint tensor has shape ``expected``
    (checked before a rank narrows it, so a wrong tensor is never silently sliced to fit)."""
    if shape_of(loaded) != tuple(expected):
        raise ValueError(f"shape mismatch: expected {tuple(expected)}, got {shape_of(loaded)}")


def set_loader(
    param: nn.Parameter, loader: Callable[[nn.Parameter, WeightLike], None], full_shape: Sequence[int]
) -> None:
    """Attach the load hook and the unsharded shape to a sharded parameter (see the module docstring)."""
    param.weight_loader = loader  # type: ignore[attr-defined]
    param.full_shape = tuple(full_shape)  # type: ignore[attr-defined]


def _divide(total: int, world_size: int, what: str) -> int:
    if total % world_size:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size {world_size}")
    return total // world_size


class MergedColumnParallelLinear(MergedLinear):
    """Column-parallel :class:`MergedLinear`: rank r holds rows ``[r * n, (r + 1) * n)`` of every part.

    ``full_shard_sizes``: the unsharded output sizes of the parts (e.g. ``[intermediate, intermediate]``
    for gate|up). ``forward(x [num_tokens, in_features])`` -> ``[num_tokens, sum(shard_sizes)]``, this
    rank's columns only.
    """

    def __init__(
        self,
        in_features: int,
        full_shard_sizes: Sequence[int],
        bias: bool,
        tp: TensorParallelGroup | None = None,
        shard_sizes: Sequence[int] | None = None,
    ) -> None:
        self.tp = tp or get_tp_group()
        if shard_sizes is None:
            shard_sizes = [_divide(s, self.tp.world_size, "output size") for s in full_shard_sizes]
        super().__init__(in_features, shard_sizes, bias)
        self.full_shard_sizes = list(full_shard_sizes)
        set_loader(self.weight, self._load_fused, (sum(full_shard_sizes), in_features))
        if self.bias is not None:
            set_loader(self.bias, self._load_fused, (sum(full_shard_sizes),))

    def shard_start(self, index: int) -> int:
        """First row of part ``index`` that this rank holds, in the unsharded part."""
        return self.tp.rank * self.shard_sizes[index]

    def load_shard(self, param_name: str, index: int, loaded: WeightLike) -> None:
        """Copy this rank's rows of the unsharded checkpoint tensor of part ``index`` (weight, bias or an fp8
        checkpoint's weight_scale; its static input_scale whole)."""
        if param_name in ("input_scale", "g_idx"):  # one per tensor / per input feature: every rank takes it whole
            super().load_shard(param_name, index, loaded)
            return
        full, start, size = self.full_shard_sizes[index], self.shard_start(index), self.shard_sizes[index]
        fp8_scale = param_name == "weight_scale" and not hasattr(self, "group_size")  # w4a16's are rows, as weight's
        if fp8_scale and self.weight_scale.dim() == 2:  # "fp8_block": this rank's tile rows
            check_full_shape(loaded, block_scale_shape(full, self.weight.shape[1]))
            start, size = scale_block_range(start, size, full)
        else:
            if fp8_scale:
                loaded = per_row_scale(materialize(loaded), full)
            check_full_shape(loaded, (full, *getattr(self, param_name).shape[1:]))
        super().load_shard(param_name, index, narrow_weight(loaded, 0, start, size))

    def _load_fused(self, param: nn.Parameter, loaded: WeightLike) -> None:
        """Load an unsharded fused tensor (all parts stacked, e.g. dummy weights) part by part."""
        name = "weight" if param is self.weight else "bias"
        offset = 0
        for index, size in enumerate(self.full_shard_sizes):
            self.load_shard(name, index, narrow_weight(loaded, 0, offset, size))
            offset += size


class ColumnParallelLinear(MergedColumnParallelLinear):
    """Column-parallel linear layer of one part: ``[in_features] -> [out_features / world_size]``."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup | None = None
    ) -> None:
        super().__init__(in_features, [out_features], bias, tp)


class QKVParallelLinear(MergedColumnParallelLinear):
    """Fused q|k|v projection with attention heads split across ranks.

    Rank r holds query heads ``[r * h, (r + 1) * h)`` (``h = num_heads / world_size``) and the KV heads
    they attend to: an even split of the KV heads, or, with fewer KV heads than ranks, one KV head
    replicated on ``world_size / num_kv_heads`` ranks. ``num_heads``/``num_kv_heads`` are per rank.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool,
        tp: TensorParallelGroup | None = None,
    ) -> None:
        tp = tp or get_tp_group()
        self.num_heads = _divide(total_num_heads, tp.world_size, "number of attention heads")
        self.num_kv_heads = kv_heads_per_rank(total_num_kv_heads, tp.world_size)
        self.num_kv_replicas = max(1, tp.world_size // total_num_kv_heads)
        q_size, kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        full_q, full_kv = total_num_heads * head_dim, total_num_kv_heads * head_dim
        super().__init__(hidden_size, [full_q, full_kv, full_kv], bias, tp, shard_sizes=[q_size, kv_size, kv_size])

    def shard_start(self, index: int) -> int:
        """Queries: this rank's heads; keys/values: the KV heads its query heads use."""
        if index == 0:
            return self.tp.rank * self.shard_sizes[0]
        return (self.tp.rank // self.num_kv_replicas) * self.shard_sizes[index]


class RowParallelLinear(nn.Module):
    """Row-parallel linear layer: rank r holds input columns ``[r * n, (r + 1) * n)``; outputs are summed.

    ``forward(x [num_tokens, in_features / world_size])`` -> ``[num_tokens, out_features]``: all-reduced,
    the bias added once after the sum; or, with ``reduce_results=False``, this rank's partial sum (rank 0's
    holding the bias), for a consumer that sums it itself (an RMSNorm with ``reduce_partial_input``, which
    fuses the all-reduce with its residual add). Same parameter names as ``nn.Linear``.
    """

    quantizable = True  # see pagedllm.core.models.layers.quantize_linear_layers

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup | None = None,
        reduce_results: bool = True,
    ) -> None:
        super().__init__()
        self.tp = tp or get_tp_group()
        self.reduce_results = reduce_results
        self.in_features_per_rank = _divide(in_features, self.tp.world_size, "input size")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features_per_rank))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.linear_op: LinearOp = nn.functional.linear
        set_loader(self.weight, self._load_weight, (out_features, in_features))

    def _load_weight(self, param: nn.Parameter, loaded: WeightLike) -> None:
        check_full_shape(loaded, param.full_shape)  # type: ignore[attr-defined]
        start = self.tp.rank * self.in_features_per_rank
        copy_checked(param.data, narrow_weight(loaded, 1, start, self.in_features_per_rank))

    def load_weight_scale(self, param: nn.Parameter, loaded: WeightLike) -> None:
        """An fp8 checkpoint's scale: per tensor or per output row (every rank holds all output rows), or the
        tiles of ``"fp8_block"`` (this rank's tile columns)."""
        if param.dim() == 2:
            check_full_shape(loaded, block_scale_shape(*self.weight.full_shape))  # type: ignore[attr-defined]
            start, size = scale_block_range(self.tp.rank * self.in_features_per_rank, self.in_features_per_rank,
                                            self.weight.full_shape[1])  # type: ignore[attr-defined]
            copy_checked(param.data, narrow_weight(loaded, 1, start, size))
            return
        copy_checked(param.data, per_row_scale(materialize(loaded), param.shape[0]))

    def load_columns(self, param: nn.Parameter, loaded: WeightLike) -> None:
        """Load this rank's share of a ``"w4a16"`` parameter from the unsharded checkpoint tensor, split along
        its last dimension as the input features are: ``weight [out, in // 8]``, ``weight_scale``/``weight_zero
        [out, groups]`` (whole when there is one group per row), ``g_idx [in]`` (act-order; whole, at tp 1
        only). Raises ValueError naming the shapes when the tensor's does not split into ``world_size`` parts
        of the parameter's."""
        dim = param.dim() - 1
        full = shape_of(loaded)
        if full[:dim] != tuple(param.shape[:dim]) or full[dim] not in (param.shape[dim],
                                                                         param.shape[dim] * self.tp.world_size):
            raise ValueError(f"shape mismatch: expected {tuple(param.shape)} per rank of {self.tp.world_size}, got "
                             f"{full}")
        if full[dim] != param.shape[dim]:
            loaded = narrow_weight(loaded, dim, self.tp.rank * param.shape[dim], param.shape[dim])
        copy_checked(param.data, materialize(loaded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See the class docstring."""
        if self.tp.world_size == 1:
            return self.linear_op(x, self.weight, self.bias)
        if not self.reduce_results:
            return self.linear_op(x, self.weight, self.bias if self.tp.rank == 0 else None)
        out = self.tp.all_reduce(self.linear_op(x, self.weight, None))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split across ranks in equal, padded slices of ``ceil(vocab / world_size)``.

    ``forward(input_ids [num_tokens])`` -> ``[num_tokens, embedding_dim]``: each rank looks up the ids in
    its slice (zeros elsewhere) and the results are all-reduced. Padding rows are zero.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        self.tp = tp or get_tp_group()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_rank = -(-num_embeddings // self.tp.world_size)
        self.vocab_start = self.tp.rank * self.num_embeddings_per_rank
        self.num_local = max(0, min(self.num_embeddings_per_rank, num_embeddings - self.vocab_start))
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_rank, embedding_dim))
        set_loader(self.weight, self._load_weight, (num_embeddings, embedding_dim))

    def _load_weight(self, param: nn.Parameter, loaded: WeightLike) -> None:
        check_full_shape(loaded, param.full_shape)  # type: ignore[attr-defined]
        copy_checked(param.data[: self.num_local], narrow_weight(loaded, 0, self.vocab_start, self.num_local))
        param.data[self.num_local :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """See the class docstring."""
        if self.tp.world_size == 1:
            return nn.functional.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.num_local)
        out = nn.functional.embedding(local_ids.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0.0))


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection onto a vocabulary split like :class:`VocabParallelEmbedding` (so they can be tied).

    ``forward(hidden [num_sampled, embedding_dim])`` -> logits ``[num_sampled, num_embeddings]`` on every rank
    (each rank's slice all-gathered, padding columns dropped).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallelGroup | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, tp)
        self.linear_op: LinearOp = nn.functional.linear

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """See the class docstring."""
        logits = self.linear_op(hidden, self.weight, None)
        if self.tp.world_size == 1:
            return logits
        return self.tp.all_gather(logits, dim=-1)[..., : self.num_embeddings]
