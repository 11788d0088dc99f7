"""A multimodal Gemma 3 checkpoint (the layout of Gemma-3-4B and up: ``Gemma3ForConditionalGeneration`` with a
vision tower) served by its text stack: greedy text generation equals transformers' on the same files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.testing.checkpoints import TINY_CONFIGS, build_tokenizer
from tests.conftest import assert_pool_free
from tests.e2e.test_hf_parity import mixed_prompts


@pytest.fixture(scope="module")
def gemma3_multimodal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    directory = tmp_path_factory.mktemp("gemma3_mm")
    tokenizer = build_tokenizer(directory)
    text = dict(TINY_CONFIGS["gemma3"], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.mul_(8.0 if "embed" in name else 2.0)
            elif "norm" in name:  # Gemma's 1 + w norms: offsets that matter
                param.normal_(0.0, 0.3)
    model.save_pretrained(str(directory))
    return directory


def test_text_generation_equals_transformers(gemma3_multimodal: Path) -> None:
    from transformers import Gemma3ForConditionalGeneration

    llm = LLM(str(gemma3_multimodal), device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=64)
    assert llm.llm_engine.model_config.hf_config.model_type == "gemma3_text"
    prompts = mixed_prompts(llm.get_tokenizer())
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    hf = Gemma3ForConditionalGeneration.from_pretrained(gemma3_multimodal, dtype=torch.float32)
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                          do_sample=False)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref, f"prompt of {len(prompt)} tokens diverged"
    assert_pool_free(llm)
