"""Tool calling's pieces: the tool_choice rules, the forced structures, the parsers, and tools and tool-call
arguments reaching the chat template."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")

from pagedllm.entrypoints.cli_serve import TOOL_CALL_PARSER_NAMES
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import ChatTemplateOptions
from pagedllm.entrypoints.openai.tokenization import AsyncTokenizer
from pagedllm.entrypoints.openai.tool_call_formats import TOOL_CALL_FORMATS
from pagedllm.entrypoints.openai.tool_call_stream import ContentBeforeCalls, ToolCallStream, merge_deltas
from pagedllm.entrypoints.openai.tool_calls import arguments_as_objects, resolve_tool_mode

HERMES, MISTRAL, LLAMA3, PYTHONIC = (TOOL_CALL_FORMATS[name] for name in ("hermes", "mistral", "llama3_json",
                                                                          "pythonic"))

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
TYPED = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "scale": {"type": ["number", "null"]},
    "alerts": {"type": "boolean"}, "where": {"type": "object"}, "hours": {"type": "array"}, "note": {}}}}}
QWEN3_CODER = TOOL_CALL_FORMATS["qwen3_coder"].for_tools([TYPED, TIME])


def xml_call(function: str, /, **parameters: str) -> str:
    """A call as Qwen3-Coder's template writes it."""
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in parameters.items())
    return f"<tool_call>\n<function={function}>\n{body}</function>\n</tool_call>"


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


def named_arguments(calls: list) -> list[tuple[str, object]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def test_the_cli_offers_every_format() -> None:
    assert set(TOOL_CALL_PARSER_NAMES) == set(TOOL_CALL_FORMATS)


def test_parallel_tool_calls_false_allows_one_call() -> None:
    required = resolve_tool_mode([WEATHER, TIME], "required", None, parallel=False)
    assert required.structured_output().json["maxItems"] == 1
    assert "maxItems" not in resolve_tool_mode([WEATHER], "required", None).structured_output().json
    auto = resolve_tool_mode([WEATHER, TIME], "auto", "hermes", parallel=False)
    text = ('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    assert [c.function.name for c in auto.parse(text)[1]] == ["get_weather"]
    stream = ToolCallStream(HERMES, max_calls=auto.max_calls)
    _, deltas = stream.next(text)
    assert {d.index for d in deltas} == {0} and len(stream.calls) == 1  # the second call never opens


def test_hermes_parser() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    content, calls = HERMES.parse(text)
    assert content == "Let me check."
    assert named_arguments(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert HERMES.parse("no calls here") == ("no calls here", [])
    assert HERMES.parse("<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])
    assert HERMES.parse('<tool_call>{"name": "f", "arguments": {}}</tool_call>')[0] is None
    unclosed = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "argu'
    assert named_arguments(HERMES.parse(unclosed)[1]) == [("f", {})]  # the block cut short is left out


def test_mistral_parser() -> None:
    text = ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
            '{"name": "get_time", "arguments": {"zone": "UTC"}}]')
    assert HERMES.parse(text) == (text, [])
    content, calls = MISTRAL.parse(text)
    assert content is None
    assert named_arguments(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})]
    content, calls = MISTRAL.parse('Sure. [TOOL_CALLS]{"name": "f", "arguments": "{\\"a\\": 1}"}')
    assert content == "Sure." and named_arguments(calls) == [("f", {"a": 1})]  # one object; string arguments
    assert MISTRAL.parse("[TOOL_CALLS] [{broken") == ("[TOOL_CALLS] [{broken", [])
    assert MISTRAL.parse('[TOOL_CALLS] [{"arguments": {}}]')[1] == []  # no name: not a call
    assert MISTRAL.parse("[1, 2]") == ("[1, 2]", [])
    assert MISTRAL.parse("[TOOL_CALLS] []") == ("[TOOL_CALLS] []", [])
    assert MISTRAL.keeps_special_tokens and not HERMES.keeps_special_tokens


def test_mistral_v11_parser() -> None:
    """Mistral's v11+ form: ``[TOOL_CALLS]name[ARGS]{...}`` per call, ``[CALL_ID]id`` optional, ``[ARGS]`` too."""
    text = ('Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]'
            '{"zone": "UTC"}[TOOL_CALLS]ping{}')
    content, calls = MISTRAL.parse(text)
    assert content == "Sure."
    assert named_arguments(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"}), ("ping", {})]
    assert MISTRAL.parse("[TOOL_CALLS]get_wea") == ("[TOOL_CALLS]get_wea", [])  # cut short in the name
    assert MISTRAL.parse('[TOOL_CALLS]f[ARGS]{"a": [1,') == ('[TOOL_CALLS]f[ARGS]{"a": [1,', [])


def test_llama3_json_parser() -> None:
    text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
            '{"name": "get_time", "parameters": {}}')
    content, calls = LLAMA3.parse(text)
    assert content is None and named_arguments(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert named_arguments(LLAMA3.parse('  {"name": "f", "arguments": {"x": [1]}}')[1]) == [("f", {"x": [1]})]
    prose = 'The call would be {"name": "f", "parameters": {}}'
    assert LLAMA3.parse(prose) == (prose, [])  # only a reply that begins with the call is one
    assert LLAMA3.parse('{"city": "Paris"}') == ('{"city": "Paris"}', [])  # JSON, but no function named


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
    options = ChatTemplateOptions(add_generation_prompt=False)
    rendered = asyncio.run(AsyncTokenizer(tokenizer, template).render_chat(messages, options, [WEATHER, TIME]))
    assert rendered == "tool=get_weather;tool=get_time;user:weather?;assistant:[get_weather(Oslo)];tool:cold;"


def test_pythonic_parser() -> None:
    text = '[get_weather(city="Paris", days=2), get_time(zone=\'UTC\', now=True, tags=["a", None])]'
    content, calls = PYTHONIC.parse(text)
    assert content is None and named_arguments(calls) == [
        ("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "UTC", "now": True, "tags": ["a", None]})]
    assert named_arguments(PYTHONIC.parse('[f(a="(]", b=\'\\\'\')]')[1]) == [("f", {"a": "(]", "b": "'"})]
    for text in ("[f(x)]", "[f(**k)]", "[f(a=g())]", "[1, 2]", "I would call [f()]", '[f(a="open'):
        assert PYTHONIC.parse(text) == (text, [])  # not literal keywords, not calls, not at the start, cut short
    stream = ContentBeforeCalls(PYTHONIC)
    assert stream.next(" [") == "" and stream.next(" [get_wea") == "" and stream.next(" [get_weather(") == ""
    listing = ContentBeforeCalls(PYTHONIC)
    assert listing.next("[") == "" and listing.next("[1, 2") == "[1, 2"


def test_qwen3_coder_parser() -> None:
    """Parameters typed by the function's schema (a string stays one even when it reads as a number; text that
    is not the type stays text; parameters without a type, and functions without a schema, are strings)."""
    text = "Checking.\n" + xml_call("get_weather", city="007", days="2", scale="1.5", alerts="True",
                                      where='{"lat": 1}', hours="[1, 2]", note="7") + "\n" + xml_call("get_time",
                                                                                                     zone="UTC")
    content, calls = QWEN3_CODER.parse(text)
    assert content == "Checking." and named_arguments(calls) == [
        ("get_weather", {"city": "007", "days": 2, "scale": 1.5, "alerts": True, "where": {"lat": 1},
                         "hours": [1, 2], "note": "7"}), ("get_time", {"zone": "UTC"})]
    odd = xml_call("get_weather", days="two", scale="null", where="{'lat': 2}", hours="[oops", city="a\nb")
    assert named_arguments(QWEN3_CODER.parse(odd)[1]) == [
        ("get_weather", {"days": "two", "scale": "null", "where": {"lat": 2}, "hours": "[oops", "city": "a\nb"})]
    untyped = TOOL_CALL_FORMATS["qwen3_coder"]  # no tools given: every value text
    assert named_arguments(untyped.parse(xml_call("f", n="3"))[1]) == [("f", {"n": "3"})]
    for broken in ("<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n",  # never closed
                   "<tool_call>\n<parameter=a>1</parameter>\n</tool_call>"):  # no function
        assert QWEN3_CODER.parse(broken) == (broken, [])
    assert resolve_tool_mode([TYPED], "auto", "qwen3_coder").format.parameters["get_weather"]["days"] == \
        {"type": "integer"}


def test_auto_streaming_holds_back_what_could_begin_a_call() -> None:
    stream = ContentBeforeCalls(HERMES)
    assert stream.next("Let me") == "Let me"
    assert stream.next("Let me check <tool") == " check "  # "<tool" could open a call: held back
    assert stream.next("Let me check <tool_c") == ""
    assert stream.next('Let me check <tool_call>{"name": ') == ""  # a call began: nothing more as content
    assert stream.sent == len("Let me check ")
    plain = ContentBeforeCalls(HERMES)
    assert plain.next("a < b") == "a < b" and plain.next("a < b <tools>") == " <tools>"
    mistral = ContentBeforeCalls(MISTRAL)
    assert mistral.next("Sure [TOOL") == "Sure " and mistral.next("Sure [TOOL_CALLS] [") == ""
    llama = ContentBeforeCalls(LLAMA3)  # a reply is calls only if it begins with one: held until it tells
    assert llama.next(" ") == "" and llama.next(" <|python") == "" and llama.next(" <|python_tag|>{") == ""
    prose = ContentBeforeCalls(LLAMA3)
    assert prose.next(" I") == " I" and prose.next(' I would call {"name"') == ' would call {"name"'


def _stream_in_pieces(text: str, size: int, format=HERMES) -> tuple[str, dict[int, dict], list[int]]:
    """Feed ``text`` to a ToolCallStream of ``format`` ``size`` characters at a time, then finish it as the
    server does; returns the content sent, each call index's accumulated id/name/arguments, and the step of each
    opening."""
    stream = ToolCallStream(format)
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
    _, parsed = format.parse(text)
    take(merge_deltas(deltas + stream.finish(text, parsed)) if parsed else deltas)
    if not parsed:
        content += text[stream.content.sent:]
    return content, calls, openings


WEATHER_CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
TIME_CALL = '{"arguments": {"zone": "UTC", "name": "not the name"}, "name": "get_time"}'
TWO_CALLS = {  # (format, reply, its content)
    "hermes": (HERMES, f"Let me check.\n<tool_call>\n{WEATHER_CALL}\n</tool_call>\n<tool_call>{TIME_CALL}</tool_call>",
               "Let me check.\n"),
    "mistral": (MISTRAL, f"Let me check.\n[TOOL_CALLS] [{WEATHER_CALL}, {TIME_CALL}]", "Let me check.\n"),
    "mistral_v11": (MISTRAL, 'Let me check.\n[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 2}[TOOL_CALLS]'
                    'get_time[CALL_ID]a1b2c3d4e[ARGS]{"zone": "UTC", "name": "not the name"}', "Let me check.\n"),
    "llama3_json": (LLAMA3, f"<|python_tag|>{WEATHER_CALL.replace('arguments', 'parameters')}; {TIME_CALL}", ""),
    "pythonic": (PYTHONIC, '[get_weather(city="Paris", days=2), get_time(zone=\'UTC\', name="not the name")]', ""),
    "qwen3_coder": (QWEN3_CODER, "Let me check.\n" + xml_call("get_weather", city="Paris", days="2")
                    + "\n" + xml_call("get_time", zone="UTC", name="not the name"), "Let me check.\n"),
}


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
@pytest.mark.parametrize("name", list(TWO_CALLS))
def test_auto_streaming_sends_calls_as_they_are_written(name: str, size: int) -> None:
    """Each call opens once its name is complete (in order, whatever the key order) and its arguments stream
    as written: concatenated, each index's arguments are the call's; text before the first call is content."""
    format, text, expected = TWO_CALLS[name]
    content, calls, openings = _stream_in_pieces(text, size, format)
    assert content == expected
    assert openings == [0, 1] and sorted(calls) == [0, 1]
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": 2}
    assert calls[1]["name"] == "get_time"
    assert json.loads(calls[1]["arguments"]) == {"zone": "UTC", "name": "not the name"}
    assert calls[0]["id"].startswith("chatcmpl-tool-") and calls[0]["id"] != calls[1]["id"]


def test_auto_streaming_arguments_arrive_before_the_call_ends() -> None:
    stream = ToolCallStream(HERMES)
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
    prose = 'I would call {"name": "f", "parameters": {}} but need the city.'
    assert _stream_in_pieces(prose, 3, LLAMA3)[:2] == (prose, {})  # not a call: streamed as content
    cut = '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "argu'
    content, calls, _ = _stream_in_pieces(cut, 5, MISTRAL)
    assert content == cut and [c["name"] for c in calls.values()] == ["f", "g"]
