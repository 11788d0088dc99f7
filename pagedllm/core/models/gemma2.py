"""Gemma 2 (Hugging Face ``Gemma2ForCausalLM``): Gemma 3's decoder (``1 + w`` norms before and after the
attention and the MLP, a GeGLU MLP, scaled and tied embeddings, alternating sliding-window layers, the softmax
scale ``query_pre_attn_scalar ** -0.5``, final logit soft-capping) without the per-head q/k norms and with one
rope for every layer, and with its attention scores soft-capped (``attn_logit_softcapping``: each scaled score
``s`` becomes ``cap * tanh(s / cap)``), which the backend's attention computes
(``AttentionSpec.logits_soft_cap``; a backend that does not claim it is refused when the engine starts).
"""

from __future__ import annotations

from pagedllm.backends.interface import Backend
from pagedllm.core.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM
from pagedllm.core.models.llama import LlamaAttention


class Gemma2Attention(LlamaAttention):
    """Llama's attention with the config's softmax scale and soft cap; its output summed over the ranks."""

    def __init__(self, hf_config: object, layer_idx: int, sliding_window: int | None, backend: Backend) -> None:
        super().__init__(hf_config, layer_idx, sliding_window, backend)
        self.o_proj.reduce_results = True

    def attention_scale(self, hf_config: object) -> float:
        """``query_pre_attn_scalar ** -0.5``."""
        return float(hf_config.query_pre_attn_scalar) ** -0.5


class Gemma2DecoderLayer(Gemma3DecoderLayer):
    """Gemma 3's layer with :class:`Gemma2Attention`."""

    attention_cls = Gemma2Attention


class Gemma2ForCausalLM(Gemma3ForCausalLM):
    """Gemma 2; see the module docstring."""

    layer_cls = Gemma2DecoderLayer
