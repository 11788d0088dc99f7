"""The adapters of one model replica (one per tensor-parallel rank): which adapter sits in which of the
``max_loras`` slots of the adapted layers, loading a step's adapters (least recently used evicted first), and
each step's token-to-slot rows (:class:`~pagedllm.core.lora.layers.LoRAStepState`)."""

from __future__ import annotations

import re
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from pagedllm.core.distributed.parallel_layers import MergedColumnParallelLinear, RowParallelLinear
from pagedllm.core.lora.layers import LoRALinearOp, LoRAStepState
from pagedllm.core.lora.request import ADAPTED_LAYERS, FUSED_TARGETS, LoRARequest, read_adapter_config

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<proj>\w+)\.lora_(?P<which>[AB])(?:\.default)?"
                       r"\.weight$")


class LoRAManager:
    """Wraps the adapted layers of ``model`` (:data:`~pagedllm.core.lora.request.ADAPTED_LAYERS` that are
    tensor-parallel linear layers) and keeps ``max_loras`` adapters of rank up to ``max_rank`` in their slots."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int) -> None:
        self.max_loras = max_loras
        self.state = LoRAStepState()
        self.ops: dict[str, LoRALinearOp] = {}
        for name, module in model.named_modules():
            last = name.rsplit(".", 1)[-1]
            if last in ADAPTED_LAYERS and isinstance(module, MergedColumnParallelLinear | RowParallelLinear):
                op = LoRALinearOp(module.linear_op, module, self.state, max_loras, max_rank)
                module.linear_op = op
                self.ops[name] = op
        if not self.ops:
            raise ValueError(f"{type(model).__name__} has no layer LoRA adapters can train (q/k/v/o and "
                             f"gate/up/down projections)")
        self.slots: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, least recently used first
        self._dtype = next(iter(self.ops.values())).a.dtype
        self._device = next(iter(self.ops.values())).a.device

    def prepare_step(self, token_adapters: np.ndarray, adapters: dict[int, LoRARequest]) -> None:
        """Set an eager step's rows (:meth:`rows`; None when no token has an adapter: the layers add nothing)."""
        rows = self.rows(token_adapters, adapters)
        self.state.onehot = None if rows is None else torch.from_numpy(rows).to(self._device, self._dtype,
                                                                                non_blocking=True)

    def graph_rows(self, max_tokens: int) -> torch.Tensor:
        """A static ``[max_tokens, max_loras]`` buffer of rows for recorded decode steps (zeros: no adapter)."""
        return torch.zeros(max_tokens, self.max_loras, dtype=self._dtype, device=self._device)

    def rows(self, token_adapters: np.ndarray, adapters: dict[int, LoRARequest]) -> np.ndarray | None:
        """The one-hot slot rows ``[num_tokens, max_loras]`` float32 of a step: ``token_adapters [num_tokens]``
        int64 holds each token's adapter id (0: none), ``adapters`` the requests of the ids it names, loaded into
        slots first; None when no token has an adapter. Raises ValueError if the step names more adapters than
        there are slots, or if an adapter cannot be loaded."""
        ids = [int(i) for i in np.unique(token_adapters) if i]
        if not ids:
            return None
        if len(ids) > self.max_loras:
            raise ValueError(f"a step names {len(ids)} adapters but max_loras is {self.max_loras}")
        for adapter_id in ids:
            self._ensure_loaded(adapters[adapter_id], keep=ids)
        slot_of = np.full(max(ids) + 1, -1, dtype=np.int64)
        for adapter_id in ids:
            slot_of[adapter_id] = self.slots[adapter_id]
        token_slots = slot_of[token_adapters]
        onehot = np.zeros((len(token_adapters), self.max_loras), dtype=np.float32)
        has = token_slots >= 0
        onehot[np.nonzero(has)[0], token_slots[has]] = 1.0
        return onehot

    def _ensure_loaded(self, request: LoRARequest, keep: list[int]) -> None:
        """Put ``request``'s adapter in a slot unless it is in one (a free slot, else the least recently used one
        whose adapter the step does not name)."""
        if request.lora_int_id in self.slots:
            self.slots.move_to_end(request.lora_int_id)
            return
        used = set(self.slots.values())
        free = [s for s in range(self.max_loras) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = next(i for i in self.slots if i not in keep)
            slot = self.slots.pop(victim)
        self._load(request, slot)
        self.slots[request.lora_int_id] = slot

    def _load(self, request: LoRARequest, slot: int) -> None:
        """Read the adapter's tensors and copy this rank's share of each into ``slot`` of its layer."""
        from safetensors.torch import load_file

        config = read_adapter_config(request.lora_path)
        tensors = load_file(f"{request.lora_path}/adapter_model.safetensors")
        pairs: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = _PEFT_KEY.match(key)
            if match is None:
                raise ValueError(f"LoRA adapter {request.lora_path!r}: tensor {key!r} is not a LoRA A or B matrix "
                                 f"this engine applies (embeddings and the LM head cannot be adapted)")
            layer, part = self._layer_of(match["module"], match["proj"], request.lora_path)
            pairs.setdefault((layer, part), {})[match["which"]] = tensor
        for op in self.ops.values():
            op.clear(slot)
        for (layer, part), matrices in pairs.items():
            if set(matrices) != {"A", "B"}:
                raise ValueError(f"LoRA adapter {request.lora_path!r}: {layer} part {part} lacks its lora_A or lora_B")
            try:
                if part is None:
                    self.ops[layer].load_fused(slot, matrices["A"], matrices["B"], config.scaling)
                else:
                    self.ops[layer].load(slot, part, matrices["A"], matrices["B"], config.scaling)
            except ValueError as exc:
                raise ValueError(f"LoRA adapter {request.lora_path!r}, {layer}: {exc}") from exc

    def _layer_of(self, module: str, proj: str, path: str) -> tuple[str, int | None]:
        """Our adapted layer and part for a checkpoint module path (``model.layers.3.self_attn``) and projection;
        part None for a fused projection (:data:`FUSED_TARGETS`) trained whole."""
        if proj in FUSED_TARGETS and f"{module}.{proj}" in self.ops:
            return f"{module}.{proj}", None
        for ours, parts in ADAPTED_LAYERS.items():
            if proj in parts and f"{module}.{ours}" in self.ops:
                return f"{module}.{ours}", parts.index(proj)
        raise ValueError(f"LoRA adapter {path!r}: {module}.{proj} is not a projection of this model that adapters "
                         f"can train")
