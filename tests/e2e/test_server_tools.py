"""Tool calling through ``/v1/chat/completions`` with the official ``openai`` client: a named function and
``required`` force the reply's JSON (so even the tiny random model calls correctly), ``auto`` parses Hermes-style
``<tool_call>`` blocks (here steered into one with a structured-output choice), streamed and not; a conversation
carrying tool calls and tool results is accepted; bad tool requests get 400s naming the field (the server is
shared with the other ``test_server_*`` modules, started with ``--enable-auto-tool-choice --tool-call-parser
hermes``)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tests.e2e.openai_server import MODEL  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def accumulated_calls(deltas: list) -> list[dict]:
    """The tool calls of a streamed reply's choice deltas as an OpenAI client accumulates them: by index, the id,
    type and name of the delta that opens each, the arguments of all of them concatenated; and how many deltas
    carried each call's arguments."""
    calls: dict[int, dict] = {}
    for delta in deltas:
        for call in delta.delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": "", "pieces": 0})
            if call.id is not None:
                assert entry["id"] is None and call.type == "function", "a call opened twice"
                entry.update(id=call.id, name=call.function.name)
            if call.function is not None and call.function.arguments:
                entry["arguments"] += call.function.arguments
                entry["pieces"] += 1
    return [calls[i] for i in sorted(calls)]


def check_weather(arguments: str) -> None:
    value = json.loads(arguments)
    assert set(value) == {"city", "days"} and isinstance(value["city"], str) and 1 <= value["days"] <= 7


def test_named_function_is_called(shared_client) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    reply = shared_client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME],
                                                  tool_choice=choice, max_tokens=64, temperature=1.0, seed=3)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "stop" and not message.content
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    check_weather(call.function.arguments)


def test_required_calls_are_among_the_tools(shared_client) -> None:
    reply = shared_client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME],
                                           tool_choice="required", max_tokens=128, temperature=0.0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name in ("get_weather", "get_time")
        if call.function.name == "get_weather":
            check_weather(call.function.arguments)
        else:
            assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")


HERMES = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_auto_parses_hermes_tool_calls(shared_client, stream: bool) -> None:
    steer = {"structured_outputs": {"choice": [HERMES]}}  # the random model writes the block it is given
    kwargs = dict(model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=200, temperature=0.0,
                  extra_body=steer)
    if not stream:
        choice = shared_client.chat.completions.create(**kwargs).choices[0]
        finish, content, calls = choice.finish_reason, choice.message.content, choice.message.tool_calls
    else:
        chunks = list(shared_client.chat.completions.create(stream=True, **kwargs))
        deltas = [c.choices[0] for c in chunks if c.choices]
        finish = deltas[-1].finish_reason
        content = "".join(d.delta.content or "" for d in deltas) or None
        (streamed,) = accumulated_calls(deltas)
        assert streamed["pieces"] > 1  # the arguments came as the model wrote them, not in one piece
        function = {"name": streamed["name"], "arguments": streamed["arguments"]}
        calls = [openai.types.chat.ChatCompletionMessageToolCall(id=streamed["id"], type="function", function=function)]
    assert finish == "tool_calls" and not content
    (call,) = calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    plain = shared_client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER], max_tokens=8,
                                           temperature=0.0, extra_body={"structured_outputs": {"choice": ["sunny"]}})
    assert plain.choices[0].message.content == "sunny" and plain.choices[0].message.tool_calls is None


def test_auto_streams_text_before_a_call(shared_client) -> None:
    """Under "auto" a streamed reply's text arrives as it comes, up to the call, whose name and arguments follow
    as they are written; a reply without a call streams whole."""
    def streamed(reply: str) -> tuple[list[str], list, str]:
        chunks = list(shared_client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=[WEATHER], max_tokens=200, temperature=0.0, stream=True,
            extra_body={"structured_outputs": {"choice": [reply]}}))
        deltas = [c.choices[0] for c in chunks if c.choices]
        texts = [d.delta.content for d in deltas if d.delta.content]
        return texts, accumulated_calls(deltas), deltas[-1].finish_reason

    texts, calls, finish = streamed("Checking the forecast now. " + HERMES)
    assert "".join(texts).strip() == "Checking the forecast now." and len(texts) > 1 and finish == "tool_calls"
    assert [c["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": 2} and calls[0]["pieces"] > 1
    texts, calls, finish = streamed("It is sunny in Paris today.")
    assert "".join(texts) == "It is sunny in Paris today." and len(texts) > 1 and not calls and finish == "stop"


def test_auto_streams_calls_with_stop_strings(shared_client) -> None:
    """With stop strings the reply still streams piece by piece; the text a stop string cuts never goes out."""
    chunks = list(shared_client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER], max_tokens=200, temperature=0.0, stream=True,
        stop=["All done", "<tool_response>"],
        extra_body={"structured_outputs": {"choice": ["Checking now. " + HERMES + " All done."]}}))
    deltas = [c.choices[0] for c in chunks if c.choices]
    texts = [d.delta.content for d in deltas if d.delta.content]
    (call,) = accumulated_calls(deltas)
    assert "".join(texts).strip() == "Checking now." and len(texts) > 1 and call["pieces"] > 1
    assert json.loads(call["arguments"]) == {"city": "Paris", "days": 2}
    assert deltas[-1].finish_reason == "tool_calls" and deltas[-1].stop_reason == "All done"
    cut = list(shared_client.chat.completions.create(  # a stop inside the call: the reply is text, up to the stop
        model=MODEL, messages=MESSAGES, tools=[WEATHER], max_tokens=200, temperature=0.0, stream=True,
        stop=["Paris"], extra_body={"structured_outputs": {"choice": ["Checking now. " + HERMES]}}))
    deltas = [c.choices[0] for c in cut if c.choices]
    assert "".join(d.delta.content or "" for d in deltas) == "Checking now. " + HERMES[:HERMES.index("Paris")]
    assert deltas[-1].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_parallel_tool_calls_false_keeps_the_first_call(shared_client, stream: bool) -> None:
    two = HERMES + '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    kwargs = dict(model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=200, temperature=0.0,
                  extra_body={"structured_outputs": {"choice": [two]}})
    for parallel, names in ((True, ["get_weather", "get_time"]), (False, ["get_weather"])):
        if stream:
            deltas = [c.choices[0] for c in shared_client.chat.completions.create(
                stream=True, parallel_tool_calls=parallel, **kwargs) if c.choices]
            called = [call["name"] for call in accumulated_calls(deltas)]
        else:
            message = shared_client.chat.completions.create(parallel_tool_calls=parallel, **kwargs).choices[0].message
            called = [call.function.name for call in message.tool_calls]
        assert called == names


def test_streamed_named_call_arrives_whole(shared_client) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    chunks = list(shared_client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME],
                                                 tool_choice=choice, max_tokens=32, stream=True))
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    (call,) = calls
    assert call.index == 0 and call.function.name == "get_time"
    assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")


def test_a_conversation_with_tool_results_is_accepted(shared_client) -> None:
    messages = [*MESSAGES,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    reply = shared_client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                           max_tokens=4)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tool_requests(shared_client, fields: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        shared_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, **fields)
    assert info.value.body["param"] == param, info.value.body


def test_the_clients_stream_helper_assembles_streamed_calls(shared_client) -> None:
    """The ``openai`` client's own accumulator (``chat.completions.stream``) turns the streamed deltas into the
    final message: the content before the call and the call with its whole arguments."""
    steer = {"structured_outputs": {"choice": ["One moment. " + HERMES]}}
    with shared_client.chat.completions.stream(model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=200,
                                               temperature=0.0, extra_body=steer) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content.strip() == "One moment."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
