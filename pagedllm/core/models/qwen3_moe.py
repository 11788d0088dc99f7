"""Qwen3-MoE (Hugging Face ``Qwen3MoeForCausalLM``): Qwen3's attention (per-head q/k norms) with sparse
mixture-of-experts blocks in the layers the config makes sparse, a dense SwiGLU MLP in the others."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from pagedllm.backends.interface import Backend
from pagedllm.core.distributed.parallel_layers import WeightLike
from pagedllm.core.models.llama import LlamaMLP, Qwen3DecoderLayer, Qwen3ForCausalLM
from pagedllm.core.models.moe import SparseMoeBlock, load_moe_weights


def is_sparse_layer(hf_config: object, layer_idx: int) -> bool:
    """transformers' rule: a layer is sparse unless listed in ``mlp_only_layers``, when the model has experts and
    ``layer_idx + 1`` is a multiple of ``decoder_sparse_step``."""
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    return (layer_idx not in (getattr(hf_config, "mlp_only_layers", None) or []) and hf_config.num_experts > 0
            and (layer_idx + 1) % step == 0)


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    """Qwen3 decoder layer whose feed-forward block is sparse where :func:`is_sparse_layer` says so."""

    def make_mlp(self, hf_config: object, layer_idx: int, backend: Backend) -> nn.Module:
        """A :class:`SparseMoeBlock` (``moe_intermediate_size`` per expert; top-k weights renormalized when
        ``norm_topk_prob``, rounded to the model dtype as transformers' router returns them), else a dense MLP
        of ``intermediate_size``."""
        if not is_sparse_layer(hf_config, layer_idx):
            return LlamaMLP(hf_config, backend)
        return SparseMoeBlock(hf_config.hidden_size, hf_config.num_experts, hf_config.num_experts_per_tok,
                              hf_config.moe_intermediate_size, bool(getattr(hf_config, "norm_topk_prob", False)),
                              backend, round_weights=True)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """Qwen3-MoE; checkpoints with one tensor per expert (``mlp.experts.{e}.gate_proj.weight``) or stacked."""

    layer_cls = Qwen3MoeDecoderLayer

    def load_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> set[str]:
        """See :meth:`LlamaForCausalLM.load_weights`; per-expert tensors go into their block's stacks."""
        return load_moe_weights(self, weights, super().load_weights)
