"""Mixtral (Hugging Face ``MixtralForCausalLM``): Mistral's attention with a sparse mixture-of-experts block
(``block_sparse_moe``: ``num_local_experts`` experts, ``num_experts_per_tok`` per token, their weights
renormalized) in every layer."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from pagedllm.backends.interface import Backend
from pagedllm.core.distributed.parallel_layers import WeightLike
from pagedllm.core.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from pagedllm.core.models.moe import SparseMoeBlock, load_moe_weights


class MixtralDecoderLayer(LlamaDecoderLayer):
    """Llama decoder layer with a sparse block in place of the MLP."""

    def make_mlp(self, hf_config: object, layer_idx: int, backend: Backend) -> nn.Module:
        """A :class:`SparseMoeBlock` of ``intermediate_size`` per expert, top-k weights renormalized."""
        return SparseMoeBlock(hf_config.hidden_size, hf_config.num_local_experts, hf_config.num_experts_per_tok,
                              hf_config.intermediate_size, True, backend)


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral; the checkpoint's ``block_sparse_moe`` is our ``mlp`` and its experts' ``w1``/``w3``/``w2`` the
    gate/up/down of the stacks."""

    layer_cls = MixtralDecoderLayer

    def load_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> set[str]:
        """See :meth:`LlamaForCausalLM.load_weights`; per-expert tensors go into their block's stacks."""
        return load_moe_weights(self, weights, super().load_weights,
                                rename=lambda name: name.replace(".block_sparse_moe.", ".mlp."))
