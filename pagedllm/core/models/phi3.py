"""Phi-3 and Phi-3.5 (Hugging Face ``Phi3ForCausalLM``): the Llama decoder whose checkpoints store q|k|v and
gate|up already fused (``qkv_proj``, ``gate_up_proj``: loaded part by part, so tensor parallelism splits them
like ours); LongRoPE for the long-context checkpoints (``pagedllm.core.models.layers.rope_cos_sin``); a sliding
window where the config sets one."""

from __future__ import annotations

from pagedllm.core.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3/3.5; its fused checkpoint tensors match our fused parameters' names."""
