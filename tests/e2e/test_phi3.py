"""Phi-3/3.5 against transformers on the same files: fused q|k|v and gate|up checkpoint tensors, LongRoPE.

LongRoPE rotates positions below ``original_max_position_embeddings`` (64 here) with its short factors and the
later ones with its long factors, as vLLM does and as transformers' model computes a step whose new positions
pass 64 over a cache kept from before: the reference below runs transformers' model token by token over its
cache. (transformers' ``generate`` for Phi-3 goes further: where a sequence first passes 64 it drops the cache
and recomputes every position with the long factors, and a prompt longer than 64 tokens is rotated with the long
factors throughout; pagedllm, as vLLM, keeps the short factors for the positions below 64.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.core.models.layers import rope_cos_sin
from tests.conftest import assert_pool_free


def hf_greedy_over_cache(model_dir: Path, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' model run greedily over its own KV cache: the prompt in one forward, then one token a step."""
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cache = DynamicCache(config=model.config)
    tokens: list[int] = []
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits
        while len(tokens) < max_tokens:
            tokens.append(int(logits[0, -1].argmax()))
            position = torch.tensor([[len(prompt) + len(tokens) - 1]])
            logits = model(torch.tensor([tokens[-1:]]), past_key_values=cache, use_cache=True,
                           position_ids=position).logits
    return tokens


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_greedy_equals_transformers_across_the_longrope_switch(checkpoint_factory, asynchronous: bool) -> None:
    model_dir = checkpoint_factory("phi3")
    llm = LLM(str(model_dir), device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16,
              async_scheduling=asynchronous)
    ids = llm.get_tokenizer()("def main(x):\n    return x * 2\n" * 4).input_ids
    prompts = [ids[:5], ids[:30], ids[:50], ids[:63]]
    max_tokens = 40  # every prompt passes position 64
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                           use_tqdm=False)
    for prompt, out in zip(prompts, outputs, strict=True):
        ref = hf_greedy_over_cache(model_dir, prompt, max_tokens)
        assert out.outputs[0].token_ids == ref, f"prompt of {len(prompt)} tokens diverged"
    assert_pool_free(llm)


def test_longrope_cache_switches_factors_at_the_original_length(checkpoint_factory) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint_factory("phi3"))
    cache = rope_cos_sin(config, 16, 128)
    short = rope_cos_sin(config, 16, 64)
    assert cache.shape == (128, 16) and torch.equal(cache[:64], short)
    inv_long = 1.0 / (torch.tensor(config.rope_parameters["long_factor"]) * 10000.0 ** (torch.arange(0, 16, 2) / 16))
    scaling = cache[64, 0] / torch.cos(64 * inv_long[0])  # the attention factor both halves carry
    torch.testing.assert_close(cache[100, :8], torch.cos(100 * inv_long) * scaling)
    config.rope_parameters["partial_rotary_factor"] = 0.75
    with pytest.raises(ValueError, match="partial rotary embeddings"):
        rope_cos_sin(config, 16, 128)
