"""Tool calling's pieces: the tool_choice rules, the forced structures, the parsers, and tools and tool-call
arguments reaching the chat template."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")

from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.tokenization import AsyncTokenizer
from pagedllm.entrypoints.openai.tool_calls import arguments_as_objects, parse_hermes, resolve_tool_mode

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def error_param(call) -> str | None:
    with pytest.raises(OpenAIError) as info:
        call()
    assert info.value.status_code == 400
    return info.value.param


def test_tool_choice_rules() -> None:
    assert resolve_tool_mode(None, None, None).kind == "none"
    assert resolve_tool_mode([WEATHER], "none", None).kind == "none"
    assert resolve_tool_mode([WEATHER], None, "hermes").kind == "auto"  # OpenAI's default with tools
    named = resolve_tool_mode([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, None)
    assert (named.kind, named.name) == ("named", "get_time")
    assert resolve_tool_mode([WEATHER], "required", None).kind == "required"
    assert error_param(lambda: resolve_tool_mode([WEATHER], "auto", None)) == "tool_choice"  # no parser
    assert error_param(lambda: resolve_tool_mode([WEATHER], None, None)) == "tool_choice"
    assert error_param(lambda: resolve_tool_mode(None, "required", None)) == "tool_choice"
    assert error_param(lambda: resolve_tool_mode([WEATHER], {"type": "function", "function": {"name": "x"}},
                                                 None)) == "tool_choice"
    assert error_param(lambda: resolve_tool_mode([WEATHER], "sometimes", "hermes")) == "tool_choice"
    assert error_param(lambda: resolve_tool_mode([{"type": "function"}], "required", None)) == "tools"
    assert error_param(lambda: resolve_tool_mode([{"type": "retrieval", "function": {"name": "a"}}], "required",
                                                 None)) == "tools"


def test_forced_structures_and_their_parses() -> None:
    named = resolve_tool_mode([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, None)
    assert named.structured_output().json == WEATHER["function"]["parameters"]
    content, calls = named.parse('{"city": "Paris"}')
    assert content is None and [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [("get_weather", {"city": "Paris"})]
    required = resolve_tool_mode([WEATHER, TIME], "required", None)
    schema = required.structured_output().json
    assert schema["type"] == "array" and schema["minItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object"}  # no parameters given
    content, calls = required.parse('[{"name": "get_time", "parameters": {}}, {"name": "get_weather", '
                                    '"parameters": {"city": "Oslo"}}]')
    assert content is None and [c.function.name for c in calls] == ["get_time", "get_weather"]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("chatcmpl-tool-") for c in calls)
    assert required.parse('[{"name": "get_ti') == ('[{"name": "get_ti', [])  # cut short: stays text


def test_hermes_parser() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    content, calls = parse_hermes(text)
    assert content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert parse_hermes("no calls here") == ("no calls here", [])
    assert parse_hermes("<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])
    assert parse_hermes('<tool_call>{"name": "f", "arguments": {}}</tool_call>')[0] is None


def test_tools_and_call_arguments_reach_the_template() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"x": 0}, unk_token="x")))
    template = ("{% for t in tools or [] %}tool={{ t['function']['name'] }};{% endfor %}"
                "{% for m in messages %}{{ m['role'] }}:{{ m.get('content') or '' }}"
                "{% for c in m.get('tool_calls') or [] %}[{{ c['function']['name'] }}"
                "({{ c['function']['arguments']['city'] }})]{% endfor %};{% endfor %}")
    messages = arguments_as_objects([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "cold"}])
    rendered = asyncio.run(AsyncTokenizer(tokenizer, template).render_chat(messages, False, None, [WEATHER, TIME]))
    assert rendered == "tool=get_weather;tool=get_time;user:weather?;assistant:[get_weather(Oslo)];tool:cold;"


def test_auto_streaming_holds_back_what_could_begin_a_call() -> None:
    from pagedllm.entrypoints.openai.tool_call_stream import ContentBeforeCalls

    stream = ContentBeforeCalls()
    assert stream.next("Let me") == "Let me"
    assert stream.next("Let me check <tool") == " check "  # "<tool" could open a call: held back
    assert stream.next("Let me check <tool_c") == ""
    assert stream.next('Let me check <tool_call>{"name": ') == ""  # a call began: nothing more as content
    assert stream.sent == len("Let me check ")
    plain = ContentBeforeCalls()
    assert plain.next("a < b") == "a < b" and plain.next("a < b <tools>") == " <tools>"


def _stream_in_pieces(text: str, size: int) -> tuple[str, dict[int, dict], list[int]]:
    """Feed ``text`` to a HermesCallStream ``size`` characters at a time, then finish it as the server does;
    returns the content sent, each call index's accumulated id/name/arguments, and the step of each opening."""
    from pagedllm.entrypoints.openai.tool_call_stream import HermesCallStream, merge_deltas

    stream = HermesCallStream()
    content, calls, openings = "", {}, []

    def take(deltas: list) -> None:
        for delta in deltas:
            call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            if delta.id is not None:
                assert call["id"] is None, "a call opened twice"
                call.update(id=delta.id, name=delta.function.name)
                openings.append(delta.index)
            call["arguments"] += delta.function.arguments or ""

    for end in range(size, len(text), size):
        piece, deltas = stream.next(text[:end])
        content += piece
        take(deltas)
    piece, deltas = stream.next(text)
    content += piece
    _, parsed = parse_hermes(text)
    take(merge_deltas(deltas + stream.finish(text, parsed)) if parsed else deltas)
    if not parsed:
        content += text[stream.content.sent:]
    return content, calls, openings


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_auto_streaming_sends_calls_as_they_are_written(size: int) -> None:
    """Each call opens once its name is complete (in order, whatever the key order) and its arguments stream
    as written: concatenated, each index's arguments are the call's; text before the first call is content."""
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
            '</tool_call>\n<tool_call>{"arguments": {"zone": "UTC", "name": "not the name"}, "name": "get_time"}'
            '</tool_call>')
    content, calls, openings = _stream_in_pieces(text, size)
    assert content == "Let me check.\n"
    assert openings == [0, 1] and sorted(calls) == [0, 1]
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": 2}
    assert calls[1]["name"] == "get_time"
    assert json.loads(calls[1]["arguments"]) == {"zone": "UTC", "name": "not the name"}
    assert calls[0]["id"].startswith("chatcmpl-tool-") and calls[0]["id"] != calls[1]["id"]


def test_auto_streaming_arguments_arrive_before_the_call_ends() -> None:
    from pagedllm.entrypoints.openai.tool_call_stream import HermesCallStream

    stream = HermesCallStream()
    assert stream.next('<tool_call>{"name": "get_wea') == ("", [])  # the name is not complete yet
    _, (opening,) = stream.next('<tool_call>{"name": "get_weather", "arguments": {"ci')
    assert opening.index == 0 and opening.type == "function" and opening.function.name == "get_weather"
    assert opening.function.arguments == '{"ci'
    _, (more,) = stream.next('<tool_call>{"name": "get_weather", "arguments": {"city": "Pa')
    assert more.id is None and more.function.name is None and more.function.arguments == 'ty": "Pa'


def test_auto_streaming_string_arguments_and_broken_calls() -> None:
    """Arguments written as a JSON string are held back and sent whole (decoded, as the reply holds them); a
    reply whose block is not valid JSON ends with its text as content."""
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    content, calls, _ = _stream_in_pieces(text, 2)
    assert content == "" and calls[0]["name"] == "f" and json.loads(calls[0]["arguments"]) == {"a": 1}
    broken = 'Hi <tool_call>{"name": "f", "arguments": {"a": </tool_call>'
    content, calls, _ = _stream_in_pieces(broken, 4)
    assert content == broken  # the held-back text follows the content sent before the block
    assert calls[0]["name"] == "f"  # it had opened: streamed calls cannot be taken back
