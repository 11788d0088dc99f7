"""End-to-end: the built-in demo checkpoint, loaded by Hugging Face transformers and by pagedllm.

Both run in float32 on CPU from the same bfloat16 checkpoint, so greedy decoding must agree token for token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pagedllm.demo import DEMO_MODEL_NAME, demo_model_path

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:"]
MAX_NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf_tokenizer() -> PreTrainedTokenizerBase:
    """The demo tokenizer, loaded by transformers."""
    return AutoTokenizer.from_pretrained(demo_model_path())


@pytest.fixture(scope="module")
def hf_model() -> PreTrainedModel:
    """The demo model, loaded by transformers in float32."""
    model = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32)
    return model.eval()


def hf_greedy(model: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedily generate exactly ``max_new_tokens`` tokens after ``prompt_ids`` with transformers."""
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
        )
    return out[0, len(prompt_ids) :].tolist()


def describe_divergence(
    model: PreTrainedModel, prompt_ids: list[int], expected: list[int], actual: list[int]
) -> str:
    """Say where two greedy continuations first differ and how close transformers' top two logits were."""
    pos = next((i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b), None)
    if pos is None:
        return f"lengths differ: transformers {len(expected)} tokens, pagedllm {len(actual)} tokens"
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + expected[:pos]])).logits[0, -1]
    top = torch.topk(logits, 2)
    return (
        f"first difference at new token {pos}: transformers {expected[pos]}, pagedllm {actual[pos]}; "
        f"transformers' top-2 ids {top.indices.tolist()} logits {top.values.tolist()}, "
        f"pagedllm's token logit {logits[actual[pos]].item():.6f}"
    )


def test_demo_checkpoint_loads_in_transformers(
    hf_model: PreTrainedModel, hf_tokenizer: PreTrainedTokenizerBase
) -> None:
    """The shipped checkpoint is a small, complete HF directory whose model writes Python-looking code."""
    path = Path(demo_model_path())
    assert path.is_absolute()
    assert DEMO_MODEL_NAME == "pagedllm-demo"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (path / name).is_file(), name
    assert sum(f.stat().st_size for f in path.iterdir() if f.is_file()) < 10_000_000
    assert hf_model.config.model_type == "llama"
    assert hf_tokenizer.eos_token_id == hf_model.generation_config.eos_token_id

    prompt_ids = hf_tokenizer("def fibonacci(n):").input_ids
    text = hf_tokenizer.decode(hf_greedy(hf_model, prompt_ids, 64))
    assert "\n    " in text, f"no indented line in {text!r}"
    assert any(kw in text for kw in ("return", "if ", "for ", "self", "=")), text


def test_demo_greedy_parity_with_transformers(
    hf_model: PreTrainedModel, hf_tokenizer: PreTrainedTokenizerBase
) -> None:
    """pagedllm's offline API reproduces transformers' greedy tokens exactly on the demo model."""
    from pagedllm import LLM, SamplingParams

    llm: Any = LLM(model=demo_model_path(), device="cpu", dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)

    assert len(outs) == len(PROMPTS)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        prompt_ids = hf_tokenizer(prompt).input_ids
        assert list(out.prompt_token_ids) == prompt_ids, prompt
        expected = hf_greedy(hf_model, prompt_ids, MAX_NEW_TOKENS)
        actual = list(out.outputs[0].token_ids)
        assert actual == expected, f"{prompt!r}: " + describe_divergence(
            hf_model, prompt_ids, expected, actual
        )
