"""A reasoning parser (``--reasoning-parser deepseek_r1``) through ``/v1/chat/completions`` with the official
``openai`` client, beside the ``hermes`` tool-call parser: the reply's thinking in ``reasoning`` (and
``reasoning_content``), the answer in ``content``, tool calls parsed from the answer only; streamed, the thinking
arrives first, piece by piece. The tiny random model is steered into each reply with a structured-output
choice: a chat template that closes the thinking in the prompt has the grammar hold from the first token, so the
choice can write the thinking too. With the checkpoint's own template the grammar waits for ``</think>``, which a
logit bias makes the first token: the answer, or a forced tool call, follows the grammar after it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("xgrammar")
openai = pytest.importorskip("openai")

from tests.e2e.openai_server import in_process_client  # noqa: E402
from tests.e2e.test_server_tools import HERMES, MESSAGES, WEATHER, accumulated_calls  # noqa: E402

THOUGHT = "The user wants Paris. I will answer: 2 < 3."
CLOSING_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant:<think></think>{% endif %}")


@pytest.fixture(scope="module")
def think_dir(checkpoint_factory) -> Path:
    return checkpoint_factory("llama", added_tokens=("<think>", "</think>"))


@pytest.fixture(scope="module")
def client(think_dir: Path) -> Iterator[openai.OpenAI]:
    """A server whose chat template closes the thinking in the prompt (the choice steers the whole reply)."""
    with in_process_client(think_dir, {"reasoning_parser": "deepseek_r1"}, tool_call_parser="hermes",
                           chat_template=CLOSING_TEMPLATE) as (client, _):
        yield client


@pytest.fixture(scope="module")
def thinking_client(think_dir: Path) -> Iterator[tuple[openai.OpenAI, int]]:
    """A server with the checkpoint's own template (the reply thinks first), and the id of ``</think>``."""
    with in_process_client(think_dir, {"reasoning_parser": "deepseek_r1"}, tool_call_parser="hermes") as (
            client, engine):
        yield client, engine.tokenizer.convert_tokens_to_ids("</think>")


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
def test_include_reasoning_false_leaves_the_thinking_out(client, stream: bool) -> None:
    reply = ask(client, f"<think>{THOUGHT}</think>It is sunny.", stream, extra_body={
        "structured_outputs": {"choice": [f"<think>{THOUGHT}</think>It is sunny."]}, "include_reasoning": False})
    assert (reply["reasoning"], reply["content"], reply["finish"]) == (None, "It is sunny.", "stop")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_calls_come_from_the_answer(client, stream: bool) -> None:
    """A ``<tool_call>`` written while thinking is thought, not a call; the one in the answer is the call."""
    thought = 'Maybe <tool_call>{"name": "get_weather", "arguments": {}}</tool_call>? No: ask for Paris.'
    reply = ask(client, f"<think>{thought}</think>{HERMES}", stream, tools=[WEATHER])
    assert reply["reasoning"] == thought and not reply["content"]
    assert reply["calls"] == [("get_weather", {"city": "Paris", "days": 2})] and reply["finish"] == "tool_calls"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_replies_without_an_end_of_thinking(client, stream: bool) -> None:
    """Under ``deepseek_r1`` a reply without ``</think>`` is all thinking (R1 always thinks, as vLLM's parser
    reads it), whether it ends or is cut short: no content."""
    plain = ask(client, "It is sunny.", stream)
    assert (plain["reasoning"], plain["content"], plain["finish"]) == ("It is sunny.", None, "stop")
    cut = ask(client, f"<think>{THOUGHT}</think>It is sunny.", stream, max_tokens=14)
    assert cut["finish"] == "length" and cut["content"] is None and cut["reasoning"] and THOUGHT.startswith(
        cut["reasoning"])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_the_structure_applies_after_the_thinking(thinking_client, stream: bool) -> None:
    """``</think>`` first (a logit bias): empty thinking, then the answer the grammar allows."""
    client, end = thinking_client
    reply = ask(client, "It is sunny.", stream, logit_bias={str(end): 100})
    assert (reply["reasoning"] or "", reply["content"], reply["finish"]) == ("", "It is sunny.", "stop")


def test_usage_counts_the_thinking_tokens(client, thinking_client) -> None:
    """``usage.completion_tokens_details.reasoning_tokens``: the thinking's tokens with the one-token ``</think>``,
    all of them when the thinking never ends, in chat (whole and streamed) and in the Responses API."""
    plain_client, end = thinking_client
    closed = plain_client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=64, temperature=0.0, logit_bias={str(end): 100},
        extra_body={"structured_outputs": {"choice": ["It is sunny."]}})
    assert closed.usage.completion_tokens_details.reasoning_tokens == 1  # just </think>
    thinking = client.chat.completions.create(  # deepseek_r1: a reply without </think> is all thinking
        model="tiny", messages=MESSAGES, max_tokens=64, temperature=0.0,
        extra_body={"structured_outputs": {"choice": ["It is sunny."]}})
    assert thinking.usage.completion_tokens_details.reasoning_tokens == thinking.usage.completion_tokens
    mixed = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=64, temperature=0.0,
        extra_body={"structured_outputs": {"choice": [f"<think>{THOUGHT}</think>It is sunny."]}})
    assert 0 < mixed.usage.completion_tokens_details.reasoning_tokens < mixed.usage.completion_tokens
    chunks = list(client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=64, temperature=0.0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"structured_outputs": {"choice": [f"<think>{THOUGHT}</think>It is sunny."]}}))
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == \
        mixed.usage.completion_tokens_details.reasoning_tokens
    response = plain_client.responses.create(model="tiny", input="weather?", max_output_tokens=64, temperature=0.0,
                                             extra_body={"logit_bias": {str(end): 100}})
    assert response.usage.output_tokens_details.reasoning_tokens >= 1


def test_a_forced_call_follows_the_thinking(thinking_client) -> None:
    client, end = thinking_client
    choice = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=[WEATHER], max_tokens=64, temperature=0.0, logit_bias={str(end): 100},
        tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    (call,) = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and set(arguments) == {"city", "days"}
    assert choice.model_dump()["message"]["reasoning"] == ""
