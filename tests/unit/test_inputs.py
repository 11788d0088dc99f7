"""Prompt forms the offline API takes (text, ids, vLLM's prompt dictionaries) and the errors for the rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedllm.core.inputs import is_single_prompt, parse_prompt, token_ids_of


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hello", ("hello", None)),
        ([3, 1, 2], (None, [3, 1, 2])),
        ((3, 1, 2), (None, [3, 1, 2])),
        (torch.tensor([3, 1, 2]), (None, [3, 1, 2])),
        (np.array([3, 1, 2], dtype=np.int32), (None, [3, 1, 2])),
        ([np.int64(3), torch.tensor(1)], (None, [3, 1])),
        ({"prompt": "hello"}, ("hello", None)),
        ({"prompt_token_ids": [3, 1]}, (None, [3, 1])),
        ({"prompt_token_ids": [3, 1], "prompt": "text for 3 1"}, ("text for 3 1", [3, 1])),
    ],
)
def test_prompt_forms(prompt: object, expected: tuple[object, object]) -> None:
    text, ids = parse_prompt(prompt)
    assert (text, ids) == expected
    assert ids is None or all(type(t) is int for t in ids)  # Python ints, whatever came in


def test_token_ids_are_a_new_list() -> None:
    ids = [1, 2, 3]
    out = token_ids_of(ids)
    assert out == ids and out is not ids


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (None, "a prompt must be text, a list of token ids or a prompt dictionary, got NoneType"),
        (3, "got int"),
        (b"bytes", "got bytes"),
        ([1, 2.5], r"must be integers, got 2\.5 \(float\)"),
        ([1, "2"], r"must be integers, got '2' \(str\)"),
        (torch.tensor([1.0, 2.0]), r"must be integers, got 1\.0 \(float\)"),
        (torch.tensor([[1, 2]]), "one-dimensional, got 2 dimensions"),
        ([1, 2**70], r"must be integers, got 1180591620717411303424 \(int\)"),
        ({"prompt_token_ids": "123"}, "sequence of integers, got str"),
        ({"prompt_token_ids": [[1, 2]]}, r"must be integers, got \[1, 2\] \(list\)"),
        ({"prompt": 5}, r"prompt\['prompt'\] must be a string, got int"),
        ({}, "needs 'prompt' \\(text\\) or 'prompt_token_ids'"),
        ({"prompt": "x", "multi_modal_data": {}}, r"unsupported keys \['multi_modal_data'\]"),
    ],
)
def test_malformed_prompts_are_refused_clearly(prompt: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_prompt(prompt)


@pytest.mark.parametrize(
    ("prompts", "single"),
    [
        ("text", True),
        ([1, 2, 3], True),
        ({"prompt_token_ids": [1]}, True),
        (torch.tensor([1, 2]), True),
        ([np.int64(1), np.int64(2)], True),
        ([1.5, 2], True),  # one (malformed) prompt: parse_prompt names the float
        (["a", "b"], False),
        ([[1, 2], [3]], False),
        ([{"prompt": "a"}, {"prompt_token_ids": [1]}], False),
        (torch.tensor([[1, 2], [3, 4]]), False),
        ([], False),
        (None, True),  # one malformed prompt: parse_prompt names it
        (7, True),
    ],
)
def test_one_prompt_or_a_list(prompts: object, single: bool) -> None:
    assert is_single_prompt(prompts) is single
