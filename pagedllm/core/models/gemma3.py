"""Gemma 3 text models (Hugging Face ``Gemma3ForCausalLM``: Gemma-3-1B, and the text stack of the larger ones):
the Llama decoder with

- RMSNorms that scale by ``1 + weight`` (checkpoints store the offset; :class:`GemmaRMSNorm` loads ``1 + w``),
  four per layer: before and after the attention, before and after the MLP;
- per-head q/k norms before the rotary embedding (as Qwen3), the softmax scale ``query_pre_attn_scalar ** -0.5``;
- sliding-window layers (``layer_types``) with their own rope parameters (``rope_parameters`` per layer type);
- a GeGLU MLP (``gelu_pytorch_tanh``) through ``Backend.gelu_and_mul``;
- embeddings times ``sqrt(hidden_size)`` rounded to the model dtype, tied to the LM head; optional final logit
  soft-capping.

With tensor parallelism the attention and MLP outputs are all-reduced before their post-norms (the norms see
whole sums), so the norms here never reduce.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.backends.interface import AttentionMetadata, Backend
from pagedllm.core.distributed.parallel_layers import WeightLike, materialize
from pagedllm.core.models.layers import Fp8Activation, RMSNorm, copy_checked
from pagedllm.core.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, Qwen3Attention
from pagedllm.core.sampled_rows import SampledRows


class GemmaRMSNorm(RMSNorm):
    """RMSNorm whose checkpoint weight ``w`` is an offset: it scales by ``1 + w`` (loaded as that sum)."""

    def __init__(self, hidden_size: int, eps: float, backend: Backend) -> None:
        super().__init__(hidden_size, eps, backend)
        self.weight.weight_loader = self._load_offset  # type: ignore[attr-defined]

    @staticmethod
    def _load_offset(param: nn.Parameter, loaded: WeightLike) -> None:
        copy_checked(param.data, materialize(loaded).float() + 1.0)


class Gemma3Attention(Qwen3Attention):
    """Qwen3's attention (per-head q/k norms, here Gemma's) with the config's softmax scale; its output summed over
    the tensor-parallel ranks."""

    def __init__(self, hf_config: object, layer_idx: int, sliding_window: int | None, backend: Backend) -> None:
        super().__init__(hf_config, layer_idx, sliding_window, backend)
        self.q_norm = GemmaRMSNorm(self.head_dim, hf_config.rms_norm_eps, backend)
        self.k_norm = GemmaRMSNorm(self.head_dim, hf_config.rms_norm_eps, backend)
        self.o_proj.reduce_results = True

    def attention_scale(self, hf_config: object) -> float:
        """``query_pre_attn_scalar ** -0.5``."""
        return float(hf_config.query_pre_attn_scalar) ** -0.5


class GemmaMLP(LlamaMLP):
    """GeGLU MLP (gate|up fused, ``gelu`` with the tanh approximation); its output summed over the ranks."""

    def __init__(self, hf_config: object, backend: Backend) -> None:
        super().__init__(hf_config, backend)
        self.down_proj.reduce_results = True
        act = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", "gelu_pytorch_tanh")
        self.approximate = "tanh" if act in ("gelu_pytorch_tanh", "gelu_tanh") else "none"

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        """``x: [num_tokens, hidden_size]`` -> the same, whole (an fp8 down projection quantizes its input)."""
        return self.down_proj(self.backend.gelu_and_mul(self.gate_up_proj(x), self.approximate))


class Gemma3DecoderLayer(LlamaDecoderLayer):
    """Pre- and post-norms around the attention and the MLP; the residual stream carried as in Llama."""

    attention_cls = Gemma3Attention

    def __init__(self, hf_config: object, layer_idx: int, sliding_window: int | None, backend: Backend) -> None:
        super().__init__(hf_config, layer_idx, sliding_window, backend)
        hidden, eps = hf_config.hidden_size, hf_config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps, backend)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps, backend)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps, backend)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps, backend)

    def make_mlp(self, hf_config: object, layer_idx: int, backend: Backend) -> nn.Module:
        """A :class:`GemmaMLP`."""
        return GemmaMLP(hf_config, backend)

    def use_fp8_inputs(self) -> None:
        """Nothing: the norms hand their outputs to fp8 projections unquantized (each quantizes its input)."""

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                metadata: AttentionMetadata, sampled: SampledRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`LlamaDecoderLayer.forward`: ``hidden`` (the MLP's post-normed output) plus ``residual`` is
        the layer's output."""
        hidden, residual = self.normed_input(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, metadata, sampled))
        if sampled is not None:
            residual = residual[sampled.indices]
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3 (text); see the module docstring."""

    layer_cls = Gemma3DecoderLayer

    def __init__(self, hf_config: object, backend: Backend) -> None:
        super().__init__(hf_config, backend)
        self.model.norm = GemmaRMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps, backend)
        # the embeddings' scale, rounded to the model dtype as transformers rounds it
        scale = torch.tensor(hf_config.hidden_size**0.5, dtype=torch.get_default_dtype())
        self.model.embedding_multiplier = float(scale)
        self.final_logit_softcapping = getattr(hf_config, "final_logit_softcapping", None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """See :meth:`LlamaForCausalLM.compute_logits`; soft-capped (``cap * tanh(logits / cap)``) if the config
        says so."""
        logits = super().compute_logits(hidden)
        cap = self.final_logit_softcapping
        return logits if not cap else torch.tanh(logits / cap) * cap


def text_weight_name(name: str) -> str | None:
    """A multimodal Gemma 3 checkpoint tensor's name in the text model (``language_model.model.*`` as the hub
    stores it, or ``model.language_model.*`` as transformers 5 holds it, become ``model.*``), or None for the
    vision tower's and the projector's tensors."""
    for prefix, replacement in (("language_model.model.", "model."), ("model.language_model.", "model."),
                                ("language_model.lm_head.", "lm_head.")):
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                        "model.multi_modal_projector.")):
        return None
    return name


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """The text stack of a multimodal Gemma 3 checkpoint (4B and up), built from its ``text_config``
    (``ModelConfig`` reads it): text in, text out; the vision tower's and the projector's tensors are skipped, so
    images are not taken."""

    def load_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> set[str]:
        """See :meth:`LlamaForCausalLM.load_weights`, with the names of :func:`text_weight_name`."""
        return super().load_weights((renamed, tensor) for name, tensor in weights
                                    if (renamed := text_weight_name(name)) is not None)
