from __future__ import annotations

import pytest

from pagedllm.core.block_manager import BlockManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.sampling_params import SamplingParams
from pagedllm.core.scheduler import Scheduler


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8, budget: int = 32,
                   max_model_len: int = 128, chunked: bool = True, caching: bool = True,
                   policy: str = "fcfs") -> Scheduler:
    bm = BlockManager(num_blocks, block_size, caching)
    return Scheduler(bm, max_num_seqs, budget, max_model_len, chunked, policy)


def make_request(request_id: str, num_prompt: int, max_tokens: int = 4, first: int = 0, priority: int = 0,
                 arrival: float = 0.0) -> Request:
    return Request(request_id, list(range(first, first + num_prompt)), SamplingParams(max_tokens=max_tokens), arrival,
                   priority=priority)


def step(s: Scheduler, token: int = 7) -> dict[str, int]:
    """Schedule once and feed one sampled token to every request that samples; returns tokens per id."""
    out = s.schedule()
    for sr in out.scheduled:
        if sr.needs_sample:
            s.requests[sr.request_id].append_output_token(token)
    return {sr.request_id: sr.num_new_tokens for sr in out.scheduled}


def test_budget_respected_and_long_prompt_chunked() -> None:
    s = make_scheduler(budget=16)
    s.add_request(make_request("a", 40))
    s.add_request(make_request("b", 8, first=100))
    out = s.schedule()
    assert [(r.request_id, r.num_new_tokens, r.needs_sample) for r in out.scheduled] == [("a", 16, False)]
    assert out.num_batched_tokens == 16
    assert step(s) == {"a": 16}
    assert step(s) == {"a": 8, "b": 8}  # a's last chunk, then b fills the budget
    assert s.requests["a"].num_output_tokens == 1 and s.requests["b"].num_output_tokens == 1


def test_decodes_mixed_with_chunked_prefill() -> None:
    s = make_scheduler(budget=10)
    s.add_request(make_request("a", 3))
    assert step(s) == {"a": 3}
    s.add_request(make_request("b", 30, first=50))
    assert step(s) == {"a": 1, "b": 9}  # the decode goes first, the prefill takes the rest
    assert step(s) == {"a": 1, "b": 9}


def test_max_num_seqs_caps_running() -> None:
    s = make_scheduler(max_num_seqs=2)
    for i in range(3):
        s.add_request(make_request(str(i), 4, first=10 * i))
    assert set(step(s)) == {"0", "1"}
    assert len(s.waiting) == 1


def test_preemption_of_newest_and_resume_by_recompute() -> None:
    s = make_scheduler(num_blocks=5, block_size=4, budget=64)  # 4 usable blocks
    s.add_request(make_request("old", 7, max_tokens=8))
    s.add_request(make_request("new", 7, max_tokens=8, first=100))
    assert step(s) == {"old": 7, "new": 7}  # 2 blocks each: pool full
    assert step(s) == {"old": 1, "new": 1}  # positions 7 fit
    out = s.schedule()  # position 8 needs a third block for each: the newest is preempted
    assert [r.request_id for r in out.scheduled] == ["old"] and out.preempted_ids == ["new"]
    new = s.requests["new"]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert s.waiting[0] is new and new.num_preemptions == 1
    s.requests["old"].append_output_token(7)
    s.finish_requests(["old"], RequestStatus.FINISHED_STOPPED)
    out = s.schedule()  # recompute prompt + generated tokens; the prefix cache gives back full blocks
    (resumed,) = out.scheduled
    assert resumed.request_id == "new" and resumed.needs_sample
    assert resumed.start_position + resumed.num_new_tokens == new.num_tokens == 9


def test_impossible_requests_rejected_at_add() -> None:
    s = make_scheduler(num_blocks=5, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="exceeds the maximum model length 64"):
        s.add_request(make_request("long", 60, max_tokens=8))
    with pytest.raises(ValueError, match="needs 5 KV blocks"):
        s.add_request(make_request("big", 16, max_tokens=4))
    with pytest.raises(ValueError, match="empty"):
        s.add_request(make_request("empty", 0))
    assert not s.has_unfinished_requests()


def test_no_chunking_when_disabled() -> None:
    s = make_scheduler(budget=16, chunked=False)
    with pytest.raises(ValueError, match="chunked prefill is off"):
        s.add_request(make_request("a", 20))
    s.add_request(make_request("b", 10))
    s.add_request(make_request("c", 10, first=40))
    assert step(s) == {"b": 10}  # c does not fit the rest of the budget and is not split


def test_prefix_cache_hit_skips_computed_tokens() -> None:
    s = make_scheduler()
    s.add_request(make_request("a", 12))
    step(s)
    s.add_request(make_request("b", 14))
    out = s.schedule()
    b = next(r for r in out.scheduled if r.request_id == "b")
    assert b.start_position == 12 and b.num_new_tokens == 2
    assert s.requests["b"].num_cached_tokens == 12


def test_abort_waiting_and_running_frees_blocks() -> None:
    s = make_scheduler()
    s.add_request(make_request("a", 10))
    s.add_request(make_request("b", 10, first=20))
    s.schedule()
    s.add_request(make_request("c", 5))
    s.finish_requests(["a", "c", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in s.running] == ["b"] and not s.waiting
    s.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert s.block_manager.usage() == 0.0
    assert s.schedule().finished_ids == ["a", "c", "b"]


def test_priority_policy_admits_by_priority_then_arrival() -> None:
    s = make_scheduler(max_num_seqs=2, policy="priority")
    for name, priority, arrival in (("late-urgent", -1, 3.0), ("low", 5, 0.0), ("early", 0, 1.0), ("same", 0, 2.0)):
        s.add_request(make_request(name, 4, priority=priority, arrival=arrival, first=10 * int(arrival)))
    assert [r.request_id for r in s.waiting] == ["late-urgent", "early", "same", "low"]
    assert set(step(s)) == {"late-urgent", "early"}
    fcfs = make_scheduler(max_num_seqs=2)
    for name, arrival in (("a", 0.0), ("b", 1.0), ("c", 2.0)):
        fcfs.add_request(make_request(name, 4, arrival=arrival, first=10 * int(arrival)))
    assert set(step(fcfs)) == {"a", "b"}


def test_priority_policy_preempts_the_lowest_priority_even_if_scheduled() -> None:
    """The pool runs dry while the urgent request, admitted last, is scheduled: the lowest-priority request is
    preempted although it went first in this step (its tokens go back to the budget), and it queues again
    before waiting requests of its priority that arrived after it."""
    s = make_scheduler(num_blocks=5, block_size=4, budget=64, policy="priority")  # 4 usable blocks
    s.add_request(make_request("low", 7, max_tokens=8, priority=1, arrival=0.0))
    s.add_request(make_request("urgent", 7, max_tokens=8, priority=0, arrival=1.0, first=100))
    assert step(s) == {"urgent": 7, "low": 7}  # admitted by priority: urgent first; 2 blocks each
    assert [r.request_id for r in s.running] == ["urgent", "low"]
    s.add_request(make_request("low-later", 3, priority=1, arrival=2.0, first=200))
    assert step(s) == {"urgent": 1, "low": 1}
    out = s.schedule()  # position 8 needs a third block for each: the low-priority one goes
    assert [r.request_id for r in out.scheduled] == ["urgent"] and out.preempted_ids == ["low"]
    assert [r.request_id for r in s.waiting] == ["low", "low-later"]
    assert s.requests["low"].status == RequestStatus.PREEMPTED and s.requests["low"].num_computed_tokens == 0


def test_priority_victim_scheduled_earlier_gives_back_its_tokens() -> None:
    """Under "priority", a victim scheduled before the request that needs its blocks leaves the step: the step's
    token count no longer holds its tokens."""
    s = make_scheduler(num_blocks=5, block_size=4, budget=64, policy="priority")  # 4 usable blocks
    s.add_request(make_request("low", 5, max_tokens=8, priority=2, arrival=0.0))
    assert step(s) == {"low": 5}
    s.add_request(make_request("urgent", 8, max_tokens=8, priority=0, arrival=1.0, first=100))
    assert step(s) == {"low": 1, "urgent": 8}  # 2 blocks each: the pool is full
    assert [r.request_id for r in s.running] == ["low", "urgent"]
    out = s.schedule()  # low's position 6 fits; urgent's position 8 needs a block: low, scheduled first, goes
    assert [r.request_id for r in out.scheduled] == ["urgent"] and out.preempted_ids == ["low"]
    assert out.num_batched_tokens == 1 and s.requests["low"].num_computed_tokens == 0


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="scheduling_policy must be one of fcfs, priority; got 'lifo'"):
        make_scheduler(policy="lifo")
