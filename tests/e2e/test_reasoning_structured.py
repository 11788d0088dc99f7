"""Structured outputs under ``reasoning_parser`` (vLLM's ``--reasoning-parser``): the grammar applies to the
answer after the thinking. On a tiny checkpoint whose tokenizer has ``<think>`` and ``</think>`` as single
tokens (as Qwen3's has), a logit bias makes ``</think>`` the first token: the answer after it follows the
grammar. While the model thinks, generation is exactly what it is without a grammar; a prompt that already
closed the thinking (Qwen3's template with ``enable_thinking`` false) has the grammar from the first token. Speculative
decoding changes none of it."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("xgrammar")

from pagedllm import LLM, SamplingParams
from pagedllm.core.sampling_params import StructuredOutputsParams
from tests.conftest import assert_pool_free

THINK_TOKENS = ("<think>", "</think>")
ANSWER = StructuredOutputsParams(choice=["It is sunny."])


@pytest.fixture(scope="module")
def think_dir(checkpoint_factory) -> Path:
    return checkpoint_factory("llama", added_tokens=THINK_TOKENS)


@pytest.fixture(scope="module")
def llms(think_dir: Path) -> dict[str, LLM]:
    """The same checkpoint with and without a reasoning parser, and with one and speculative decoding."""
    common = dict(device="cpu", dtype="float32", kv_cache_memory_bytes=4 << 20, seed=0)
    ngram = {"method": "ngram", "num_speculative_tokens": 4}
    return {"deepseek_r1": LLM(str(think_dir), reasoning_parser="deepseek_r1", **common),
            "none": LLM(str(think_dir), **common),
            "speculative": LLM(str(think_dir), reasoning_parser="deepseek_r1", speculative_config=ngram, **common)}


def text_of(llm: LLM, prompt: str, **params: object) -> str:
    (out,) = llm.generate(prompt, SamplingParams(**{"temperature": 0.0, "max_tokens": 24, **params}), use_tqdm=False)
    return out.outputs[0].text


def test_the_grammar_applies_after_the_thinking(llms: dict[str, LLM]) -> None:
    end = llms["none"].get_tokenizer().convert_tokens_to_ids("</think>")
    think_first = {end: 100.0}  # the model closes its (empty) thinking at once
    assert text_of(llms["deepseek_r1"], "user: weather?\nassistant:", structured_outputs=ANSWER,
                   logit_bias=think_first) == "</think>It is sunny."
    # without the parser the grammar holds from the first token, which the bias cannot overrule
    assert text_of(llms["none"], "user: weather?\nassistant:", structured_outputs=ANSWER,
                   logit_bias=think_first) == "It is sunny."
    assert_pool_free(llms["deepseek_r1"])


def test_thinking_is_free_and_a_closed_prompt_answers_at_once(llms: dict[str, LLM]) -> None:
    reasoner = llms["deepseek_r1"]
    free = text_of(reasoner, "user: weather?\nassistant:<think>", max_tokens=12)
    assert text_of(reasoner, "user: weather?\nassistant:<think>", max_tokens=12, structured_outputs=ANSWER) == free
    assert not "It is sunny.".startswith(free)  # the unconstrained text: the grammar did not steer it
    closed = "user: weather?\nassistant:<think>\n\n</think>\n\n"
    assert text_of(reasoner, closed, structured_outputs=ANSWER) == "It is sunny."
    assert_pool_free(reasoner)


def test_speculative_drafts_wait_for_the_grammar(llms: dict[str, LLM]) -> None:
    """With prompt lookup, the thinking (no drafts while the grammar waits) and the answer (drafts its grammar
    allows) are what they are without it."""
    reasoner, speculative = llms["deepseek_r1"], llms["speculative"]
    end = reasoner.get_tokenizer().convert_tokens_to_ids("</think>")
    closed = "user: It is sunny. It is sunny. weather?\nassistant:<think>\n\n</think>\n\n"
    for prompt, params in (("user: weather?\nassistant:<think>", dict(max_tokens=12)),
                           ("user: weather?\nassistant:", dict(logit_bias={end: 100.0})),
                           (closed, {})):
        assert text_of(speculative, prompt, structured_outputs=ANSWER, **params) == \
            text_of(reasoner, prompt, structured_outputs=ANSWER, **params)
    assert speculative.llm_engine.stats().spec_decode_num_accepted_tokens > 0  # the answer copied the prompt
    assert_pool_free(speculative)
