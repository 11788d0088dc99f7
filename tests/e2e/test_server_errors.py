"""Every bad request gets an OpenAI-shaped error (400 naming the field, 401, 404, never a 500 with a
traceback), and the server keeps serving: each case is followed by a good request that succeeds."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from pagedllm.testing.server import ServerProcess  # noqa: E402
from tests.e2e.openai_server import API_KEY, MODEL, start_shared_server  # noqa: E402

MESSAGES = [{"role": "user", "content": "hello"}]
LONG_TEXT = "for i in range(10): print(i)\n" * 80  # far more than the 512 tokens of context
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(llama_dir, pytestconfig: pytest.Config) -> ServerProcess:
    return start_shared_server(llama_dir, pytestconfig)


@pytest.fixture(scope="module")
def http(server: ServerProcess):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    return server.client()


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "def f(x):", "max_tokens": 4, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **fields}


# (id, path, body, expected status, expected param, expected code); param None means "not checked"
CASES: list[tuple[str, str, Any, int, str | None, str | None]] = [
    ("temperature", COMPLETIONS, completion(temperature=-1), 400, "temperature", None),
    ("top_p", COMPLETIONS, completion(top_p=0), 400, "top_p", None),
    ("top_k", COMPLETIONS, completion(top_k=-5), 400, "top_k", None),
    ("min_p", COMPLETIONS, completion(min_p=2), 400, "min_p", None),
    ("n", COMPLETIONS, completion(n=0), 400, "n", None),
    ("max_tokens_zero", COMPLETIONS, completion(max_tokens=0), 400, "max_tokens", None),
    ("max_tokens_type", COMPLETIONS, completion(max_tokens="many"), 400, "max_tokens", None),
    ("min_tokens", COMPLETIONS, completion(min_tokens=10), 400, "min_tokens", None),
    ("presence_penalty", COMPLETIONS, completion(presence_penalty=3), 400, "presence_penalty", None),
    ("frequency_penalty", COMPLETIONS, completion(frequency_penalty=-3), 400, "frequency_penalty", None),
    ("repetition_penalty", COMPLETIONS, completion(repetition_penalty=0), 400, "repetition_penalty", None),
    ("logprobs", COMPLETIONS, completion(logprobs=50), 400, "logprobs", None),
    ("seed", COMPLETIONS, completion(seed=2**70), 400, "seed", None),
    ("stop_type", COMPLETIONS, completion(stop=[1, 2]), 400, "stop", None),
    ("stop_token_ids", COMPLETIONS, completion(stop_token_ids=[10**6]), 400, "stop_token_ids", None),
    ("missing_prompt", COMPLETIONS, {"model": MODEL}, 400, "prompt", None),
    ("empty_prompt", COMPLETIONS, completion(prompt=""), 400, "prompt", None),
    ("empty_prompt_list", COMPLETIONS, completion(prompt=[]), 400, "prompt", None),
    ("token_out_of_vocab", COMPLETIONS, completion(prompt=[1, 2, 10**6]), 400, "prompt", None),
    ("prompt_too_long", COMPLETIONS, completion(prompt=LONG_TEXT), 400, "prompt", "context_length_exceeded"),
    ("max_tokens_too_long", COMPLETIONS, completion(max_tokens=10_000), 400, "prompt", "context_length_exceeded"),
    ("echo_logprobs_range", COMPLETIONS, completion(echo=True, logprobs=50), 400, "logprobs", None),
    ("prompt_logprobs_range", COMPLETIONS, completion(prompt_logprobs=50), 400, "prompt_logprobs", None),
    ("prompt_logprobs_stream", CHAT, chat(prompt_logprobs=1, stream=True), 400, "prompt_logprobs", None),
    ("prompt_logprobs_echo", COMPLETIONS, completion(echo=True, logprobs=1, prompt_logprobs=2), 400,
     "prompt_logprobs", None),
    ("suffix", COMPLETIONS, completion(suffix="x"), 400, "suffix", None),
    ("best_of", COMPLETIONS, completion(best_of=3), 400, "best_of", None),
    ("logit_bias_key", COMPLETIONS, completion(logit_bias={"five": 10}), 400, "logit_bias", None),
    ("logit_bias_value", COMPLETIONS, completion(logit_bias={"5": 101}), 400, "logit_bias", None),
    ("logit_bias_vocab", COMPLETIONS, completion(logit_bias={str(10**6): 1}), 400, "logit_bias", None),
    ("allowed_token_ids_empty", COMPLETIONS, completion(allowed_token_ids=[]), 400, "allowed_token_ids", None),
    ("allowed_token_ids_vocab", CHAT, chat(allowed_token_ids=[10**6]), 400, "allowed_token_ids", None),
    ("stream_options", COMPLETIONS, completion(stream_options={"include_usage": True}), 400, "stream_options", None),
    ("unknown_model", COMPLETIONS, completion(model="gpt-4"), 404, "model", "model_not_found"),
    ("stream_bad_param", COMPLETIONS, completion(stream=True, temperature=-2), 400, "temperature", None),
    ("chat_missing_messages", CHAT, {"model": MODEL}, 400, "messages", None),
    ("chat_empty_messages", CHAT, chat(messages=[]), 400, "messages", None),
    ("chat_message_type", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages", None),
    ("chat_image_part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), 400, "messages", None),
    ("chat_too_long", CHAT, chat(messages=[{"role": "user", "content": LONG_TEXT}]), 400, "messages",
     "context_length_exceeded"),
    ("chat_max_completion_tokens", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens", None),
    ("chat_top_logprobs_alone", CHAT, chat(top_logprobs=2), 400, "top_logprobs", None),
    ("chat_top_logprobs_range", CHAT, chat(logprobs=True, top_logprobs=99), 400, "top_logprobs", None),
    ("chat_json_schema_missing", CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     400, "response_format", None),
    ("chat_json_schema_invalid", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": 5}}}), 400, "response_format", None),
    ("truncate_prompt_tokens", COMPLETIONS, completion(truncate_prompt_tokens=0), 400, "truncate_prompt_tokens",
     None),
    ("two_structures", COMPLETIONS, completion(guided_regex="a+", guided_choice=["a"]), 400, "guided_choice", None),
    ("guided_regex_invalid", COMPLETIONS, completion(guided_regex="[0-9"), 400, "guided_regex", None),
    ("structured_outputs_unknown", COMPLETIONS, completion(structured_outputs={"yaml": "x"}), 400,
     "structured_outputs", None),
    ("chat_bad_format", CHAT, chat(response_format={"type": "yaml"}), 400, "response_format", None),
    ("chat_tools", CHAT, chat(tools=[{"type": "function", "function": {"parameters": {}}}]), 400, "tools", None),
    ("chat_unknown_model", CHAT, chat(model="nope"), 404, "model", "model_not_found"),
    ("priority_on_fcfs_server", COMPLETIONS, completion(priority=-1), 400, "priority", None),
    ("chat_priority_on_fcfs_server", CHAT, chat(priority=3), 400, "priority", None),
    ("tokenize_neither", "/tokenize", {"model": MODEL}, 400, "prompt", None),
    ("detokenize_out_of_vocab", "/detokenize", {"model": MODEL, "tokens": [-1]}, 400, "tokens", None),
]


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None,
                        code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def assert_still_serving(client) -> None:
    result = client.completions.create(model=MODEL, prompt="x = ", max_tokens=2)
    assert result.usage.completion_tokens >= 1


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_request(http: httpx.Client, client, path: str, body: Any, status: int, param: str | None,
                     code: str | None) -> None:
    error = assert_openai_error(http.post(path, json=body), status, param, code)
    if param is not None and status == 400:
        assert param in error["message"] or error["code"] == "context_length_exceeded"
    assert_still_serving(client)


@pytest.mark.parametrize("raw", ['{"model": "tiny", "prompt": ', "not json", "[1, 2]", ""])
def test_malformed_body(http: httpx.Client, client, raw: str) -> None:
    for path in (COMPLETIONS, CHAT):
        response = http.post(path, content=raw, headers={"content-type": "application/json"})
        assert_openai_error(response, 400)
    assert_still_serving(client)


def test_api_key(server: ServerProcess, client) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", COMPLETIONS), ("POST", CHAT)):
            response = httpx.request(method, server.url + path, headers=headers, json=completion())
            assert_openai_error(response, 401, code="invalid_api_key")
    # a malformed body without the key is refused for the key, before the body is read
    response = httpx.post(server.url + COMPLETIONS, content="{", headers={"content-type": "application/json"})
    assert_openai_error(response, 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    for path in ("/health", "/version", "/metrics"):  # outside /v1: open
        assert httpx.get(server.url + path).status_code == 200
    assert_still_serving(client)


def test_unknown_route_and_method(http: httpx.Client, client) -> None:
    assert_openai_error(http.get("/v1/nothing-here"), 404, code="not_found")
    assert_openai_error(http.get(COMPLETIONS), 405)
    assert_still_serving(client)


def test_openai_client_raises_typed_errors(client) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="a", max_tokens=2, temperature=-1)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG_TEXT}])
    assert too_long.value.body["code"] == "context_length_exceeded"
    assert_still_serving(client)


def test_unknown_fields_are_ignored(http: httpx.Client) -> None:
    response = http.post(COMPLETIONS, json=completion(not_a_real_field=1, another={"x": 2}))
    assert response.status_code == 200, response.text
    assert json.loads(response.text)["usage"]["completion_tokens"] >= 1
