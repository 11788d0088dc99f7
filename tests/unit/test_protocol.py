"""The server's protocol layer without a model: request models, error translation, streamed deltas,
logprob conversion, the API-key and shutdown middlewares."""

from __future__ import annotations

import asyncio
import math

import pytest

pytest.importorskip("fastapi")

from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from pagedllm.core.outputs import CompletionOutput, Logprob
from pagedllm.core.sampling_params import SamplingParams
from pagedllm.entrypoints.async_engine import EngineDeadError
from pagedllm.entrypoints.openai.auth import APIKeyMiddleware
from pagedllm.entrypoints.openai.errors import OpenAIError, from_value_error, install_error_handlers
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    CompletionStreamResponse,
)
from pagedllm.entrypoints.openai.serving_chat import chat_logprobs
from pagedllm.entrypoints.openai.serving_completion import completion_logprobs
from pagedllm.entrypoints.openai.shutdown import ShutdownMiddleware
from pagedllm.entrypoints.openai.streaming import DeltaTracker
from pagedllm.entrypoints.openai.tokenization import load_chat_template, messages_for_template


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_request_accepts_every_prompt_form(prompt: object) -> None:
    request = CompletionRequest(model="m", prompt=prompt)
    assert request.prompt == prompt
    assert request.max_tokens == 16 and request.n == 1 and request.temperature is None


def test_completion_request_keeps_extras_and_reports_unknown_fields() -> None:
    request = CompletionRequest.model_validate({"prompt": "x", "top_k": 5, "min_p": 0.1, "ignore_eos": True,
                                                "min_tokens": 2, "repetition_penalty": 1.1, "mystery": 1})
    assert (request.top_k, request.min_p, request.ignore_eos, request.min_tokens) == (5, 0.1, True, 2)
    assert request.unknown_fields() == ["mystery"]


def test_request_type_errors_name_the_field() -> None:
    with pytest.raises(ValidationError) as error:
        CompletionRequest.model_validate({"prompt": "x", "max_tokens": "lots"})
    assert error.value.errors()[0]["loc"][0] == "max_tokens"
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                              "response_format": {"type": "yaml"}})


def test_chat_messages_for_template() -> None:
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]})
    assert messages_for_template(request.messages) == [{"role": "system", "content": "be brief"},
                                                       {"role": "user", "content": "a\nb"}]
    image = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    with pytest.raises(ValueError, match=r"messages\[0\]\.content: only text parts"):
        messages_for_template(image.messages)
    with pytest.raises(ValueError, match="messages is empty"):
        messages_for_template([])


def test_load_chat_template(tmp_path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages }}")
    assert load_chat_template(str(path)) == "{{ messages }}"
    assert load_chat_template("{% for m in messages %}{% endfor %}").startswith("{%")
    assert load_chat_template(None) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_stream_chunk_serializes_like_openai() -> None:
    chunk = CompletionStreamResponse(id="cmpl-1", created=1, model="m", choices=[])
    assert chunk.model_dump() == {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                                  "choices": [], "usage": None, "system_fingerprint": None}


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("kwargs", "names", "param"), [
    ({"temperature": -1.0}, {}, "temperature"),
    ({"max_tokens": 0}, {"max_tokens": "max_completion_tokens"}, "max_completion_tokens"),
    ({"logprobs": -1}, {"logprobs": "top_logprobs"}, "top_logprobs"),
    ({"min_tokens": 5, "max_tokens": 2}, {}, "min_tokens"),
])
def test_sampling_params_errors_name_the_request_field(kwargs: dict, names: dict, param: str) -> None:
    with pytest.raises(ValueError) as raised:
        SamplingParams(**kwargs)
    error = from_value_error(raised.value, names)
    assert error.status_code == 400 and error.param == param
    assert error.message.startswith(param + " ") and "SamplingParams" not in error.message


def test_other_value_errors_name_the_default_param() -> None:
    error = from_value_error(ValueError("the prompt is empty"), {}, "prompt")
    assert (error.param, error.message) == ("prompt", "the prompt is empty")


def error_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/items")
    async def create(request: CompletionRequest) -> dict:
        return {"ok": True}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret detail")

    @app.get("/dead")
    async def dead() -> dict:
        raise EngineDeadError("the engine is not running: test")

    @app.get("/teapot")
    async def teapot() -> dict:
        raise OpenAIError("no", 400, param="x", code="c")

    return app


def assert_shape(response, status: int) -> dict:
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


def test_error_handlers_answer_in_openai_shape() -> None:
    client = TestClient(error_app(), raise_server_exceptions=False)
    malformed = assert_shape(client.post("/v1/items", content="{", headers={"content-type": "application/json"}),
                             400)
    assert malformed["code"] == "invalid_json"
    assert assert_shape(client.post("/v1/items", json={"prompt": "x", "n": "two"}), 400)["param"] == "n"
    assert assert_shape(client.post("/v1/items", json={}), 400)["param"] == "prompt"
    assert "JSON object" in assert_shape(client.post("/v1/items", json=[1]), 400)["message"]
    assert assert_shape(client.get("/nowhere"), 404)["code"] == "not_found"
    assert_shape(client.get("/v1/items"), 405)
    internal = assert_shape(client.get("/boom"), 500)
    assert internal["type"] == "server_error" and "RuntimeError" in internal["message"]
    assert assert_shape(client.get("/dead"), 503)["code"] == "engine_unavailable"
    assert assert_shape(client.get("/teapot"), 400) == {"message": "no", "type": "invalid_request_error",
                                                        "param": "x", "code": "c"}


def test_api_key_middleware_guards_v1_only() -> None:
    app = error_app()
    app.add_middleware(APIKeyMiddleware, api_key="k")
    client = TestClient(app, raise_server_exceptions=False)
    assert assert_shape(client.post("/v1/items", json={"prompt": "x"}), 401)["code"] == "invalid_api_key"
    assert_shape(client.post("/v1/items", json={"prompt": "x"}, headers={"Authorization": "Bearer no"}), 401)
    assert client.post("/v1/items", json={"prompt": "x"}, headers={"Authorization": "Bearer k"}).json() == {
        "ok": True}
    assert_shape(client.get("/nowhere"), 404)  # outside /v1: no key needed


# ---------------------------------------------------------------------------------------------- shutdown
def run_cancelled_app(started: bool, content_type: bytes = b"text/event-stream") -> list[dict]:
    async def app(scope, receive, send) -> None:
        if started:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
            await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        raise asyncio.CancelledError

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    asyncio.run(ShutdownMiddleware(app)({"type": "http", "method": "POST", "path": "/v1/x", "headers": []},
                                        receive, send))
    return sent


def test_shutdown_middleware_answers_cancelled_requests() -> None:
    before = run_cancelled_app(started=False)
    assert before[0]["status"] == 503 and b"shutting down" in before[1]["body"]
    mid_stream = run_cancelled_app(started=True)
    assert b'"code":"server_shutting_down"' in mid_stream[2]["body"]
    assert mid_stream[2]["body"].endswith(b"data: [DONE]\n\n")
    assert mid_stream[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    plain = run_cancelled_app(started=True, content_type=b"application/json")
    assert plain[-1] == {"type": "http.response.body", "body": b"", "more_body": False} and len(plain) == 3


# ---------------------------------------------------------------------------------------------- deltas
def output(text: str, num_tokens: int, finish: str | None = None) -> CompletionOutput:
    return CompletionOutput(0, text, list(range(num_tokens)), None, None, finish)


def test_delta_tracker_holds_back_what_a_stop_string_may_remove() -> None:
    tracker = DeltaTracker.for_stops(["STOP"])  # holds back 3 characters
    assert tracker.next(output("ab", 1)).text == ""
    assert tracker.next(output("abcdef", 2)).text == "abc"
    assert tracker.next(output("abcdefST", 3)).text == "de"  # "fST" may be the start of "STOP"
    assert tracker.next(output("abcdefST", 3)) is None  # nothing new
    final = tracker.next(output("abcdef", 4, "stop"))  # the engine cut "STOP" off
    assert final.text == "f" and final.finish_reason == "stop" and final.token_ids == [3]
    assert tracker.next(output("abcdef", 4, "stop")) is None


def test_delta_tracker_without_stops_sends_everything() -> None:
    tracker = DeltaTracker.for_stops(None)
    pieces = [tracker.next(output(text, n)) for n, text in enumerate(["a", "ab", "abc"], start=1)]
    assert [p.text for p in pieces] == ["a", "b", "c"]
    assert [p.token_ids for p in pieces] == [[0], [1], [2]]


# ---------------------------------------------------------------------------------------------- logprobs
def sample_logprobs() -> list[dict[int, Logprob]]:
    return [
        {5: Logprob(-0.1, 1, "a"), 6: Logprob(-2.0, 2, "b"), 7: Logprob(-3.0, 3, "\ufffd")},
        {8: Logprob(-0.5, 1, "\ufffd"), 9: Logprob(-1.0, 2, "\ufffd"), 4: Logprob(-math.inf, 500, "z")},
    ]


def test_completion_logprobs() -> None:
    result = completion_logprobs([5, 4], sample_logprobs(), text_offset=10)
    assert result.tokens == ["a", "z"]
    assert result.token_logprobs == [-0.1, -9999.0]
    assert result.text_offset == [10, 11]
    assert result.top_logprobs[0] == {"a": -0.1, "b": -2.0, "\ufffd": -3.0}
    assert result.top_logprobs[1] == {"\ufffd": -0.5, "z": -9999.0}  # a shared text keeps the likeliest


def test_chat_logprobs() -> None:
    result = chat_logprobs([5, 4], sample_logprobs(), num_top=2)
    first, second = result.content
    assert (first.token, first.logprob, first.bytes) == ("a", -0.1, [97])
    assert [(t.token, t.logprob) for t in first.top_logprobs] == [("a", -0.1), ("b", -2.0)]
    assert second.logprob == -9999.0 and [t.logprob for t in second.top_logprobs] == [-0.5, -1.0]
    assert chat_logprobs([5], sample_logprobs()[:1], num_top=0).content[0].top_logprobs == []
