"""fp8 linear layers (``quantization="fp8"``): what they compute, what they store, what is refused."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.core.config import EngineConfig
from pagedllm.entrypoints.engine_args import add_engine_args, engine_config_from_args
from tests.conftest import assert_pool_free
from tests.e2e.hf_reference import hf_greedy
from tests.e2e.test_hf_parity import mixed_prompts

MAX_TOKENS = 10


def test_names_and_options() -> None:
    assert EngineConfig(quantization="fp8").quantization == "fp8"
    with pytest.raises(ValueError, match=r"quantization must be None or one of fp8; got 'int4'"):
        EngineConfig(quantization="int4")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args(["--quantization", "fp8"])).quantization == "fp8"
    assert engine_config_from_args(parser.parse_args([])).quantization is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "awq"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biases on q|k|v
def test_greedy_equals_transformers_with_fp8_projections(checkpoint_factory, arch: str) -> None:
    """Token for token what transformers generates when its projections see e4m3-rounded weights and
    inputs (the LM head left alone), under chunked prefill and prefix caching; the projections' weights
    are stored in e4m3, the embeddings and the LM head in the model dtype."""
    model_dir = checkpoint_factory(arch)
    llm = LLM(str(model_dir), device="cpu", dtype="float32", quantization="fp8", block_size=4,
              max_num_batched_tokens=64, num_kv_blocks=256)
    model = llm.llm_engine.executor.worker.runner.model
    stored = {name: p.dtype for name, p in model.named_parameters()}
    assert stored["model.layers.0.self_attn.qkv_proj.weight"] == torch.float8_e4m3fn
    assert stored["model.layers.0.mlp.down_proj.weight"] == torch.float8_e4m3fn
    assert stored["model.embed_tokens.weight"] == torch.float32
    assert all(dtype == torch.float32 for name, dtype in stored.items() if "lm_head" in name or "norm" in name)
    prompts = mixed_prompts(llm.get_tokenizer())
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, logprobs=5)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS, top_logprobs=5, fp8_linear=True)
    plain = hf_greedy(model_dir, prompts, MAX_TOKENS, top_logprobs=5)
    gap_to_fp8, gap_to_plain = 0.0, 0.0
    for prompt, out, (ref, ref_tops), (_, plain_tops) in zip(prompts, outputs, expected, plain, strict=True):
        assert out.outputs[0].token_ids == ref, f"prompt of {len(prompt)} tokens diverged"
        for ours, theirs, unrounded in zip(out.outputs[0].logprobs, ref_tops, plain_tops, strict=True):
            token = max(theirs, key=theirs.get)
            gap_to_fp8 = max(gap_to_fp8, abs(ours[token].logprob - theirs[token]))
            gap_to_plain = max(gap_to_plain, abs(ours[token].logprob - unrounded.get(token, -float("inf"))))
    # the logprobs are the fp8 reference's, and fp8 moves them measurably from the unquantized model's
    assert gap_to_fp8 < 1e-4 and gap_to_plain > 5e-3, (gap_to_fp8, gap_to_plain)
    assert llm.llm_engine.stats().prefix_cache_hit_tokens > 0
    assert_pool_free(llm)


def test_a_quantization_the_backend_does_not_claim_is_refused(llama_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    unclaimed = replace(CpuBackend().capabilities(), quantizations=())
    monkeypatch.setattr(CpuBackend, "capabilities", lambda self: unclaimed)
    with pytest.raises(ValueError, match=r"backend 'cpu' does not support quantization 'fp8'; supported: none"):
        LLM(str(llama_dir), device="cpu", quantization="fp8", num_kv_blocks=16)
