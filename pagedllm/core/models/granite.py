"""Granite (Hugging Face ``GraniteForCausalLM``: IBM Granite 3.x): the Llama decoder with four multipliers from
the config: the embeddings times ``embedding_multiplier`` (in :class:`LlamaModel`), the softmax scale
``attention_multiplier``, each attention and MLP output times ``residual_multiplier`` before its residual add,
and the logits divided by ``logits_scaling``."""

from __future__ import annotations

import torch

from pagedllm.backends.interface import AttentionMetadata, Backend
from pagedllm.core.models.layers import Fp8Activation
from pagedllm.core.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from pagedllm.core.sampled_rows import SampledRows


class GraniteAttention(LlamaAttention):
    """Llama attention with the config's softmax scale, its output times ``residual_multiplier``."""

    def __init__(self, hf_config: object, layer_idx: int, sliding_window: int | None, backend: Backend) -> None:
        super().__init__(hf_config, layer_idx, sliding_window, backend)
        self.residual_multiplier = float(hf_config.residual_multiplier)

    def attention_scale(self, hf_config: object) -> float:
        """``attention_multiplier``."""
        return float(hf_config.attention_multiplier)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor | Fp8Activation,
                metadata: AttentionMetadata, sampled: SampledRows | None = None) -> torch.Tensor:
        """See :meth:`LlamaAttention.forward`; the output scaled."""
        return super().forward(positions, hidden, metadata, sampled) * self.residual_multiplier


class GraniteMLP(LlamaMLP):
    """Llama's SwiGLU MLP, its output times ``residual_multiplier``."""

    def __init__(self, hf_config: object, backend: Backend) -> None:
        super().__init__(hf_config, backend)
        self.residual_multiplier = float(hf_config.residual_multiplier)

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        """See :meth:`LlamaMLP.forward`; the output scaled."""
        return super().forward(x) * self.residual_multiplier


class GraniteDecoderLayer(LlamaDecoderLayer):
    """Llama decoder layer of :class:`GraniteAttention` and :class:`GraniteMLP`."""

    attention_cls = GraniteAttention

    def make_mlp(self, hf_config: object, layer_idx: int, backend: Backend) -> LlamaMLP:
        """A :class:`GraniteMLP`."""
        return GraniteMLP(hf_config, backend)


class GraniteForCausalLM(LlamaForCausalLM):
    """Granite; logits divided by ``logits_scaling``."""

    layer_cls = GraniteDecoderLayer

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """See :meth:`LlamaForCausalLM.compute_logits`; divided by ``logits_scaling``."""
        return super().compute_logits(hidden) / float(self.config.logits_scaling)
