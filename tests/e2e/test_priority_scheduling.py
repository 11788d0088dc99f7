"""``scheduling_policy="priority"`` (vLLM's): requests run by priority (lower first, then arrival), the lowest
preempted first when the KV pool runs dry, and every completion is what first-come-first-served scheduling
generates (greedy); a priority without the policy, or one per prompt too few, is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from tests.conftest import assert_pool_free

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
ENGINE = dict(device="cpu", dtype="float32", block_size=4, max_num_seqs=2, num_kv_blocks=24)


def prompts() -> list[list[int]]:
    return [list(range(10 * i + 1, 10 * i + 1 + 9 + 3 * i)) for i in range(6)]


def test_urgent_requests_finish_first_with_the_same_tokens(llama_dir: Path) -> None:
    expected = LLM(str(llama_dir), **ENGINE).generate(prompts(), PARAMS, use_tqdm=False)
    llm = LLM(str(llama_dir), scheduling_policy="priority", **ENGINE)
    engine = llm.llm_engine
    priorities = [5, 5, 5, 5, 0, -1]  # the last two arrive last but run first
    for i, (prompt, priority) in enumerate(zip(prompts(), priorities, strict=True)):
        engine.add_request(str(i), prompt, PARAMS, priority=priority)
    finished: list[str] = []
    outputs = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished.append(output.request_id)
                outputs[output.request_id] = output
    assert finished[:2] == ["5", "4"] or finished[:2] == ["4", "5"]
    assert [outputs[str(i)].outputs[0].token_ids for i in range(6)] == [e.outputs[0].token_ids for e in expected]
    assert_pool_free(llm)
    again = llm.generate(prompts(), PARAMS, use_tqdm=False, priority=priorities)  # the offline API's argument
    assert [o.outputs[0].token_ids for o in again] == [e.outputs[0].token_ids for e in expected]


def test_the_lowest_priority_is_preempted_and_still_completes(llama_dir: Path) -> None:
    """A pool of 8 usable blocks for two long requests: the low-priority one is preempted, recomputed, and
    generates what it generates alone."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    long = [list(range(1, 17)), list(range(40, 56))]
    alone = LLM(str(llama_dir), device="cpu", dtype="float32", block_size=4).generate(long, params, use_tqdm=False)
    llm = LLM(str(llama_dir), scheduling_policy="priority", device="cpu", dtype="float32", block_size=4,
              num_kv_blocks=9)
    outputs = llm.generate(long, params, use_tqdm=False, priority=[1, 0])
    assert [o.outputs[0].token_ids for o in outputs] == [a.outputs[0].token_ids for a in alone]
    stats = llm.llm_engine.stats()
    assert stats.num_preemptions > 0
    assert_pool_free(llm)


def test_priority_needs_the_policy_and_one_per_prompt(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", num_kv_blocks=16)
    with pytest.raises(ValueError, match=r"priority 1 was given, but priority scheduling is off: start the engine "
                                         r"with scheduling_policy='priority'"):
        llm.generate([[1, 2, 3]], PARAMS, use_tqdm=False, priority=[1])
    assert_pool_free(llm)
    with pytest.raises(ValueError, match="got 1 priorities for 2 prompts"):
        llm.generate([[1, 2], [3, 4]], PARAMS, use_tqdm=False, priority=[0])
    with pytest.raises(ValueError, match="scheduling_policy must be one of fcfs, priority; got 'sjf'"):
        LLM(str(llama_dir), device="cpu", scheduling_policy="sjf")
