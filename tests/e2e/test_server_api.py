"""``pagedllm serve`` end to end through the official ``openai`` client: completions and chat, streamed and
not, n > 1, logprobs, stop strings, seeds, extras; greedy output equal to the offline ``LLM``; tokenizer
endpoints, metrics and the OpenAPI schema (the server is shared with the other ``test_server_*`` modules).
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from pagedllm import LLM, SamplingParams, __version__  # noqa: E402
from pagedllm.testing.server import ServerProcess  # noqa: E402
from tests.e2e.openai_server import KV_CACHE_BYTES, MAX_MODEL_LEN, MODEL, start_shared_server  # noqa: E402

PROMPTS = ["def main():\n", "The quick brown fox", "import os\nimport sys\n"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a loop."}]


@pytest.fixture(scope="module")
def checkpoint(llama_dir) -> str:
    return str(llama_dir)


@pytest.fixture(scope="module")
def server(llama_dir, pytestconfig: pytest.Config) -> ServerProcess:
    return start_shared_server(llama_dir, pytestconfig)


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    return server.client()


@pytest.fixture(scope="module")
def offline(checkpoint: str) -> LLM:
    return LLM(checkpoint, device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN,
               kv_cache_memory_bytes=KV_CACHE_BYTES)


def greedy(max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


# ---------------------------------------------------------------------------------------------- basics
def test_models_health_version(server: ServerProcess, client) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == MAX_MODEL_LEN
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json() == {"version": __version__}


def test_completion_greedy_equals_offline(client, offline: LLM) -> None:
    expected = offline.generate(PROMPTS, greedy(), use_tqdm=False)
    for prompt, want in zip(PROMPTS, expected, strict=True):
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0.0)
        assert got.choices[0].text == want.outputs[0].text
        assert got.choices[0].finish_reason == want.outputs[0].finish_reason
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    batch = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=24, temperature=0.0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [o.outputs[0].text for o in expected]
    ids = client.completions.create(model=MODEL, prompt=expected[1].prompt_token_ids, max_tokens=24, temperature=0)
    assert ids.choices[0].text == expected[1].outputs[0].text


def test_logit_bias_allowed_token_ids_and_bad_words_equal_offline(client, offline: LLM) -> None:
    bias, allowed = {101: 100.0, 7: -100.0}, [100, 101, 102, 250]
    expected = offline.generate([PROMPTS[0]] * 2, [SamplingParams(temperature=0.0, max_tokens=8, logit_bias=bias),
                                             SamplingParams(temperature=0.0, max_tokens=8, allowed_token_ids=allowed,
                                                            ignore_eos=True)], use_tqdm=False)
    assert expected[0].outputs[0].token_ids == [101] * 8  # +100 wins every step
    assert set(expected[1].outputs[0].token_ids) <= set(allowed)
    biased = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0.0,
                                       logit_bias={str(t): b for t, b in bias.items()})
    assert biased.choices[0].text == expected[0].outputs[0].text
    restricted = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0.0,
                                           extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
    assert restricted.choices[0].text == expected[1].outputs[0].text
    word = offline.get_tokenizer().decode(expected[1].outputs[0].token_ids[:1]).strip() or "def"
    want = offline.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=8, bad_words=[word]),
                            use_tqdm=False)[0].outputs[0].text
    got = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0.0,
                                    extra_body={"bad_words": [word]})
    assert got.choices[0].text == want


def test_chat_greedy_equals_offline(client, offline: LLM) -> None:
    want = offline.chat(MESSAGES, greedy(16), use_tqdm=False)[0]
    got = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0.0)
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=16,
                                           temperature=0.0)
    assert again.choices[0].message.content == want.outputs[0].text


def test_streamed_completion_equals_non_streamed(client) -> None:
    for prompt in PROMPTS:
        whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0.0)
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0.0,
                                                stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
        assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
        reasons = [c.choices[0].finish_reason for c in chunks[:-1]]
        assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])
    plain = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, stream=True))
    assert all(c.usage is None for c in plain)


def test_streamed_chat_equals_non_streamed(client) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0.0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0.0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    body = chunks[:-1]
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
    assert body[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_n_completions(client) -> None:
    result = client.completions.create(model=MODEL, prompt=PROMPTS[0], n=3, max_tokens=12, temperature=1.0,
                                       seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in result.choices) == [0, 1, 2]
    assert result.usage.completion_tokens == 36
    assert len({c.text for c in result.choices}) > 1  # each completion samples its own stream
    batch = client.completions.create(model=MODEL, prompt=PROMPTS[:2], n=2, max_tokens=4, temperature=1.0, seed=1)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    texts: dict[int, str] = {}
    finished = set()
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=8,
                                                temperature=1.0, seed=3, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and set(texts) == {0, 1}


def test_seeded_sampling_is_reproducible(client) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))
    chat = [client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0.9, seed=99
                                           ).choices[0].message.content for _ in range(2)]
    assert chat[0] == chat[1]


def test_completion_logprobs(client) -> None:
    result = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0.0, logprobs=3,
                                       extra_body={"ignore_eos": True})
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0.0
        assert 1 <= len(top) <= 4  # 3 alternatives + the sampled token; byte tokens may share the text "\ufffd"
        assert max(top.values()) == pytest.approx(logprob, abs=1e-5)  # greedy: the sampled token is the top one
        assert top[token] == pytest.approx(logprob, abs=1e-5)
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0.0,
                                              logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    tokens = [t for c in streamed for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens


def test_chat_logprobs(client) -> None:
    result = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0.0,
                                            logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens == 8
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.bytes == list(item.token.encode())
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, logprobs=True)
    assert all(item.top_logprobs == [] for item in plain.choices[0].logprobs.content)


def test_return_tokens_as_token_ids(client, offline: LLM) -> None:
    """``return_tokens_as_token_ids``: every token in the logprobs (sampled, alternatives, an echoed prompt's,
    streamed or not, completions and chat) is ``token_id:<id>`` of the very ids the offline engine gives; the
    values and text offsets are those of the plain answer."""
    ids = {"return_tokens_as_token_ids": True, "ignore_eos": True}
    want = offline.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    labels = [f"token_id:{t}" for t in want.token_ids]
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0.0, logprobs=2,
                                      extra_body={"ignore_eos": True}).choices[0].logprobs
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0.0, logprobs=2,
                                    extra_body=ids).choices[0].logprobs
    assert got.tokens == labels and got.token_logprobs == plain.token_logprobs
    assert got.text_offset == plain.text_offset
    for position, top in enumerate(got.top_logprobs):
        assert set(top) == {f"token_id:{t}" for t in want.logprobs[position]}
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0.0, logprobs=2,
                                         stream=True, extra_body=ids)
    assert [t for c in streamed for t in c.choices[0].logprobs.tokens] == labels
    echoed = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=1, temperature=0.0, logprobs=1,
                                       echo=True, extra_body=ids).choices[0].logprobs
    prompt_ids = offline.get_tokenizer()(PROMPTS[0]).input_ids
    assert echoed.tokens[:len(prompt_ids)] == [f"token_id:{t}" for t in prompt_ids]
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0.0,
                                          logprobs=True, top_logprobs=2, extra_body=ids).choices[0].logprobs
    for item in chat.content:
        assert item.token.startswith("token_id:") and item.top_logprobs[0].token == item.token
        assert item.bytes == list(item.token.encode())
    chunks = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0.0,
                                            logprobs=True, stream=True, extra_body=ids)
    assert [i.token for c in chunks if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content] \
        == [i.token for i in chat.content]


def test_return_tokens_as_token_ids_server_default(llama_dir) -> None:
    """``--return-tokens-as-token-ids`` (``ServerSettings``) names tokens by id unless a request says false."""
    from tests.e2e.openai_server import in_process_client

    with in_process_client(llama_dir, return_tokens_as_token_ids=True) as (client, _):
        def tokens(**extra: object) -> list[str]:
            return client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0.0,
                                             logprobs=1, extra_body=extra).choices[0].logprobs.tokens

        assert all(t.startswith("token_id:") for t in tokens())
        assert not any(t.startswith("token_id:") for t in tokens(return_tokens_as_token_ids=False))


def test_prompt_tokens_details_count_the_cached_prompt(llama_dir, client) -> None:
    """``--enable-prompt-tokens-details``: a prompt sent again reports the tokens the prefix cache held (whole
    blocks, fewer than the prompt), in completions, chat (streamed too) and the Responses API, which reports
    them always; without the setting the usage has no such details."""
    from tests.e2e.openai_server import in_process_client

    long = PROMPTS[0] * 6
    assert client.completions.create(model=MODEL, prompt=long, max_tokens=2).usage.prompt_tokens_details is None
    with in_process_client(llama_dir, enable_prompt_tokens_details=True) as (local, engine):
        first = local.completions.create(model=MODEL, prompt=long, max_tokens=2).usage
        again = local.completions.create(model=MODEL, prompt=long, max_tokens=2).usage
        assert first.prompt_tokens_details.cached_tokens == 0
        cached = again.prompt_tokens_details.cached_tokens
        assert 0 < cached < again.prompt_tokens and cached % engine.block_size == 0
        messages = [{"role": "user", "content": long}]
        local.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        chat = local.chat.completions.create(model=MODEL, messages=messages, max_tokens=2).usage
        assert chat.prompt_tokens_details.cached_tokens > 0
        chunks = list(local.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, stream=True,
                                                    stream_options={"include_usage": True}))
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
        response = local.responses.create(model=MODEL, input=long, max_output_tokens=2)
        assert response.usage.input_tokens_details.cached_tokens > 0  # the chat above rendered the same prompt


def test_stop_strings(client) -> None:
    for prompt in PROMPTS:
        full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0.0,
                                         extra_body={"ignore_eos": True}).choices[0].text
        stop = full[6:9]
        cut = full[: full.index(stop)]
        result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0.0, stop=[stop],
                                           extra_body={"ignore_eos": True})
        assert result.choices[0].text == cut
        assert result.choices[0].finish_reason == "stop"
        assert result.choices[0].stop_reason == stop
        streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0.0,
                                                  stop=stop, stream=True, extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in streamed) == cut  # never sends text a stop string removes
        kept = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0.0, stop=stop,
                                         extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
        assert kept.choices[0].text == cut + stop


def test_echo_and_extras(client) -> None:
    echoed = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0.0, echo=True)
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0.0)
    assert echoed.choices[0].text == PROMPTS[0] + plain.choices[0].text
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0.0,
                                              echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text
    exact = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=40, temperature=0.8, seed=5,
                                      presence_penalty=0.5, frequency_penalty=0.5, user="u1",
                                      extra_body={"ignore_eos": True, "top_k": 20, "min_p": 0.05,
                                                  "repetition_penalty": 1.2})
    assert exact.usage.completion_tokens == 40 and exact.choices[0].finish_reason == "length"
    at_least = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0.0,
                                         extra_body={"min_tokens": 12})
    assert at_least.usage.completion_tokens == 12
    text = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                          response_format={"type": "text"})
    assert text.choices[0].message.content is not None


def test_echo_with_logprobs_scores_the_prompt(client, offline: LLM) -> None:
    """What lm-evaluation-harness's loglikelihood asks: ``echo`` + ``logprobs`` + ``max_tokens=1``, every prompt
    token's logprob (null for the first), equal to the offline prompt logprobs; streamed in the first chunk."""
    want = offline.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=1, logprobs=1, prompt_logprobs=1),
                            use_tqdm=False)[0]
    ids, n = want.prompt_token_ids, len(want.prompt_token_ids)
    got = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=1, temperature=0.0, echo=True,
                                    logprobs=1)
    lp = got.choices[0].logprobs
    assert got.choices[0].text == PROMPTS[2] + want.outputs[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    assert lp.token_logprobs[1:n] == pytest.approx([want.prompt_logprobs[p][ids[p]].logprob for p in range(1, n)])
    assert lp.token_logprobs[n] == pytest.approx(want.outputs[0].logprobs[0][want.outputs[0].token_ids[0]].logprob)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[n] == len(PROMPTS[2])
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=1, temperature=0.0,
                                            echo=True, logprobs=1, stream=True))
    first = next(c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs is not None)
    assert first.token_logprobs == lp.token_logprobs and first.text_offset == lp.text_offset


def test_prompt_logprobs_extra_equals_offline(client, offline: LLM) -> None:
    want = offline.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2),
                            use_tqdm=False)[0]
    expected = [None] + [{str(t): {"logprob": pytest.approx(lp.logprob), "rank": lp.rank,
                                   "decoded_token": lp.decoded_token} for t, lp in entry.items()}
                         for entry in want.prompt_logprobs[1:]]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2, temperature=0.0,
                                    extra_body={"prompt_logprobs": 2}).model_dump()
    assert got["choices"][0]["prompt_logprobs"] == expected
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2).model_dump()
    assert plain["choices"][0].get("prompt_logprobs") is None
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                          extra_body={"prompt_logprobs": 0}).model_dump()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert all(len(entry) == 1 for entry in chat["prompt_logprobs"][1:])  # the token itself, no alternatives


def test_structured_outputs_through_response_format_and_vllm_extras(client) -> None:
    pytest.importorskip("xgrammar")
    import json
    import re

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
              "required": ["ok", "size"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=64, temperature=1.0, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "shirt", "schema": schema, "strict": True}})
    text = answer.choices[0].message.content
    assert text.lstrip().startswith("{")  # any whitespace is allowed, so a random model may not finish
    compact = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64, temperature=1.0, seed=1,
                                             extra_body={"structured_outputs": {"json": schema,
                                                                                "disable_any_whitespace": True}})
    for content in [text] * (answer.choices[0].finish_reason == "stop") + [compact.choices[0].message.content]:
        value = json.loads(content)
        assert isinstance(value["ok"], bool) and value["size"] in ("S", "M", "L") and set(value) == {"ok", "size"}
    choice = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=1.0, n=3, seed=2,
                                       extra_body={"guided_choice": ["cat", "dog", "hot dog"]})
    assert all(c.text in ("cat", "dog", "hot dog") and c.finish_reason == "stop" for c in choice.choices)
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=1.0,
                                              stream=True, extra_body={"structured_outputs": {"regex": "[a-f]{4}!"}}))
    assert re.fullmatch("[a-f]{4}!", "".join(c.choices[0].text for c in streamed if c.choices))


def test_truncate_prompt_tokens_lets_a_long_prompt_run(client, offline: LLM) -> None:
    long = [5 + i % 500 for i in range(MAX_MODEL_LEN + 100)]
    want = offline.generate([long[-64:]], greedy(8), use_tqdm=False)[0]
    got = client.completions.create(model=MODEL, prompt=long, max_tokens=8, temperature=0.0,
                                    extra_body={"truncate_prompt_tokens": 64})
    assert got.choices[0].text == want.outputs[0].text and got.usage.prompt_tokens == 64


def test_tokenize_detokenize(server: ServerProcess, client, offline: LLM) -> None:
    tokenizer = offline.get_tokenizer()
    answer = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": PROMPTS[0]}).json()
    assert answer["tokens"] == tokenizer(PROMPTS[0]).input_ids
    assert answer["count"] == len(answer["tokens"]) and answer["max_model_len"] == MAX_MODEL_LEN
    text = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": answer["tokens"]}).json()
    assert text == {"prompt": PROMPTS[0]}
    chat = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens


def test_continue_final_message(server: ServerProcess, client, offline: LLM) -> None:
    """``continue_final_message`` leaves the last (assistant) message open in the rendered prompt, in ``/tokenize``
    and in chat completions, whose reply continues it as the offline engine does on the same ids; together with
    ``add_generation_prompt`` it is a 400 naming the conflict."""
    import openai

    tokenizer = offline.get_tokenizer()
    messages = [*MESSAGES, {"role": "assistant", "content": "for i in"}]
    body = {"model": MODEL, "messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    ids = httpx.post(server.url + "/tokenize", json=body).json()["tokens"]
    closed = httpx.post(server.url + "/tokenize", json={**body, "continue_final_message": False}).json()["tokens"]
    assert tokenizer.decode(ids).endswith("assistant: for i in") and tokenizer.decode(closed).endswith("for i in\n")
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0.0,
                                           extra_body={"add_generation_prompt": False,
                                                       "continue_final_message": True})
    want = offline.generate([ids], greedy(6), use_tqdm=False)[0].outputs[0].text
    assert reply.choices[0].message.content == want and reply.usage.prompt_tokens == len(ids)
    with pytest.raises(openai.BadRequestError, match="cannot both be true"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                       extra_body={"continue_final_message": True})


def test_metrics(server: ServerProcess, client) -> None:
    # streamed, twice: each step's tokens reach the server as they come (a non-streamed answer is one final
    # output), so inter-token latencies are observed, and the second finds the prompt in the prefix cache, even
    # when this test runs alone
    for _ in range(2):
        list(client.completions.create(model=MODEL, prompt=PROMPTS[0] * 4, max_tokens=8, stream=True,
                                       extra_body={"ignore_eos": True}))
    metrics = server.metrics()
    for name in ("pagedllm:prompt_tokens_total", "pagedllm:generation_tokens_total",
                 "pagedllm:time_to_first_token_seconds_count", "pagedllm:inter_token_latency_seconds_count"):
        assert metrics[name] > 0, name
    for name in ("pagedllm:num_preemptions_total", "pagedllm:prefix_cache_hit_rate",
                 "pagedllm:prefix_cache_queries_total", "pagedllm:prefix_cache_hits_total"):
        assert name in metrics
    assert metrics["pagedllm:prefix_cache_hits_total"] > 0  # the same prompt came twice
    assert metrics["pagedllm:num_requests_running"] == 0
    assert metrics["pagedllm:num_requests_waiting"] == 0
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0.0
    assert metrics["pagedllm:kv_cache_free_blocks"] == metrics["pagedllm:kv_cache_total_blocks"] > 0


def test_openapi_schema_is_valid(server: ServerProcess) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/version", "/metrics",
                 "/tokenize", "/detokenize"):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest", "CompletionResponse", "ChatCompletionResponse",
                 "ErrorResponse"):
        assert name in schemas, name
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(spec)

