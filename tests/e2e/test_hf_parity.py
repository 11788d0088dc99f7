"""Greedy pagedllm output equals Hugging Face transformers token for token on the same checkpoints."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.testing.checkpoints import corpus_text
from tests.conftest import assert_pool_free
from tests.e2e.hf_reference import hf_greedy, hf_prompt_logprobs

MAX_TOKENS = 12


def mixed_prompts(tokenizer) -> list[list[int]]:
    """Prompts of very different lengths (1 to ~300 tokens), two of them sharing a long prefix."""
    text = corpus_text(60_000)
    ids = tokenizer(text).input_ids
    long = ids[1000:1300]
    return [ids[:1], ids[5000:5007], ids[7000:7033], ids[9000:9150], long, long[:200] + ids[20:40]]


@pytest.mark.parametrize("arch", ["llama", "mistral", "ministral", "qwen2", "qwen3", "granite",
                                  "gemma2", "gemma3", "olmo2", "mixtral", "qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_equals_transformers_under_chunking_and_preemption(checkpoint_factory, arch: str,
                                                                  prefix_caching: bool) -> None:
    model_dir = checkpoint_factory(arch)
    # 4-token blocks, a 64-token step budget and a pool of ~100 blocks: long prompts are chunked, and
    # the batch (~700 tokens at once) does not fit, so requests are preempted and recomputed.
    llm = LLM(str(model_dir), device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=64,
              num_kv_blocks=100, enable_prefix_caching=prefix_caching)
    prompts = mixed_prompts(llm.get_tokenizer())
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    for prompt, out, (ref, _) in zip(prompts, outputs, expected, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == ref, f"prompt of {len(prompt)} tokens diverged"
        assert out.outputs[0].finish_reason == "length"
    stats = llm.llm_engine.stats()
    assert stats.num_preemptions > 0
    if prefix_caching:
        assert stats.prefix_cache_hit_tokens > 0
    else:
        assert stats.prefix_cache_hit_tokens == 0
    assert_pool_free(llm)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_prompt_logprobs_equal_transformers_under_chunking_preemption_and_prefix_caching(checkpoint_factory,
                                                                                         arch: str) -> None:
    """Prompts cut into 64-token chunks, preempted and recomputed, and repeated (the prefix cache would hit:
    a prompt asking for its logprobs is computed whole); n=2 children each compute theirs."""
    model_dir = checkpoint_factory(arch)
    llm = LLM(str(model_dir), device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=64,
              num_kv_blocks=100, enable_prefix_caching=True)
    prompts = mixed_prompts(llm.get_tokenizer())
    prompts += prompts[-2:]
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, prompt_logprobs=3)] * 7
    params.append(SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=4, prompt_logprobs=0))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    references = hf_prompt_logprobs(model_dir, prompts)
    for prompt, out, ref, sp in zip(prompts, outputs, references, params, strict=True):
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
        assert out.prompt_logprobs[0] is None
        for position in range(1, len(prompt)):
            entry, expected, token = out.prompt_logprobs[position], ref[position - 1], prompt[position]
            assert entry[token].logprob == pytest.approx(float(expected[token]), abs=2e-4)
            assert abs(entry[token].rank - (int((expected > expected[token]).sum()) + 1)) <= 1  # near-ties aside
            others = sorted((lp.logprob for t, lp in entry.items() if lp.rank <= sp.prompt_logprobs), reverse=True)
            assert others == pytest.approx(expected.topk(sp.prompt_logprobs).values.tolist(), abs=2e-4)
            assert len(entry) in (sp.prompt_logprobs, sp.prompt_logprobs + 1)
    assert llm.llm_engine.stats().num_preemptions > 0
    plain = llm.generate(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False)
    assert all(o.prompt_logprobs is None for o in plain)
    assert_pool_free(llm)


def test_llama3_rope_scaling_equals_transformers(checkpoint_factory) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128}
    model_dir = checkpoint_factory("llama", rope_scaling=scaling, rope_theta=500000.0)
    llm = LLM(str(model_dir), device="cpu", dtype="float32", block_size=8, num_kv_blocks=200)
    prompts = mixed_prompts(llm.get_tokenizer())[2:5]  # 33 to 300 tokens: past the original 128 positions
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS),
                           use_tqdm=False)
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    assert [o.outputs[0].token_ids for o in outputs] == [ref for ref, _ in expected]
    assert_pool_free(llm)


def test_bf16_follows_divergence_rule(checkpoint_factory) -> None:
    model_dir = checkpoint_factory("llama", dtype=torch.bfloat16)
    llm = LLM(str(model_dir), device="cpu", dtype="bfloat16", block_size=8, max_num_batched_tokens=128,
              kv_cache_memory_bytes=4 << 20)
    prompts = mixed_prompts(llm.get_tokenizer())
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, logprobs=5)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS, dtype=torch.bfloat16, top_logprobs=5)
    num_exact = 0
    for out, (ref, ref_tops) in zip(outputs, expected, strict=True):
        ours = out.outputs[0].token_ids
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            if a != b:
                # after the first mismatch each side's token must be in the other's top-5
                assert a in ref_tops[i], f"step {i}: our token {a} not in HF top-5 {ref_tops[i]}"
                assert b in out.outputs[0].logprobs[i], f"step {i}: HF token {b} not in our top-5"
                break
        else:
            num_exact += 1
    assert num_exact >= len(prompts) // 2
    assert_pool_free(llm)
