"""``POST /v1/responses`` (OpenAI's Responses API) with the official ``openai`` client: text and message inputs
run as the same chat request would (the same greedy text), streamed as OpenAI's event sequence (and assembled
by the client's own ``responses.stream`` helper), forced function calls, JSON output formats, a conversation
carrying a function call and its output, and 400s naming the Responses fields (the shared server)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from openai.types.responses import ResponseStreamEvent  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

from tests.e2e.openai_server import API_KEY, MODEL  # noqa: E402

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,8}$"}},
                          "required": ["city"], "additionalProperties": False}}


SMALL_JSON = {"format": {"type": "json_schema", "name": "n", "schema": {
    "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
    "additionalProperties": False}}}


def chat_text(client, messages: list[dict], max_tokens: int) -> str:
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0.0)
    return reply.choices[0].message.content


def test_text_input_runs_as_the_same_chat(shared_client) -> None:
    response = shared_client.responses.create(model=MODEL, input="def main():", max_output_tokens=8, temperature=0.0)
    assert response.object == "response" and response.id.startswith("resp")
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert response.output_text == chat_text(shared_client, [{"role": "user", "content": "def main():"}], 8)
    assert response.usage.output_tokens == 8 and response.usage.total_tokens == response.usage.input_tokens + 8


def test_instructions_and_message_items(shared_client) -> None:
    items = [{"role": "developer", "content": "Answer briefly."},
             {"role": "user", "content": [{"type": "input_text", "text": "import "}, {"type": "input_text",
                                                                                      "text": "os"}]}]
    response = shared_client.responses.create(model=MODEL, instructions="You write Python.", input=items,
                                              max_output_tokens=6, temperature=0.0)
    expected = chat_text(shared_client, [{"role": "system", "content": "You write Python."},
                                         {"role": "system", "content": "Answer briefly."},
                                         {"role": "user", "content": "import os"}], 6)
    assert response.output_text == expected and response.instructions == "You write Python."


def test_streamed_events_and_the_clients_helper(shared_client) -> None:
    whole = shared_client.responses.create(model=MODEL, input="class A:", max_output_tokens=10, temperature=0.0)
    events = list(shared_client.responses.create(model=MODEL, input="class A:", max_output_tokens=10,
                                                 temperature=0.0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    strict = TypeAdapter(ResponseStreamEvent)  # every field the official types require (the client only builds them)
    for e in events:
        strict.validate_python(e.model_dump())
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == whole.output_text
    for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.done",
                 "response.content_part.done", "response.output_item.done"):
        assert kinds.count(kind) == 1, kind
    assert events[-1].response.output_text == whole.output_text
    # the client's helper assembles a completed response (as with OpenAI, it wants response.completed): a forced
    # call, whose compact JSON completes
    kwargs = dict(model=MODEL, input="Weather in Paris?", tools=[WEATHER],
                  tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40, temperature=0.0)
    with shared_client.responses.stream(**kwargs) as stream:
        final = stream.get_final_response()
    completed = shared_client.responses.create(**kwargs)
    assert final.status == completed.status == "completed"
    assert final.output[0].arguments == completed.output[0].arguments and final.output[0].name == "get_weather"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_forced_function_call(shared_client, stream: bool) -> None:
    kwargs = dict(model=MODEL, input="Weather in Paris?", tools=[WEATHER],
                  tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40, temperature=0.0)
    if stream:
        events = list(shared_client.responses.create(stream=True, **kwargs))
        done = [e.item for e in events if e.type == "response.output_item.done"]
        arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert events[-1].type == "response.completed" and arguments == done[-1].arguments
        output = events[-1].response.output
    else:
        output = shared_client.responses.create(**kwargs).output
    (call,) = output
    assert call.type == "function_call" and call.name == "get_weather" and call.id.startswith("fc_")
    assert call.call_id.startswith("chatcmpl-tool-") and set(json.loads(call.arguments)) == {"city"}


def test_json_schema_format_and_function_results_in_the_input(shared_client) -> None:
    """A conversation carrying a function call and its output is accepted; ``text.format`` constrains the text."""
    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
    response = shared_client.responses.create(model=MODEL, input=items, tools=[WEATHER], max_output_tokens=40,
                                              temperature=0.0, text=SMALL_JSON)
    # the tiny random model pads JSON with whitespace until the limit: the format shows in how the text begins
    assert response.output_text.lstrip().startswith("{") and response.usage.output_tokens <= 40


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 100000}, "input"),  # as chat names its messages: the context is exceeded
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text"),
])
def test_bad_responses_requests(shared_server, shared_client, body: dict, param: str) -> None:
    reply = httpx.post(shared_server.url + "/v1/responses", json={"model": MODEL, **body},
                       headers={"Authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param, error
    assert shared_client.responses.create(model=MODEL, input="x", max_output_tokens=2).usage.output_tokens >= 1
