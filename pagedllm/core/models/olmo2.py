"""OLMo 2 (Hugging Face ``Olmo2ForCausalLM``): a Llama-shaped decoder with post-norms and whole-projection q/k norms.

- No norm before the attention or the MLP: each block's output goes through its own RMSNorm
  (``post_attention_layernorm``, ``post_feedforward_layernorm``) before it joins the residual stream;
- q and k are normed over the whole projection (``q_norm: [num_heads * head_dim]``, ``k_norm: [num_kv_heads *
  head_dim]``) before the rotary embedding, so a rank holding some heads cannot norm alone: no tensor
  parallelism.
"""

from __future__ import annotations

import torch

from pagedllm.backends.interface import AttentionMetadata, Backend
from pagedllm.core.models.layers import Fp8Activation, RMSNorm
from pagedllm.core.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from pagedllm.core.sampled_rows import SampledRows


class Olmo2Attention(LlamaAttention):
    """Llama's attention with RMSNorms over the whole q and k projections before the rotary embedding."""

    def __init__(self, hf_config: object, layer_idx: int, sliding_window: int | None, backend: Backend) -> None:
        super().__init__(hf_config, layer_idx, sliding_window, backend)
        self.q_norm = RMSNorm(self.q_size, hf_config.rms_norm_eps, backend)
        self.k_norm = RMSNorm(self.kv_size, hf_config.rms_norm_eps, backend)

    def project_qkv(
        self, positions: torch.Tensor, hidden: torch.Tensor | Fp8Activation
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See :meth:`LlamaAttention.project_qkv`; q and k normed whole first."""
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        num_tokens = q.shape[0]
        q = self.q_norm(q.contiguous()).reshape(num_tokens, self.num_heads, self.head_dim)
        k = self.k_norm(k.contiguous()).reshape(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotate(positions, q, k)
        return q, k, v.reshape(num_tokens, self.num_kv_heads, self.head_dim)


class Olmo2DecoderLayer(LlamaDecoderLayer):
    """Post-norm layer: ``x + post_attention_layernorm(attn(x))``, then the same around the MLP. The residual
    stream is carried as in Llama: the layer's output is ``hidden + residual``."""

    attention_cls = Olmo2Attention

    def __init__(self, hf_config: object, layer_idx: int, sliding_window: int | None, backend: Backend) -> None:
        super().__init__(hf_config, layer_idx, sliding_window, backend)
        del self.input_layernorm  # OLMo 2 has none
        self.post_feedforward_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps, backend)

    def use_fp8_inputs(self) -> None:
        """Nothing: no norm feeds a projection (each fp8 projection quantizes its input)."""

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                metadata: AttentionMetadata, sampled: SampledRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`LlamaDecoderLayer.forward`."""
        x = hidden if residual is None else hidden + residual
        attended = self.post_attention_layernorm(self.self_attn(positions, x, metadata, sampled))
        if sampled is not None:
            x = x[sampled.indices]
        x = x + attended
        return self.post_feedforward_layernorm(self.mlp(x)), x

    def store_kv(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                 metadata: AttentionMetadata) -> None:
        """Only store the layer's keys and values (of its un-normed input)."""
        self.self_attn.store_kv(positions, hidden if residual is None else hidden + residual, metadata)


class Olmo2ForCausalLM(LlamaForCausalLM):
    """OLMo 2; single device only (the whole-projection q/k norms)."""

    layer_cls = Olmo2DecoderLayer
    supports_tensor_parallel = False
