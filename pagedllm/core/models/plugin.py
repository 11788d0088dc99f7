"""Pluggy plugin registering the built-in model architectures."""

from __future__ import annotations

from torch import nn

from pagedllm.backends.hookspecs import hookimpl


@hookimpl
def pagedllm_register_models() -> dict[str, type[nn.Module]]:
    """Llama, Mistral, Ministral, Qwen2, Qwen3, Granite, Gemma 2, Gemma 3, Phi-3 and OLMo 2 decoders; the Mixtral,
    Qwen2-MoE and Qwen3-MoE mixtures of experts."""
    from pagedllm.core.models.gemma2 import Gemma2ForCausalLM
    from pagedllm.core.models.gemma3 import Gemma3ForCausalLM, Gemma3ForConditionalGeneration
    from pagedllm.core.models.granite import GraniteForCausalLM
    from pagedllm.core.models.llama import (
        LlamaForCausalLM,
        MinistralForCausalLM,
        MistralForCausalLM,
        Qwen2ForCausalLM,
        Qwen3ForCausalLM,
    )
    from pagedllm.core.models.mixtral import MixtralForCausalLM
    from pagedllm.core.models.olmo2 import Olmo2ForCausalLM
    from pagedllm.core.models.phi3 import Phi3ForCausalLM
    from pagedllm.core.models.qwen2_moe import Qwen2MoeForCausalLM
    from pagedllm.core.models.qwen3_moe import Qwen3MoeForCausalLM

    return {
        "LlamaForCausalLM": LlamaForCausalLM,
        "MistralForCausalLM": MistralForCausalLM,
        "MinistralForCausalLM": MinistralForCausalLM,
        "Qwen2ForCausalLM": Qwen2ForCausalLM,
        "Qwen3ForCausalLM": Qwen3ForCausalLM,
        "GraniteForCausalLM": GraniteForCausalLM,
        "Gemma2ForCausalLM": Gemma2ForCausalLM,
        "Gemma3ForCausalLM": Gemma3ForCausalLM,
        "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,  # its text stack
        "Phi3ForCausalLM": Phi3ForCausalLM,
        "Olmo2ForCausalLM": Olmo2ForCausalLM,
        "MixtralForCausalLM": MixtralForCausalLM,
        "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
        "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    }
