"""The Responses API's reasoning items (``--reasoning-parser``): a response built from scripted engine outputs
holds a reasoning item before its message; streamed, the thinking arrives as ``response.reasoning_text.delta``
events at output index 0 and the answer at index 1, every event valid under the official ``openai`` types."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from openai.types.responses import Response, ResponseStreamEvent  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

from pagedllm.core.outputs import CompletionOutput, RequestOutput  # noqa: E402
from pagedllm.entrypoints.openai.protocol_responses import ResponsesRequest  # noqa: E402
from pagedllm.entrypoints.openai.reasoning import REASONING_FORMATS  # noqa: E402
from pagedllm.entrypoints.openai.serving_chat import StartedChat  # noqa: E402
from pagedllm.entrypoints.openai.serving_responses import OpenAIServingResponses  # noqa: E402
from pagedllm.entrypoints.openai.tool_calls import ToolMode  # noqa: E402

STEPS = ["<think>Hm", "<think>Hmm, 2 < 3.</thi", "<think>Hmm, 2 < 3.</think>It is",
         "<think>Hmm, 2 < 3.</think>It is sunny."]
NO_TOOLS = ToolMode("none")
EVENTS = TypeAdapter(ResponseStreamEvent)


def output_of(text: str, finish: str | None) -> RequestOutput:
    completion = CompletionOutput(0, text, list(range(len(text))), None, None, finish_reason=finish)
    return RequestOutput("resp-1", None, [1, 2, 3], [completion], finished=finish is not None)


def started(steps: list[str], finish: str, tools: ToolMode) -> StartedChat:
    async def stream():
        for i, text in enumerate(steps):
            yield [output_of(text, finish if i == len(steps) - 1 else None)]

    return StartedChat(stream(), "resp-1", "tiny", tools, None, None, REASONING_FORMATS["deepseek_r1"])


def events(steps: list[str], finish: str = "stop", tools: ToolMode = NO_TOOLS) -> list[dict]:
    """The payloads of the streamed response to these cumulative texts, each checked against openai's types."""
    async def run() -> list[str]:
        return [line async for line in OpenAIServingResponses(None)._events(  # type: ignore[arg-type]
            ResponsesRequest(input="x", stream=True), started(steps, finish, tools))]

    payloads = [json.loads(line.split("data: ", 1)[1]) for line in asyncio.run(run())]
    for payload in payloads:
        EVENTS.validate_python(payload)
    return payloads


def test_the_response_holds_a_reasoning_item_first() -> None:
    response = OpenAIServingResponses(None)._response(  # type: ignore[arg-type]
        ResponsesRequest(input="x"), started([], "stop", NO_TOOLS), output_of(STEPS[-1], "stop"))
    body = Response.model_validate(response.model_dump(mode="json"))
    reasoning, message = body.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "Hmm, 2 < 3."
    assert message.type == "message" and message.content[0].text == "It is sunny." and body.status == "completed"
    cut = OpenAIServingResponses(None)._response(  # type: ignore[arg-type]
        ResponsesRequest(input="x"), started([], "length", NO_TOOLS), output_of("<think>Hmm, 2", "length"))
    (item,) = cut.output  # cut while thinking: no message
    assert item.type == "reasoning" and item.status == "incomplete" and cut.status == "incomplete"


def test_streamed_thinking_then_the_answer() -> None:
    payloads = events(STEPS)
    kinds = [p["type"] for p in payloads]
    added = [(p["output_index"], p["item"]["type"]) for p in payloads if p["type"] == "response.output_item.added"]
    assert added == [(0, "reasoning"), (1, "message")]
    thought = [p for p in payloads if p["type"] == "response.reasoning_text.delta"]
    text = [p for p in payloads if p["type"] == "response.output_text.delta"]
    assert len(thought) > 1 and "".join(p["delta"] for p in thought) == "Hmm, 2 < 3."
    assert {p["output_index"] for p in thought} == {0} and {p["output_index"] for p in text} == {1}
    assert "".join(p["delta"] for p in text) == "It is sunny."
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.done")
    assert [p["output_index"] for p in payloads if p["type"] == "response.output_item.done"] == [0, 1]
    final = Response.model_validate(payloads[-1]["response"])
    assert [item.type for item in final.output] == ["reasoning", "message"] and final.status == "completed"
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))


def test_streamed_thinking_then_a_call() -> None:
    call = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    tools = ToolMode("auto", parser="hermes", tools=({"type": "function", "function": {"name": "f"}},))
    payloads = events(["<think>Use f", "<think>Use f.</think>", f"<think>Use f.</think>{call}"], tools=tools)
    final = Response.model_validate(payloads[-1]["response"])
    assert [item.type for item in final.output] == ["reasoning", "function_call"]
    assert final.output[1].name == "f" and json.loads(final.output[1].arguments) == {"a": 1}
    added = [(p["output_index"], p["item"]["type"]) for p in payloads if p["type"] == "response.output_item.added"]
    assert added == [(0, "reasoning"), (1, "function_call")]
