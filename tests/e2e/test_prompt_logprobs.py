"""Prompt logprobs through the decode-graph path: a prompt chunked one token per step beside decodes runs in
the replayed graph, whose logits rows then serve both the sampled requests and the prompt's."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from tests.conftest import assert_pool_free

KWARGS: dict[str, object] = dict(device="cpu", dtype="float32", block_size=4, max_num_seqs=4,
                                 max_num_batched_tokens=4, kv_cache_memory_bytes=1 << 22)


def test_one_token_prompt_chunks_in_decode_graphs_give_the_eager_prompt_logprobs(
        llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedllm.backends.registry import get_registry
    from tests.e2e.graph_cpu_backend import GraphCpuBackend

    # three requests decode; with a 4-token budget the fourth prompt gets one token per step beside them
    prompts = [[5, 6], [7, 8], [9, 10], list(range(20, 44))]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 3
    params.append(SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=2))
    expected = LLM(str(llama_dir), **KWARGS).generate(prompts, params, use_tqdm=False)[3]
    monkeypatch.setattr(get_registry(), "resolve_backend", lambda device: GraphCpuBackend)
    llm = LLM(str(llama_dir), **KWARGS)
    runner = llm.llm_engine.executor.worker.runner
    assert runner.graph_runner is not None
    graph_steps_with_prompt_rows = 0
    prepare_host = runner.prepare_host

    def counting_prepare_host(scheduled: list) -> object:
        nonlocal graph_steps_with_prompt_rows
        host = prepare_host(scheduled)
        if host.prompt_rows is not None and all(r.num_new_tokens == 1 for r in scheduled):
            graph_steps_with_prompt_rows += 1
        return host

    monkeypatch.setattr(runner, "prepare_host", counting_prepare_host)
    got = llm.generate(prompts, params, use_tqdm=False)[3]
    assert graph_steps_with_prompt_rows > 10
    assert got.outputs[0].token_ids == expected.outputs[0].token_ids
    assert len(got.prompt_logprobs) == len(prompts[3]) and got.prompt_logprobs[0] is None
    for ours, ref in zip(got.prompt_logprobs[1:], expected.prompt_logprobs[1:], strict=True):
        assert ours.keys() == ref.keys()
        for token, lp in ours.items():
            assert lp.logprob == pytest.approx(ref[token].logprob, abs=1e-5) and lp.rank == ref[token].rank
    assert_pool_free(llm)


def _prompt_logprobs(llm: LLM, prompts: list[list[int]]) -> list[list[dict[int, tuple[float, int | None]]]]:
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    return [[{t: (lp.logprob, lp.rank) for t, lp in entry.items()} for entry in out.prompt_logprobs[1:]]
            for out in llm.generate(prompts, params, use_tqdm=False)]


def assert_close(got: list, expected: list, atol: float) -> None:
    for ours, ref in zip(got, expected, strict=True):
        for a, b in zip(ours, ref, strict=True):
            assert a.keys() == b.keys()
            for token, (logprob, rank) in a.items():
                assert logprob == pytest.approx(b[token][0], abs=atol) and rank == b[token][1]


def test_lm_head_in_slices_and_tensor_parallel_give_the_same_prompt_logprobs(
        llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The LM head over prompt rows a few rows at a time (as a long chunk runs it), and under tp=2 (its
    vocabulary all-gathered per slice on every rank): the same logprobs as in one slice on one device."""
    import pagedllm.core.prompt_logprobs as prompt_logprobs

    prompts = [list(range(30, 70)), [3, 4, 5, 6, 7, 8, 9]]
    kwargs = dict(device="cpu", dtype="float32", block_size=4, kv_cache_memory_bytes=1 << 22)
    expected = _prompt_logprobs(LLM(str(llama_dir), **kwargs), prompts)
    monkeypatch.setattr(prompt_logprobs, "LOG_SOFTMAX_ROWS", 3)
    assert_close(_prompt_logprobs(LLM(str(llama_dir), **kwargs), prompts), expected, 1e-5)  # GEMMs of other sizes
    monkeypatch.undo()
    tp = LLM(str(llama_dir), **kwargs, tensor_parallel_size=2)
    try:
        assert_close(_prompt_logprobs(tp, prompts), expected, 1e-4)  # tp=2 sums in another order
    finally:
        tp.llm_engine.shutdown()
