"""Reasoning models' thinking, split from their answer (``--reasoning-parser``), as vLLM names the parsers:

- ``deepseek_r1``: the reply is reasoning from its start (an opening ``<think>`` is optional: DeepSeek-R1's
  template ends the prompt with it) up to ``</think>``; the rest is the answer. A reply without ``</think>`` (cut
  short by ``max_tokens``) is all reasoning. Also for QwQ and Qwen3 "Thinking" models, which always think.
- ``qwen3``: the reply is reasoning only when it begins with ``<think>`` (Qwen3 thinks unless the request's
  ``chat_template_kwargs`` say ``enable_thinking: false``); otherwise all of it is the answer.

Chat replies carry the reasoning in ``reasoning`` and, under its older name, ``reasoning_content``; the answer
in ``content`` (tool calls are parsed from the answer only). Streamed, the reasoning arrives as it is written,
then the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True, slots=True)
class ReasoningSplit:
    """A reply's text cut in two: ``reasoning`` (None: the reply has none) and ``answer`` (None: not reached)."""

    reasoning: str | None
    answer: str | None


def _held_back(text: str, tag: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``tag``."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)


class ReasoningFormat:
    """One model family's reasoning markup (see the module docstring)."""

    name: ClassVar[str]
    always_thinks: ClassVar[bool]  # the reply is reasoning even without an opening <think>

    def split(self, text: str, finished: bool = True) -> ReasoningSplit:
        """Split a reply's text. While the reply is still being written (``finished`` False), text that could
        still turn out to be a tag is left out of both parts, so each part only grows as more text comes."""
        body = text.lstrip()
        if body.startswith(THINK_START):
            body = body[len(THINK_START):]
        elif not self.always_thinks:
            if not finished and THINK_START.startswith(body):  # it may yet open with <think>
                return ReasoningSplit("", None)
            return ReasoningSplit(None, text)
        elif not finished and THINK_START.startswith(body):
            return ReasoningSplit("", None)
        end = body.find(THINK_END)
        if end >= 0:
            return ReasoningSplit(body[:end], body[end + len(THINK_END):])
        if finished:
            return ReasoningSplit(body, None)
        return ReasoningSplit(body[:len(body) - _held_back(body, THINK_END)], None)


    def under_structure(self) -> ReasoningFormat:
        """The format of a reply forced into a structure (structured outputs, a forced tool call): the structure
        decides whether it thinks, so it is reasoning only when it opens with ``<think>``."""
        return REASONING_FORMATS["qwen3"]


class DeepSeekR1Format(ReasoningFormat):
    """Reasoning from the reply's start up to ``</think>``."""

    name = "deepseek_r1"
    always_thinks = True


class Qwen3Format(ReasoningFormat):
    """Reasoning between ``<think>`` (beginning the reply) and ``</think>``."""

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
