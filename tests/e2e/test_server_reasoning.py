"""A reasoning parser (``--reasoning-parser deepseek_r1``) through ``/v1/chat/completions`` with the official
``openai`` client, beside the ``hermes`` tool-call parser: the reply's thinking in ``reasoning`` (and
``reasoning_content``), the answer in ``content``, tool calls parsed from the answer only; streamed, the thinking
arrives first, piece by piece. The tiny random model is steered into each reply with a structured-output choice,
which holds the reply to the rule for structured replies: it thinks only when it opens with ``<think>``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tests.e2e.openai_server import in_process_client  # noqa: E402
from tests.e2e.test_server_tools import HERMES, MESSAGES, WEATHER, accumulated_calls  # noqa: E402

THOUGHT = "The user wants Paris. I will answer: 2 < 3."


@pytest.fixture(scope="module")
def client(llama_dir: Path) -> Iterator[openai.OpenAI]:
    with in_process_client(llama_dir, reasoning_parser="deepseek_r1", tool_call_parser="hermes") as (client, _):
        yield client


def ask(client: openai.OpenAI, reply: str, stream: bool, **extra: object) -> dict:
    """The reply steered into ``reply``: its reasoning (both names), content, tool calls, finish reason, and
    (streamed) the order in which reasoning and content pieces came."""
    kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 200, "temperature": 0.0,
              "extra_body": {"structured_outputs": {"choice": [reply]}}, **extra}
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        message = choice.model_dump()["message"]
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"] or []]
        return {"reasoning": message["reasoning"], "reasoning_content": message["reasoning_content"],
                "content": message["content"], "calls": calls, "finish": choice.finish_reason}
    deltas = [c.choices[0] for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    pieces = [(kind, getattr(d.delta, kind)) for d in deltas for kind in ("reasoning", "content")
              if getattr(d.delta, kind, None)]
    assert all(getattr(d.delta, "reasoning_content", None) == getattr(d.delta, "reasoning", None) for d in deltas)
    reasoning = "".join(text for kind, text in pieces if kind == "reasoning") or None
    calls = [(c["name"], json.loads(c["arguments"])) for c in accumulated_calls(deltas)]
    return {"reasoning": reasoning, "reasoning_content": reasoning,
            "content": "".join(text for kind, text in pieces if kind == "content") or None, "calls": calls,
            "finish": deltas[-1].finish_reason, "order": [kind for kind, _ in pieces]}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_thinking_is_split_from_the_answer(client, stream: bool) -> None:
    reply = ask(client, f"<think>{THOUGHT}</think>It is sunny.", stream)
    assert reply["reasoning"] == reply["reasoning_content"] == THOUGHT
    assert reply["content"] == "It is sunny." and reply["finish"] == "stop" and not reply["calls"]
    if stream:  # the thinking came as it was written, all of it before the answer
        order = reply["order"]
        assert order.count("reasoning") > 1 and order.index("content") > len(order) - order[::-1].index("reasoning") - 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_calls_come_from_the_answer(client, stream: bool) -> None:
    """A ``<tool_call>`` written while thinking is thought, not a call; the one in the answer is the call."""
    thought = 'Maybe <tool_call>{"name": "get_weather", "arguments": {}}</tool_call>? No: ask for Paris.'
    reply = ask(client, f"<think>{thought}</think>{HERMES}", stream, tools=[WEATHER])
    assert reply["reasoning"] == thought and not reply["content"]
    assert reply["calls"] == [("get_weather", {"city": "Paris", "days": 2})] and reply["finish"] == "tool_calls"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_replies_without_thinking_and_cut_thinking(client, stream: bool) -> None:
    """A structured reply that does not open with ``<think>`` is all answer; one cut short while thinking is all
    reasoning, with no content."""
    plain = ask(client, "It is sunny.", stream)
    assert (plain["reasoning"], plain["content"], plain["finish"]) == (None, "It is sunny.", "stop")
    cut = ask(client, f"<think>{THOUGHT}</think>It is sunny.", stream, max_tokens=14)
    assert cut["finish"] == "length" and cut["content"] is None and cut["reasoning"] and THOUGHT.startswith(
        cut["reasoning"])
