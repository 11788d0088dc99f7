"""Pluggy plugin registering the built-in model architectures."""

from __future__ import annotations

from torch import nn

from pagedllm.backends.hookspecs import hookimpl


@hookimpl
def pagedllm_register_models() -> dict[str, type[nn.Module]]:
    """Llama, Mistral, Qwen2 and Qwen3 decoders; the Mixtral and Qwen3-MoE mixtures of experts."""
    from pagedllm.core.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
    from pagedllm.core.models.mixtral import MixtralForCausalLM
    from pagedllm.core.models.qwen3_moe import Qwen3MoeForCausalLM

    return {
        "LlamaForCausalLM": LlamaForCausalLM,
        "MistralForCausalLM": MistralForCausalLM,
        "Qwen2ForCausalLM": Qwen2ForCausalLM,
        "Qwen3ForCausalLM": Qwen3ForCausalLM,
        "MixtralForCausalLM": MixtralForCausalLM,
        "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    }
