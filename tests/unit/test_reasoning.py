"""Reasoning parsers: a reply's thinking split from its answer, whole and as it is written."""

from __future__ import annotations

import pytest

from pagedllm.core.reasoning import REASONING_TAGS, prompt_closes_thinking
from pagedllm.entrypoints.openai.reasoning import REASONING_FORMATS, ReasoningSplit, ReasoningStream

R1, QWEN3 = REASONING_FORMATS["deepseek_r1"], REASONING_FORMATS["qwen3"]


def test_the_engine_and_the_server_know_the_same_parsers() -> None:
    assert set(REASONING_TAGS) == set(REASONING_FORMATS)


def test_which_prompts_close_the_thinking() -> None:
    assert prompt_closes_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n", "qwen3")  # enable_thinking off
    assert not prompt_closes_thinking("<|Assistant|><think>\n", "deepseek_r1")  # R1's template opens it
    assert not prompt_closes_thinking("<|im_start|>assistant\n", "qwen3")  # neither tag: the model decides
    assert not prompt_closes_thinking("old turn <think>a</think> b <think>\n", "qwen3")


def test_deepseek_r1_thinks_from_the_start() -> None:
    assert R1.split("<think>\nHmm.\n</think>\n\nYes.") == ReasoningSplit("\nHmm.\n", "\n\nYes.")
    assert R1.split("Hmm, 9.8 is larger.</think>9.8") == ReasoningSplit("Hmm, 9.8 is larger.", "9.8")  # no opening
    assert R1.split("Still thinking when cut") == ReasoningSplit("Still thinking when cut", None)
    assert R1.split("<think>a</think>") == ReasoningSplit("a", "")


def test_qwen3_thinks_only_when_the_reply_opens_with_think() -> None:
    assert QWEN3.split("<think>\nHmm.\n</think>\n\nYes.") == ReasoningSplit("\nHmm.\n", "\n\nYes.")
    assert QWEN3.split("Yes.") == ReasoningSplit(None, "Yes.")  # enable_thinking false
    assert QWEN3.split("Yes, </think> is a tag.") == ReasoningSplit(None, "Yes, </think> is a tag.")
    assert QWEN3.split("<think>cut short") == ReasoningSplit("cut short", None)


def test_unfinished_replies_hold_back_what_may_be_a_tag() -> None:
    assert QWEN3.split("<thi", finished=False) == ReasoningSplit("", None)  # may open with <think>
    assert QWEN3.split("<thing", finished=False) == ReasoningSplit(None, "<thing")
    assert R1.split("abc</thi", finished=False) == ReasoningSplit("abc", None)
    assert R1.split("abc</think>d", finished=False) == ReasoningSplit("abc", "d")


@pytest.mark.parametrize("size", [1, 2, 5, 100])
@pytest.mark.parametrize("text,name", [("<think>\nLet me see: 2 < 3.\n</think>\n\nTwo.", "qwen3"),
                                       ("Let me see </th no, <think> is text.</think>Two.", "deepseek_r1"),
                                       ("No thinking here.", "qwen3"), ("Cut while thinking", "deepseek_r1")])
def test_streamed_reasoning_adds_up_to_the_whole(text: str, name: str, size: int) -> None:
    """Fed the reply a few characters at a time, the reasoning deltas add up to the finished reply's reasoning
    and the answer so far only ever grows into the finished answer."""
    stream, format = ReasoningStream(REASONING_FORMATS[name]), REASONING_FORMATS[name]
    reasoning, answers = "", []
    for end in range(size, len(text) + size, size):
        finished = end >= len(text)
        new, answer = stream.next(text[:end], finished)
        reasoning += new
        if answer is not None:
            assert not answers or answer.startswith(answers[-1])
            answers.append(answer)
    whole = format.split(text)
    assert reasoning == (whole.reasoning or "") and (answers[-1] if answers else None) == whole.answer


def test_thinking_token_counts() -> None:
    """The thinking's tokens: up to the one-token end tag, or the shortest run whose text holds a tag written in
    pieces; all of them when the thinking never ends; none without thinking; unknown without a decoder."""
    from pagedllm.entrypoints.openai.reasoning import reasoning_token_count

    pieces = ["<think>", "Hm", "m.", "</", "think", ">", "Yes", "."]
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    text = "".join(pieces)
    assert reasoning_token_count(QWEN3, text, list(range(8)), None, decode) == 6  # through ">"
    assert reasoning_token_count(QWEN3, text, list(range(8)), None) is None
    assert reasoning_token_count(R1, "Hm</think>Yes", [11, 12, 99, 13], 99) == 3  # the one-token tag
    assert reasoning_token_count(R1, "Hmm, still", [1, 2, 3], None) == 3
    assert reasoning_token_count(QWEN3, "Yes.", [1, 2], None) == 0
