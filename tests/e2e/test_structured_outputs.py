"""Structured outputs through xgrammar: completions that follow a JSON schema, any JSON object, a regular
expression, a choice or an EBNF grammar, sampled (n=2, temperature 1) from a tiny random model, which left to
itself produces none of them; with synchronous and asynchronous scheduling; invalid specs refused up front."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("xgrammar")

from pagedllm import LLM, SamplingParams
from pagedllm.core.sampling_params import StructuredOutputsParams
from pagedllm.core.structured_output import disallowed_by_bitmask
from tests.conftest import assert_pool_free

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "green"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "colour", "n"], "additionalProperties": False}
REGEX = r"[0-9]{3}-(yes|no)"
CHOICES = ["red", "green", "blue sky", 'say "hi"']
GRAMMAR = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c]'


def check_json(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"ok", "colour", "n"} and isinstance(value["ok"], bool)
    assert value["colour"] in ("red", "green") and isinstance(value["n"], int) and 0 <= value["n"] <= 99


CASES = [
    (StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True), check_json),
    (StructuredOutputsParams(json=json.dumps(SCHEMA), disable_any_whitespace=True), check_json),
    (StructuredOutputsParams(json_object=True, disable_any_whitespace=True), None),
    (StructuredOutputsParams(regex=REGEX), lambda text: re.fullmatch(REGEX, text) or pytest.fail(text)),
    (StructuredOutputsParams(choice=CHOICES), lambda text: text in CHOICES or pytest.fail(text)),
    (StructuredOutputsParams(grammar=GRAMMAR), lambda text: re.fullmatch(r"\([a-c](,[a-c])*\)", text) or
     pytest.fail(text)),
]


@pytest.fixture(scope="module")
def engines(llama_dir: Path) -> dict[bool, LLM]:
    return {asynchronous: LLM(str(llama_dir), device="cpu", dtype="float32", seed=0, async_scheduling=asynchronous)
            for asynchronous in (False, True)}


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_completions_follow_their_structure(engines: dict[bool, LLM], asynchronous: bool) -> None:
    llm = engines[asynchronous]
    prompts = ["def f(x):", "The quick brown fox"]
    free = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=24, seed=3), use_tqdm=False)
    assert not any(c.text in CHOICES for o in free for c in o.outputs)  # the model alone follows nothing
    params = [SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=96, structured_outputs=so) for so, _ in CASES]
    for (_, check), so_params in zip(CASES, params, strict=True):
        for out in llm.generate(prompts, so_params, use_tqdm=False):
            for completion in out.outputs:
                if check is None:  # any object: a random model may write one key for ever; a finished one parses
                    assert completion.text.startswith("{")
                    if completion.finish_reason == "stop":
                        assert isinstance(json.loads(completion.text), dict)
                    continue
                assert completion.finish_reason == "stop", completion
                check(completion.text)
    # constrained and free requests in one batch: the free ones are untouched
    mixed = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                   SamplingParams(temperature=0, max_tokens=64, structured_outputs=CASES[4][0])],
                         use_tqdm=False)
    alone = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone[0].outputs[0].token_ids and mixed[1].outputs[0].text in CHOICES
    assert_pool_free(llm)


def test_invalid_structures_are_refused_before_anything_runs(engines: dict[bool, LLM]) -> None:
    llm = engines[False]
    with pytest.raises(ValueError, match="exactly one of json, json_object, regex, choice, grammar"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice must be non-empty strings"):
        StructuredOutputsParams(choice=[])
    for bad in (StructuredOutputsParams(regex="[0-9"), StructuredOutputsParams(grammar="root ::= ("),
                StructuredOutputsParams(json='{"type": "object", "properties": 5}')):
        with pytest.raises(ValueError, match=r"SamplingParams\.structured_outputs is invalid"):
            llm.generate(["x", "y"], SamplingParams(structured_outputs=bad), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert_pool_free(llm)


def test_bitmask_unpacks_to_the_allowed_tokens() -> None:
    vocab = 70
    allowed = [[0, 5, 31, 32, 63, 64, 69], [1]]
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    for row, tokens in enumerate(allowed):
        for t in tokens:
            bitmask[row, t // 32] |= torch.tensor(1 << (t % 32)).to(torch.int32)  # bit 31 makes the word negative
    disallowed = disallowed_by_bitmask(bitmask, vocab)
    assert disallowed.shape == (2, vocab)
    for row, tokens in enumerate(allowed):
        assert (~disallowed[row]).nonzero().flatten().tolist() == tokens
