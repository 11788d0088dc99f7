"""Sparse mixture-of-experts blocks (Mixtral, Qwen3-MoE): a router picks ``top_k`` of ``num_experts`` SwiGLU
experts per token; the experts compute through the backend's ``fused_moe``.

The experts' weights are stored stacked as transformers 5 holds them: ``experts.gate_up_proj`` ``[num_experts,
2 * inter, hidden]`` (gate rows, then up rows) and ``experts.down_proj`` ``[num_experts, hidden, inter]``.
Checkpoints store one tensor per expert and projection (``experts.{e}.gate_proj.weight``, or Mixtral's
``w1``/``w3``/``w2``); :func:`load_moe_weights` routes those into the stacks, and a stacked checkpoint loads
as it is. With tensor parallelism each rank holds ``inter / tp`` features of every expert (the MLP's column /
row split), so the block returns this rank's partial sum, which the next norm reduces; the router is replicated.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from pagedllm.backends.interface import Backend
from pagedllm.core.distributed.parallel_layers import WeightLike, check_full_shape, narrow_weight, set_loader
from pagedllm.core.distributed.parallel_state import TensorParallelGroup, get_tp_group
from pagedllm.core.models.layers import MergedLinear, copy_checked

EXPERT_TENSOR = re.compile(r"^(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)"
                           r"\.weight$")
"""A per-expert checkpoint tensor: the block's name, the expert's index, the projection (Mixtral: w1 gate, w3
up, w2 down)."""
QUANTIZED_EXPERT_TENSOR = re.compile(r"^.+\.experts\.\d+\.\w+\.(weight_scale|weight_scale_inv|input_scale)$")
PROJ_PART = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}


class FusedMoE(nn.Module):
    """The experts of one sparse block, stacked (see the module docstring); this rank's ``inter / tp`` features
    of each. ``forward(x, topk_weights, topk_ids)`` -> the backend's ``fused_moe``."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: Backend,
                 tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        self.tp = tp or get_tp_group()
        if intermediate_size % self.tp.world_size:
            raise ValueError(f"the experts' intermediate size ({intermediate_size}) is not divisible by "
                             f"tensor_parallel_size {self.tp.world_size}")
        self.num_experts, self.full_inter = num_experts, intermediate_size
        self.inter = intermediate_size // self.tp.world_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.inter, hidden_size), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, self.inter), requires_grad=False)
        set_loader(self.gate_up_proj, self._load_gate_up, (num_experts, 2 * intermediate_size, hidden_size))
        set_loader(self.down_proj, self._load_down, (num_experts, hidden_size, intermediate_size))
        self.backend = backend
        self.parts_loaded: set[tuple[int, int]] = set()  # (expert, part) read from per-expert tensors

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """``x [num_tokens, hidden]`` routed by ``topk_weights``/``topk_ids`` (``Backend.topk_softmax``) ->
        ``[num_tokens, hidden]``, this rank's partial sum."""
        return self.backend.fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)

    def load_expert(self, expert: int, part: int, loaded: WeightLike) -> None:
        """Copy this rank's share of one expert's checkpoint tensor: ``part`` 0 gate (``[inter, hidden]``), 1 up,
        2 down (``[hidden, inter]``). Raises ValueError on a wrong shape or expert index."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range: the block has {self.num_experts}")
        start = self.tp.rank * self.inter
        if part == 2:
            check_full_shape(loaded, (self.down_proj.shape[1], self.full_inter))
            copy_checked(self.down_proj.data[expert], narrow_weight(loaded, 1, start, self.inter))
        else:
            check_full_shape(loaded, (self.full_inter, self.gate_up_proj.shape[2]))
            rows = self.gate_up_proj.data[expert, part * self.inter:(part + 1) * self.inter]
            copy_checked(rows, narrow_weight(loaded, 0, start, self.inter))
        self.parts_loaded.add((expert, part))

    def _load_gate_up(self, param: nn.Parameter, loaded: WeightLike) -> None:
        """A stacked ``[num_experts, 2 * inter, hidden]`` tensor (transformers 5's layout, or dummy weights)."""
        check_full_shape(loaded, param.full_shape)  # type: ignore[attr-defined]
        start = self.tp.rank * self.inter
        for part in (0, 1):
            rows = narrow_weight(loaded, 1, part * self.full_inter + start, self.inter)
            copy_checked(param.data[:, part * self.inter:(part + 1) * self.inter], rows)

    def _load_down(self, param: nn.Parameter, loaded: WeightLike) -> None:
        """A stacked ``[num_experts, hidden, inter]`` tensor."""
        check_full_shape(loaded, param.full_shape)  # type: ignore[attr-defined]
        copy_checked(param.data, narrow_weight(loaded, 2, self.tp.rank * self.inter, self.inter))

    def loaded_parameters(self) -> list[str]:
        """The stacks every expert's per-expert tensors filled: ``gate_up_proj`` once every gate and up is read,
        ``down_proj`` once every down is."""
        experts = range(self.num_experts)
        names = []
        if all((e, 0) in self.parts_loaded and (e, 1) in self.parts_loaded for e in experts):
            names.append("gate_up_proj")
        if all((e, 2) in self.parts_loaded for e in experts):
            names.append("down_proj")
        return names


def experts_sync_with_host(model: nn.Module, backend: Backend) -> bool:
    """Whether ``model`` has experts that ``backend`` computes with the interface's default ``fused_moe``, which
    reads the routing back to the host (so decode steps cannot be captured in graphs)."""
    return type(backend).fused_moe is Backend.fused_moe and any(isinstance(m, FusedMoE) for m in model.modules())


class SparseMoeBlock(nn.Module):
    """Router (``gate``: ``[num_experts, hidden]``, replicated, kept in the model dtype under fp8) and experts.
    ``forward(x [num_tokens, hidden])`` -> ``[num_tokens, hidden]`` (this rank's partial sum)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, renormalize: bool,
                 backend: Backend, round_weights: bool = False) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be between 1 and the number of experts "
                             f"({num_experts})")
        self.gate = MergedLinear(hidden_size, [num_experts], bias=False)
        self.gate.quantizable = False
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size, backend)
        self.top_k, self.renormalize, self.round_weights = top_k, renormalize, round_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See the class docstring. With ``round_weights`` the routing weights are rounded to the model dtype
        first, as Qwen3-MoE's router returns them."""
        backend = self.experts.backend
        weights, ids = backend.topk_softmax(self.gate(x), self.top_k, self.renormalize,
                                            x.dtype if self.round_weights else None)
        return self.experts(x, weights, ids)


def load_moe_weights(model: nn.Module, weights: Iterable[tuple[str, WeightLike]],
                     load_rest: Callable[[Iterable[tuple[str, WeightLike]]], set[str]],
                     rename: Callable[[str], str] = lambda name: name) -> set[str]:
    """Load a MoE model's checkpoint: per-expert tensors (:data:`EXPERT_TENSOR`, after ``rename``) into their
    block's :class:`FusedMoE`, everything else (renamed) through ``load_rest`` (the dense model's
    ``load_weights``). Returns the parameter names filled; a stack counts once all its experts' parts are read.
    Raises ValueError naming a per-expert tensor that matches no block."""
    modules = dict(model.named_modules())

    def rest() -> Iterator[tuple[str, WeightLike]]:
        for name, tensor in weights:
            name = rename(name)
            match = EXPERT_TENSOR.match(name)
            if match is None:
                if QUANTIZED_EXPERT_TENSOR.match(name):
                    raise ValueError(f"checkpoint tensor {name!r}: quantized expert weights are not supported (the "
                                     f"experts compute in the model dtype)")
                yield name, tensor
                continue
            experts = modules.get(f"{match['block']}.experts")
            if not isinstance(experts, FusedMoE):
                raise ValueError(f"checkpoint tensor {name!r} matches no experts of {type(model).__name__}")
            try:
                experts.load_expert(int(match["expert"]), PROJ_PART[match["proj"]], tensor)
            except ValueError as exc:
                raise ValueError(f"checkpoint tensor {name!r}: {exc}") from exc

    loaded = load_rest(rest())
    for module_name, module in modules.items():
        if isinstance(module, FusedMoE):
            loaded.update(f"{module_name}.{param}" for param in module.loaded_parameters())
    return loaded
