"""Many simultaneous streaming clients, some of which disconnect early: the others complete, and the
disconnected ones' requests are aborted at once, so afterwards nothing runs and the KV pool is all free.
The shared server's pool is small (63 usable blocks), so the load also preempts requests."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from pagedllm.testing.server import ServerProcess  # noqa: E402
from tests.e2e.openai_server import MODEL, start_shared_server  # noqa: E402

NUM_CLIENTS = 40
NUM_DISCONNECTING = 12
MAX_TOKENS = 48
ABORTED = 'pagedllm:request_success_total{finished_reason="abort",model_name="tiny"}'
COMPLETED = 'pagedllm:request_success_total{finished_reason="length",model_name="tiny"}'
PROMPTS = ["def handler(event):", "class Node:\n", "import json\n", "while True:\n", "return [x for x in"]


@pytest.fixture(scope="module")
def server(llama_dir, pytestconfig: pytest.Config) -> ServerProcess:
    return start_shared_server(llama_dir, pytestconfig)


def wait_until_idle(server: ServerProcess, timeout_s: float = 10.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and the KV pool is all free; returns the last metrics."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = server.metrics()
        idle = (metrics["pagedllm:num_requests_running"] == 0 and metrics["pagedllm:num_requests_waiting"] == 0
                and metrics["pagedllm:kv_cache_usage_perc"] == 0.0)
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


def test_many_streaming_clients_some_disconnecting(server: ServerProcess) -> None:
    async def one_client(client, i: int) -> tuple[str, int]:
        stream = await client.completions.create(
            model=MODEL, prompt=PROMPTS[i % len(PROMPTS)] * (1 + i % 3), max_tokens=MAX_TOKENS, temperature=0.7,
            seed=i, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        num_chunks, usage, reason = 0, None, None
        async for chunk in stream:
            if chunk.choices:
                num_chunks += 1
                reason = chunk.choices[0].finish_reason or reason
            usage = chunk.usage or usage
            if i < NUM_DISCONNECTING and num_chunks == 3:
                await stream.close()  # hang up mid-stream
                return "disconnected", num_chunks
        assert reason == "length"
        return "completed", usage.completion_tokens

    async def run_all() -> list[tuple[str, int]]:
        client = server.async_client(timeout=120)
        try:
            return await asyncio.gather(*(one_client(client, i) for i in range(NUM_CLIENTS)))
        finally:
            await client.close()

    before = server.metrics()
    results = asyncio.run(run_all())
    assert [kind for kind, _ in results].count("disconnected") == NUM_DISCONNECTING
    assert all(n == MAX_TOKENS for kind, n in results if kind == "completed")

    metrics = wait_until_idle(server)
    assert metrics["pagedllm:num_requests_running"] == 0
    assert metrics["pagedllm:num_requests_waiting"] == 0
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0.0
    assert metrics["pagedllm:kv_cache_free_blocks"] == metrics["pagedllm:kv_cache_total_blocks"]
    assert metrics.get(ABORTED, 0.0) - before.get(ABORTED, 0.0) == NUM_DISCONNECTING
    assert metrics[COMPLETED] - before.get(COMPLETED, 0.0) == NUM_CLIENTS - NUM_DISCONNECTING
    # 40 clients x 4-5 blocks do not fit 63 blocks
    assert metrics["pagedllm:num_preemptions_total"] > before["pagedllm:num_preemptions_total"]


def test_disconnect_frees_kv_blocks_at_once(server: ServerProcess) -> None:
    client = server.client(timeout=60)
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=400, stream=True,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    running = server.metrics()
    assert running["pagedllm:num_requests_running"] == 1
    assert running["pagedllm:kv_cache_usage_perc"] > 0.0
    stream.close()
    start = time.monotonic()
    metrics = wait_until_idle(server, timeout_s=5.0)
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0.0 and metrics["pagedllm:num_requests_running"] == 0
    assert time.monotonic() - start < 2.0  # aborted before the next steps, not after the 400 tokens


def test_non_streamed_request_aborted_when_client_leaves(server: ServerProcess) -> None:
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", timeout=0.3, headers={"Authorization": f"Bearer {server.api_key}"},
                   json={"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 490, "ignore_eos": True})
    metrics = wait_until_idle(server, timeout_s=5.0)
    assert metrics["pagedllm:num_requests_running"] == 0
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0.0
