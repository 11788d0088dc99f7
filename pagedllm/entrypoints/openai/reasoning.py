"""Reasoning models' thinking, split from their answer (``--reasoning-parser``, ``EngineConfig.reasoning_parser``),
as vLLM names the parsers:

- ``deepseek_r1``: the reply is reasoning from its start (an opening ``<think>`` is optional: DeepSeek-R1's
  template ends the prompt with it) up to ``</think>``; the rest is the answer. A reply without ``</think>`` (cut
  short by ``max_tokens``) is all reasoning. Also for QwQ and Qwen3 "Thinking" models, which always think.
- ``qwen3``: the reply is reasoning only when it begins with ``<think>`` (Qwen3 thinks unless the request's
  ``chat_template_kwargs`` say ``enable_thinking: false``); otherwise all of it is the answer.

Chat replies carry the reasoning in ``reasoning`` and, under its older name, ``reasoning_content``; the answer
in ``content`` (tool calls are parsed from the answer only; a structured output or forced tool call applies to
the answer: ``pagedllm.core.reasoning``). Streamed, the reasoning arrives as it is written, then the answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pagedllm.core.reasoning import REASONING_TAGS


@dataclass(frozen=True, slots=True)
class ReasoningSplit:
    """A reply's text cut in two: ``reasoning`` (None: the reply has none) and ``answer`` (None: not reached)."""

    reasoning: str | None
    answer: str | None


def held_back(text: str, tag: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``tag`` (a stream holds them back until
    the next text tells)."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)


class ReasoningFormat:
    """One model family's reasoning markup (see the module docstring)."""

    name: ClassVar[str]
    always_thinks: ClassVar[bool]  # the reply is reasoning even without an opening tag

    def split(self, text: str, finished: bool = True) -> ReasoningSplit:
        """Split a reply's text. While the reply is still being written (``finished`` False), text that could
        still turn out to be a tag is left out of both parts, so each part only grows as more text comes."""
        start, end_tag = REASONING_TAGS[self.name]
        body = text.lstrip()
        if body.startswith(start):
            body = body[len(start):]
        elif not finished and start.startswith(body):  # it may yet open with the tag
            return ReasoningSplit("", None)
        elif not self.always_thinks:
            return ReasoningSplit(None, text)
        end = body.find(end_tag)
        if end >= 0:
            return ReasoningSplit(body[:end], body[end + len(end_tag):])
        if finished:
            return ReasoningSplit(body, None)
        return ReasoningSplit(body[:len(body) - held_back(body, end_tag)], None)


class DeepSeekR1Format(ReasoningFormat):
    """Reasoning from the reply's start up to the end tag."""

    name = "deepseek_r1"
    always_thinks = True


class Qwen3Format(ReasoningFormat):
    """Reasoning between the start tag (opening the reply) and the end tag."""

    name = "qwen3"
    always_thinks = False


REASONING_FORMATS: dict[str, ReasoningFormat] = {f.name: f for f in (DeepSeekR1Format(), Qwen3Format())}


class ReasoningStream:
    """One streamed choice's reasoning: :meth:`next` takes the reply's cumulative text (all of it that may be
    sent) and returns the reasoning it adds and the answer so far (None while the reasoning goes on)."""

    def __init__(self, format: ReasoningFormat) -> None:
        self.format = format
        self.sent = 0  # characters of reasoning sent

    def next(self, text: str, finished: bool) -> tuple[str, str | None]:
        """``(new reasoning, the answer's text so far or None)`` of ``text``."""
        split = self.format.split(text, finished)
        reasoning = split.reasoning or ""
        new = reasoning[self.sent:]
        self.sent = max(self.sent, len(reasoning))
        return new, split.answer


def end_tag_token(format: ReasoningFormat, tokenizer: object | None) -> int | None:
    """The id of ``format``'s end tag when the tokenizer holds it as one token (Qwen3's and DeepSeek-R1's do),
    else None."""
    if tokenizer is None:
        return None
    tag = REASONING_TAGS[format.name][1]
    token_id = tokenizer.convert_tokens_to_ids(tag)  # type: ignore[attr-defined]
    if not isinstance(token_id, int) or token_id == getattr(tokenizer, "unk_token_id", None):
        return None
    return token_id if tokenizer.decode([token_id]) == tag else None  # type: ignore[attr-defined]


def reasoning_token_count(format: ReasoningFormat, text: str, token_ids: list[int], end_token: int | None,
                          decode: Callable[[list[int]], str] | None = None) -> int | None:
    """How many of a finished reply's ``token_ids`` are its thinking, the end tag included: 0 without thinking,
    all of them when the thinking never ended, else up to the end tag: the one-token tag's place
    (``end_token``), or, when the tag was written in pieces, the shortest run of tokens whose text (``decode``)
    holds it, found by bisection; None when that cannot be told (no ``decode``)."""
    split = format.split(text)
    if split.reasoning is None:
        return 0
    if split.answer is None:
        return len(token_ids)
    if end_token is not None and end_token in token_ids:
        return token_ids.index(end_token) + 1
    if decode is None:
        return None
    tag = REASONING_TAGS[format.name][1]
    low, high = 1, len(token_ids)
    while low < high:
        middle = (low + high) // 2
        if tag in decode(token_ids[:middle]):
            high = middle
        else:
            low = middle + 1
    return low
