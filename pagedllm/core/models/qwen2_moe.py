"""Qwen2-MoE (Hugging Face ``Qwen2MoeForCausalLM``: Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (q/k/v
biases as ``qkv_bias`` says) with sparse blocks that add a shared expert, a dense SwiGLU MLP whose output a
sigmoid gate scales per token, to the routed experts' sum."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.backends.interface import Backend
from pagedllm.core.distributed.parallel_layers import WeightLike
from pagedllm.core.models.layers import MergedLinear
from pagedllm.core.models.llama import LlamaMLP, Qwen2Attention, Qwen2DecoderLayer, Qwen2ForCausalLM
from pagedllm.core.models.moe import SparseMoeBlock, load_moe_weights
from pagedllm.core.models.qwen3_moe import is_sparse_layer


class Qwen2MoeAttention(Qwen2Attention):
    """Qwen2's attention; q/k/v biases unless the config's ``qkv_bias`` turns them off."""

    def has_qkv_bias(self, hf_config: object) -> bool:
        """``qkv_bias`` (default true)."""
        return bool(getattr(hf_config, "qkv_bias", True))


class SharedExpertMoeBlock(SparseMoeBlock):
    """:class:`SparseMoeBlock` plus ``shared_expert`` (a :class:`LlamaMLP` of ``shared_expert_intermediate_size``,
    split over the tensor-parallel ranks like the experts) scaled by ``sigmoid(shared_expert_gate(x))`` (one value
    per token, replicated). ``forward(x [num_tokens, hidden])`` -> this rank's partial sum."""

    def __init__(self, hf_config: object, backend: Backend) -> None:
        super().__init__(hf_config.hidden_size, hf_config.num_experts, hf_config.num_experts_per_tok,
                         hf_config.moe_intermediate_size, bool(getattr(hf_config, "norm_topk_prob", False)), backend,
                         round_weights=True)
        self.shared_expert = LlamaMLP(hf_config, backend, hf_config.shared_expert_intermediate_size)
        self.shared_expert_gate = MergedLinear(hf_config.hidden_size, [1], bias=False)
        self.shared_expert_gate.quantizable = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See the class docstring."""
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().forward(x) + shared


class Qwen2MoeDecoderLayer(Qwen2DecoderLayer):
    """Qwen2-MoE decoder layer: a :class:`SharedExpertMoeBlock` where the layer is sparse (Qwen3-MoE's rule),
    else a dense MLP of ``intermediate_size``."""

    attention_cls = Qwen2MoeAttention

    def make_mlp(self, hf_config: object, layer_idx: int, backend: Backend) -> nn.Module:
        """See the class docstring."""
        if not is_sparse_layer(hf_config, layer_idx):
            return LlamaMLP(hf_config, backend)
        return SharedExpertMoeBlock(hf_config, backend)


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    """Qwen2-MoE; checkpoints with one tensor per expert (``mlp.experts.{e}.gate_proj.weight``) or stacked."""

    layer_cls = Qwen2MoeDecoderLayer

    def load_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> set[str]:
        """See :meth:`LlamaForCausalLM.load_weights`; per-expert tensors go into their block's stacks."""
        return load_moe_weights(self, weights, super().load_weights)
