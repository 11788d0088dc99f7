"""The ``mistral``, ``llama3_json``, ``pythonic`` and ``qwen3_coder`` tool-call formats through
``/v1/chat/completions`` with the official ``openai`` client: the format is a server setting, so each gets an app
of its own, served in-process (``in_process_client``); the tiny random model is steered into each format's reply
with a structured-output choice, streamed and not. (``hermes`` runs on the shared server: ``test_server_tools``.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from pagedllm.core.engine import LLMEngine  # noqa: E402
from tests.e2e.openai_server import in_process_client  # noqa: E402
from tests.e2e.test_server_tools import MESSAGES, TIME, WEATHER, accumulated_calls  # noqa: E402

ARGUMENTS = {"city": "Paris", "days": 2}
REPLIES = {  # the format's reply calling get_weather then get_time
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, '
               '{"name": "get_time", "arguments": {"zone": "UTC"}}]',
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}; '
                   '{"name": "get_time", "parameters": {"zone": "UTC"}}',
    "pythonic": '[get_weather(city="Paris", days=2), get_time(zone="UTC")]',
    "qwen3_coder": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n"
                   "</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n<parameter=zone>\nUTC\n"
                   "</parameter>\n</function>\n</tool_call>",
}
V11 = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 2}[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}'
"""The same calls in the form of Mistral's v11+ tokenizers."""


@pytest.fixture(scope="module", params=list(REPLIES))
def served(request: pytest.FixtureRequest, llama_dir: Path) -> Iterator[tuple[str, openai.OpenAI, LLMEngine]]:
    """``(format, client, engine)``: an app whose chat parses ``tool_choice="auto"`` replies in the format."""
    with in_process_client(llama_dir, tool_call_parser=request.param) as (client, engine):
        yield request.param, client, engine


def ask(client: openai.OpenAI, reply: str, stream: bool) -> tuple[str | None, list[dict], str]:
    """``(content, calls as name/arguments dicts, finish reason)`` of a chat steered into ``reply``."""
    kwargs = dict(model="tiny", messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=200, temperature=0.0,
                  extra_body={"structured_outputs": {"choice": [reply]}})
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls = [{"name": c.function.name, "arguments": c.function.arguments, "id": c.id}
                 for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    deltas = [c.choices[0] for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    content = "".join(d.delta.content or "" for d in deltas) or None
    return content, accumulated_calls(deltas), deltas[-1].finish_reason


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_auto_parses_the_servers_format(served, stream: bool) -> None:
    name, client, engine = served
    for reply in [REPLIES[name], V11] if name == "mistral" else [REPLIES[name]]:
        content, calls, finish = ask(client, reply, stream)
        assert finish == "tool_calls" and content is None
        assert [c["name"] for c in calls] == ["get_weather", "get_time"]
        assert json.loads(calls[0]["arguments"]) == ARGUMENTS and json.loads(calls[1]["arguments"]) == {"zone": "UTC"}
        assert calls[0]["id"].startswith("chatcmpl-tool-") and calls[0]["id"] != calls[1]["id"]
        if stream:  # the arguments came as the model wrote them (a Python or XML call's whole, once it closes)
            assert calls[0]["pieces"] == 1 if name in ("pythonic", "qwen3_coder") else calls[0]["pieces"] > 1
    assert engine.kv_cache_usage() == 0.0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_reply_without_calls_is_content(served, stream: bool) -> None:
    """Plain text stays content, whole (no end-of-sequence text, though ``mistral`` keeps special tokens); so does
    another format's call."""
    _, client, _ = served
    for reply in ("It is sunny in Paris.", '<tool_call>{"name": "get_time"}</tool_call>'):
        assert ask(client, reply, stream) == (reply, [], "stop")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_text_before_the_calls(served, stream: bool) -> None:
    """``mistral`` and ``qwen3_coder`` calls may follow text, which is the reply's content; ``llama3_json`` and
    ``pythonic`` calls must begin the reply, so text first makes all of it content."""
    name, client, _ = served
    reply = "Checking. " + REPLIES[name]
    content, calls, finish = ask(client, reply, stream)
    if name in ("mistral", "qwen3_coder"):
        assert content.strip() == "Checking." and len(calls) == 2 and finish == "tool_calls"
    else:
        assert (content, calls, finish) == (reply, [], "stop")
