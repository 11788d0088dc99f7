"""Asynchronous scheduling (``async_scheduling=True``) must produce exactly what the synchronous engine does.

The next step is scheduled and launched before the previous one's tokens are read back; its requests take
their last input token from the sampled tokens on the device. So every feature whose behaviour depends on
the tokens (stops on token ids and strings, penalties, seeds, logprobs, prefix caching, preemption,
chunked prefills mixed with decodes) is run both ways on the same tiny checkpoint, eagerly and through
decode graphs (a ``cpu`` backend whose "graphs" re-run the step over the static buffers).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.backends.cpu.backend import CpuBackend
from pagedllm.core.config import EngineConfig, resolve_async_scheduling
from pagedllm.core.outputs import RequestOutput
from pagedllm.core.sampling_params import RequestOutputKind
from tests.conftest import assert_pool_free

PROMPTS: list[list[int]] = [[1, 2, 3, 4, 5], [100, 200, 300], list(range(10, 90)), [7] * 33, [42]]
ENGINE_KWARGS: dict[str, object] = dict(device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=48,
                                        kv_cache_memory_bytes=1 << 22)


def _completions(outputs: list[RequestOutput]) -> list[list[tuple]]:
    """What a user sees of each completion: tokens, text, finish, stop reason, logprobs (rounded)."""
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason,
              None if c.logprobs is None else [{t: round(lp.logprob, 5) for t, lp in step.items()}
                                               for step in c.logprobs])
             for c in o.outputs] for o in outputs]


def _run_both(model_dir: Path, params: list[SamplingParams], prompts: list = PROMPTS, **kwargs: object
              ) -> tuple[list, list]:
    results = []
    for async_scheduling in (False, True):
        llm = LLM(str(model_dir), **{**ENGINE_KWARGS, **kwargs}, async_scheduling=async_scheduling)
        results.append(_completions(llm.generate(prompts, params, use_tqdm=False)))
        assert_pool_free(llm)
    return results[0], results[1]


def _stop_token(model_dir: Path) -> int:
    """A token greedy decoding of PROMPTS[2] produces mid-way, to stop on."""
    llm = LLM(str(model_dir), **ENGINE_KWARGS)
    tokens = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    return tokens[5]


def test_greedy_lengths_and_stop_tokens_match(llama_dir: Path) -> None:
    stop = _stop_token(llama_dir)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, stop_token_ids=None if i % 2 else [stop])
              for i, m in enumerate([1, 7, 12, 20, 3])]  # fmt: skip
    sync, asynchronous = _run_both(llama_dir, params)
    assert asynchronous == sync
    assert sync[2][0][2] == "stop"  # the stop token did end one completion early


def test_sampling_penalties_seeds_and_logprobs_match(llama_dir: Path) -> None:
    params = [
        SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=9, ignore_eos=True),  # global generator
        SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.3,
                       max_tokens=11, ignore_eos=True),
        SamplingParams(temperature=0, logprobs=3, min_tokens=4, max_tokens=8),
        SamplingParams(temperature=0.7, seed=11, max_tokens=6, ignore_eos=True, logprobs=0),
    ]
    sync, asynchronous = _run_both(llama_dir, params)
    assert asynchronous == sync


def test_stop_strings_match(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), **ENGINE_KWARGS)
    text = llm.generate(["def main():"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    sync, asynchronous = _run_both(llama_dir, [params] * 2, prompts=["def main():", "import os"])
    assert asynchronous == sync
    assert sync[0][0][2] == "stop"


def test_preemption_and_prefix_sharing_match(llama_dir: Path) -> None:
    """A pool too small for every request at once (preemptions), and n=3 samples sharing prompt blocks."""
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)] * 4 + [
        SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)]
    sync, asynchronous = _run_both(llama_dir, params, num_kv_blocks=40, kv_cache_memory_bytes=None)
    assert asynchronous == sync


@pytest.mark.parametrize("kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY])
def test_step_by_step_outputs_and_abort_leave_nothing_behind(llama_dir: Path, kind: RequestOutputKind) -> None:
    """Each step returns the tokens of the step launched before it; an abort while a step is in flight
    frees the request's blocks, and its in-flight token is dropped."""
    llm = LLM(str(llama_dir), **ENGINE_KWARGS, async_scheduling=True)
    engine = llm.llm_engine
    for name in ("kept", "aborted"):
        engine.add_request(name, [1, 2, 3], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                           output_kind=kind))
    seen: dict[str, list[int]] = {"kept": [], "aborted": []}
    for output in engine.step():
        seen[output.request_id].append(len(output.outputs[0].token_ids))
    assert engine.abort_request("aborted") == ["aborted"]
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen[output.request_id].append(len(output.outputs[0].token_ids))
    if kind is RequestOutputKind.CUMULATIVE:
        assert seen == {"kept": [1, 2, 3, 4, 5, 6], "aborted": [1]}
    else:
        assert seen == {"kept": [6], "aborted": []}
    assert_pool_free(llm)


def test_decode_graphs_take_pending_tokens_on_the_device(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedllm.backends.registry import get_registry
    from tests.e2e.graph_cpu_backend import GraphCpuBackend

    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (5, 9, 14, 3, 20)]
    reference = LLM(str(llama_dir), **ENGINE_KWARGS)
    expected = _completions(reference.generate(PROMPTS, params, use_tqdm=False))
    monkeypatch.setattr(get_registry(), "resolve_backend", lambda device: GraphCpuBackend)
    llm = LLM(str(llama_dir), **ENGINE_KWARGS, async_scheduling=True)
    runner = llm.llm_engine.executor.worker.runner
    assert runner.graph_runner is not None
    replays = 0
    run = runner.graph_runner.run

    def counting_run(*args: object, **kwargs: object) -> object:
        nonlocal replays
        replays += args[-1] is not None  # a replay whose input tokens came from the device
        return run(*args, **kwargs)

    monkeypatch.setattr(runner.graph_runner, "run", counting_run)
    assert _completions(llm.generate(PROMPTS, params, use_tqdm=False)) == expected
    assert replays > 10
    assert_pool_free(llm)


def test_async_scheduling_refuses_the_ray_executor(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="async_scheduling with tensor parallelism needs the mp executor"):
        LLM(str(llama_dir), device="cpu", tensor_parallel_size=2, distributed_executor_backend="ray",
            async_scheduling=True)


def test_default_is_on_where_the_device_runs_apart_from_the_host() -> None:
    """None (the default) follows the backend's ``runs_asynchronously``; an explicit setting wins; tensor
    parallelism through Ray never schedules asynchronously by default."""
    ray_tp = EngineConfig(tensor_parallel_size=2, distributed_executor_backend="ray")
    assert resolve_async_scheduling(EngineConfig(), runs_asynchronously=True) is True
    assert resolve_async_scheduling(EngineConfig(), runs_asynchronously=False) is False
    assert resolve_async_scheduling(EngineConfig(async_scheduling=False), runs_asynchronously=True) is False
    assert resolve_async_scheduling(EngineConfig(async_scheduling=True), runs_asynchronously=False) is True
    assert resolve_async_scheduling(ray_tp, runs_asynchronously=True) is False
    assert resolve_async_scheduling(EngineConfig(tensor_parallel_size=2), runs_asynchronously=True) is True


def test_engine_runs_with_the_resolved_setting(llama_dir: Path) -> None:
    """The engine's config says what runs: off on the ``cpu`` backend by default, on when asked."""
    assert CpuBackend().capabilities().runs_asynchronously is False
    assert LLM(str(llama_dir), **ENGINE_KWARGS).llm_engine.config.async_scheduling is False
    assert LLM(str(llama_dir), **ENGINE_KWARGS, async_scheduling=True).llm_engine.config.async_scheduling is True


def test_failing_step_mid_pipeline_aborts_the_call_and_the_engine_goes_on(llama_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that raises while another is in flight (pending tokens outstanding): the call's requests are
    aborted with their blocks, the in-flight step is dropped, and the next call runs normally."""
    llm = LLM(str(llama_dir), **ENGINE_KWARGS, async_scheduling=True)
    executor = llm.llm_engine.executor
    execute = executor.execute
    calls = 0

    def fails_on_the_fourth(*args: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("device fell over")
        return execute(*args)

    monkeypatch.setattr(executor, "execute", fails_on_the_fourth)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with pytest.raises(RuntimeError, match="device fell over"):
        llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert_pool_free(llm)
    monkeypatch.undo()
    expected = _completions(LLM(str(llama_dir), **ENGINE_KWARGS).generate(PROMPTS[:2], params, use_tqdm=False))
    assert _completions(llm.generate(PROMPTS[:2], params, use_tqdm=False)) == expected
