"""The async engine over a fake synchronous engine: outputs reach asyncio callers, rejected requests leave
nothing behind, aborts reach the engine, the event loop keeps running during a step, failures and
shutdown end the open streams."""

from __future__ import annotations

import asyncio
import time

import pytest

from pagedllm.core.engine import EngineStats
from pagedllm.core.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedllm.core.sampling_params import SamplingParams
from pagedllm.entrypoints.async_engine import AsyncLLMEngine, EngineDeadError, GenerationRequest


class FakeEngine:
    """Generates token 7 once per step for every request until ``max_tokens``; ``fail_at_step`` raises."""

    def __init__(self, step_s: float = 0.0, fail_at_step: int | None = None) -> None:
        self.step_s = step_s
        self.fail_at_step = fail_at_step
        self.requests: dict[str, tuple[list[int], int, list[int]]] = {}
        self.num_steps = 0
        self.aborted: list[str] = []
        self.is_shut_down = False

    def stats(self) -> EngineStats:
        n = len(self.requests)
        return EngineStats(n, 0, n / 10, 10 - n, 10, 0, 0, 0, 0)

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams, arrival_time: float,
                    priority: int = 0, lora_request: object = None) -> str:
        if not prompt:
            raise ValueError("the prompt is empty: at least one token is needed")
        self.requests[request_id] = (prompt, params.max_tokens or 1, [])
        return request_id

    def abort_request(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if self.requests.pop(request_id, None) is not None:
                self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.num_steps += 1
        if self.num_steps == self.fail_at_step:
            raise RuntimeError("kernel exploded")
        time.sleep(self.step_s)
        outputs = []
        for request_id, (prompt, max_tokens, tokens) in list(self.requests.items()):
            tokens.append(7)
            finished = len(tokens) == max_tokens
            outputs.append(RequestOutput(request_id, None, prompt, [CompletionOutput(
                0, "x" * len(tokens), list(tokens), None, None, "length" if finished else None)], finished,
                RequestMetrics(0.0)))
            if finished:
                del self.requests[request_id]
        return outputs

    def shutdown(self) -> None:
        self.is_shut_down = True


class RecordingObserver:
    def __init__(self) -> None:
        self.calls: list[tuple[int, list[str], int]] = []

    def observe(self, outputs, aborted_ids, stats) -> None:
        self.calls.append((len(outputs), list(aborted_ids), stats.num_running))


def request(request_id: str, prompt: list[int], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(request_id, prompt, SamplingParams(max_tokens=max_tokens))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_outputs_reach_the_caller_until_finished() -> None:
    observer = RecordingObserver()
    engine = FakeEngine()

    async def main() -> list[RequestOutput]:
        async_engine = AsyncLLMEngine(engine, [observer])  # type: ignore[arg-type]
        async_engine.start()
        stream = await async_engine.add_requests([request("a", [1, 2], 5), request("b", [3], 2)])
        final: dict[str, RequestOutput] = {}
        async for outputs in stream:
            for output in outputs:
                assert len(output.outputs[0].token_ids) <= output.outputs[0].token_ids.count(7)
                final[output.request_id] = output
        await async_engine.shutdown()
        return [final["a"], final["b"]]

    a, b = run(main())
    assert a.finished and a.outputs[0].token_ids == [7] * 5 and a.outputs[0].finish_reason == "length"
    assert b.finished and b.outputs[0].token_ids == [7] * 2
    assert engine.is_shut_down
    assert observer.calls and observer.calls[-1][2] == 0  # the last stats: nothing running


def test_rejected_request_leaves_nothing_behind() -> None:
    engine = FakeEngine()

    async def main() -> None:
        async_engine = AsyncLLMEngine(engine)  # type: ignore[arg-type]
        async_engine.start()
        with pytest.raises(ValueError, match="prompt is empty"):
            await async_engine.add_requests([request("ok", [1], 100), request("bad", [], 1)])
        assert engine.requests == {} and engine.aborted == ["ok"]
        with pytest.raises(ValueError, match="already in use"):
            stream = await async_engine.add_requests([request("x", [1], 3)])
            await async_engine.add_requests([request("x", [1], 3)])
        async for _ in stream:
            pass
        await async_engine.shutdown()

    run(main())


def test_event_loop_runs_during_a_step() -> None:
    engine = FakeEngine(step_s=0.1)

    async def main() -> float:
        async_engine = AsyncLLMEngine(engine)  # type: ignore[arg-type]
        async_engine.start()
        stream = await async_engine.add_requests([request("slow", [1], 4)])
        gaps = []

        async def ticker() -> None:
            last = time.monotonic()
            while not stream.finished:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.ensure_future(ticker())
        async for _ in stream:
            pass
        await tick
        await async_engine.shutdown()
        return max(gaps)

    assert run(main()) < 0.06  # a step takes 0.1 s; the loop never waited for one


def test_abort_reaches_the_engine_before_its_next_step() -> None:
    engine = FakeEngine(step_s=0.01)

    async def main() -> None:
        async_engine = AsyncLLMEngine(engine)  # type: ignore[arg-type]
        async_engine.start()
        stream = await async_engine.add_requests([request("long", [1], 10_000)])
        await stream.__anext__()
        async_engine.abort(stream.request_ids)
        for _ in range(100):
            if not engine.requests:
                break
            await asyncio.sleep(0.01)
        assert engine.aborted == ["long"] and engine.requests == {}
        assert async_engine.latest_stats.num_running == 0
        await async_engine.shutdown()

    run(main())


def test_engine_failure_ends_streams_and_refuses_new_requests() -> None:
    engine = FakeEngine(fail_at_step=3)

    async def main() -> None:
        async_engine = AsyncLLMEngine(engine)  # type: ignore[arg-type]
        async_engine.start()
        stream = await async_engine.add_requests([request("r", [1], 100)])
        with pytest.raises(EngineDeadError, match="kernel exploded"):
            async for _ in stream:
                pass
        assert not async_engine.is_alive
        with pytest.raises(EngineDeadError):
            await async_engine.add_requests([request("s", [1], 1)])
        await async_engine.shutdown()

    run(main())


def test_shutdown_ends_open_streams() -> None:
    engine = FakeEngine(step_s=0.01)

    async def main() -> None:
        async_engine = AsyncLLMEngine(engine)  # type: ignore[arg-type]
        async_engine.start()
        stream = await async_engine.add_requests([request("r", [1], 10_000)])
        await stream.__anext__()
        await async_engine.shutdown()
        with pytest.raises(EngineDeadError, match="shutting down"):
            async for _ in stream:
                pass
        assert engine.is_shut_down

    run(main())
