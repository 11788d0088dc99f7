"""``POST /v1/embeddings`` through the official ``openai`` client: float and base64 encodings, text and
token-id inputs, a batch, Matryoshka ``dimensions``, equal to the offline ``LLM.embed``; errors in the OpenAI
format, and the server keeps serving (the server is shared with the other ``test_server_*`` modules)."""

from __future__ import annotations

import base64

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from pagedllm import LLM, PoolingParams  # noqa: E402
from pagedllm.testing.server import ServerProcess  # noqa: E402
from tests.e2e.openai_server import API_KEY, KV_CACHE_BYTES, MAX_MODEL_LEN, MODEL  # noqa: E402

INPUTS = ["def main():\n", "The quick brown fox", "import os\nimport sys\n"]


@pytest.fixture(scope="module")
def offline(llama_dir) -> LLM:
    return LLM(str(llama_dir), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN,
               kv_cache_memory_bytes=KV_CACHE_BYTES)


def vectors(response) -> list[torch.Tensor]:
    """The embeddings of a response in index order (base64 ones decoded: little-endian float32)."""
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return [torch.frombuffer(bytearray(base64.b64decode(d.embedding)), dtype=torch.float32)
            if isinstance(d.embedding, str) else torch.tensor(d.embedding) for d in response.data]


@pytest.mark.parametrize("encoding_format", [None, "float", "base64"], ids=["client-default", "float", "base64"])
def test_embeddings_equal_offline(shared_client, offline: LLM, encoding_format: str | None) -> None:
    """The client asks for base64 and decodes it itself unless told a format; given "base64", it returns text."""
    extra = {} if encoding_format is None else {"encoding_format": encoding_format}
    response = shared_client.embeddings.create(model=MODEL, input=INPUTS, **extra)
    assert all(isinstance(d.embedding, str) for d in response.data) == (encoding_format == "base64")
    want = [torch.tensor(o.outputs.embedding) for o in offline.embed(INPUTS, use_tqdm=False)]
    for got, expected in zip(vectors(response), want, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    tokens = sum(len(o.prompt_token_ids) for o in offline.embed(INPUTS, use_tqdm=False))
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens
    assert response.model == MODEL and response.object == "list"


def test_token_ids_and_dimensions(shared_client, offline: LLM) -> None:
    ids = offline.get_tokenizer()(INPUTS[1]).input_ids
    one = shared_client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    text = shared_client.embeddings.create(model=MODEL, input=INPUTS[1], encoding_format="float")
    torch.testing.assert_close(vectors(one)[0], vectors(text)[0])
    cut = vectors(shared_client.embeddings.create(model=MODEL, input=[ids, ids[:3]], dimensions=16))
    want = offline.embed([ids, ids[:3]], PoolingParams(dimensions=16), use_tqdm=False)
    for got, expected in zip(cut, want, strict=True):
        assert got.shape == (16,) and got.norm().item() == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(got, torch.tensor(expected.outputs.embedding), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "dimensions": 65}, "dimensions"),
    ({"input": []}, "input"),
    ({"input": [1, 2, 10**9]}, "input"),
    ({"input": "word " * 2000}, "input"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "truncate_prompt_tokens": -5}, "truncate_prompt_tokens"),
])
def test_bad_embedding_requests(shared_server: ServerProcess, shared_client, body: dict, param: str) -> None:
    with httpx.Client(base_url=shared_server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        reply = http.post("/v1/embeddings", json={"model": MODEL, **body})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
        # the server keeps serving, and a long input runs once cut
        fine = http.post("/v1/embeddings", json={"model": MODEL, "input": "word " * 2000,
                                                 "truncate_prompt_tokens": -1, "encoding_format": "float"})
        assert fine.status_code == 200 and len(fine.json()["data"][0]["embedding"]) == 64
        assert fine.json()["usage"]["prompt_tokens"] == MAX_MODEL_LEN - 1
