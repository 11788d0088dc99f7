from __future__ import annotations

import pytest

from pagedllm.core.block_manager import BlockManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.sampling_params import SamplingParams


def make_request(request_id: str, tokens: list[int], max_tokens: int = 8) -> Request:
    return Request(request_id, tokens, SamplingParams(max_tokens=max_tokens), 0.0)


def test_slots_allocated_as_tokens_arrive() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    req = make_request("a", list(range(6)))
    assert bm.allocate_slots(req, 6) == [1, 2]
    req.num_computed_tokens = 6
    req.append_output_token(100)
    assert bm.allocate_slots(req, 1) == []  # position 6 still fits block 2
    req.num_computed_tokens = 7
    req.append_output_token(101)
    assert bm.allocate_slots(req, 1) == []
    req.num_computed_tokens = 8
    req.append_output_token(102)
    assert bm.allocate_slots(req, 1) == [3]  # position 8 opens a new block
    assert bm.get_block_table("a") == [1, 2, 3]


def test_block_filled_by_decodes_is_cached_for_later_prompts() -> None:
    """Decodes that stay inside the last block allocate nothing; the one that fills it registers its hash."""
    bm = BlockManager(num_blocks=10, block_size=4)
    req = make_request("a", list(range(6)))
    bm.allocate_slots(req, 6)
    req.num_computed_tokens = 6
    for token in (100, 101):  # positions 6 and 7: the second completes block 2
        req.append_output_token(token)
        assert bm.allocate_slots(req, 1) == []
        req.num_computed_tokens += 1
    follower = make_request("b", [*range(6), 100, 101, 7])
    hits, num_computed = bm.get_computed_blocks(follower)
    assert hits == [1, 2] and num_computed == 8


def test_prefix_hit_shares_full_blocks_and_leaves_last_token() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_request("a", list(range(10)))
    bm.allocate_slots(a, 10)
    b = make_request("b", [*list(range(8)), 50, 51, 52])
    hits, num_computed = bm.get_computed_blocks(b)
    assert hits == [1, 2] and num_computed == 8
    assert bm.allocate_slots(b, 3, hits) == [4]
    assert bm.get_block_table("b") == [1, 2, 4]
    assert bm.pool.ref_counts[1] == 2 and bm.pool.ref_counts[2] == 2
    # an identical 8-token prompt reuses only the first block: its last token must be computed
    c = make_request("c", list(range(8)))
    hits, num_computed = bm.get_computed_blocks(c)
    assert hits == [1] and num_computed == 4


def test_freed_blocks_stay_cached_and_tail_is_evicted_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)  # usable 1..3
    a = make_request("a", [1, 2, 3, 4, 5, 6])
    bm.allocate_slots(a, 6)
    a.status = RequestStatus.FINISHED_STOPPED
    bm.free(a)
    assert bm.num_free_blocks == 3
    assert list(bm.pool.free_list) == [3, 2, 1]
    b = make_request("b", [1, 2, 3, 4, 9])
    hits, n = bm.get_computed_blocks(b)
    assert hits == [1, 2] and n == 4
    assert bm.allocate_slots(b, 1, hits) == [3]  # evicts a's tail block


def test_allocation_failure_changes_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a = make_request("a", [1, 2, 3])
    assert bm.allocate_slots(a, 3) == [1, 2]
    b = make_request("b", [7, 8])
    assert not bm.can_allocate(b, 2, [])
    assert bm.allocate_slots(b, 2) is None
    assert bm.get_block_table("b") == [] and bm.num_free_blocks == 0


def test_abort_frees_everything_no_leak() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    reqs = [make_request(str(i), list(range(i * 10, i * 10 + 7))) for i in range(3)]
    for r in reqs:
        assert bm.allocate_slots(r, 7) is not None
    assert bm.usage() == pytest.approx(6 / 7)
    for r in reqs:
        r.status = RequestStatus.FINISHED_ABORTED
        bm.free(r)
    assert bm.usage() == 0.0 and bm.block_tables == {}
    assert all(bm.pool.ref_counts[b] == 0 for b in range(1, 8))


def test_prefix_caching_off_gives_no_hits() -> None:
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    bm.allocate_slots(a, 9)
    b = make_request("b", list(range(9)))
    assert bm.get_computed_blocks(b) == ([], 0)


def test_waste_counts_unfilled_tail_slots() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_request("a", list(range(5)))
    bm.allocate_slots(a, 5)
    assert bm.num_wasted_slots({"a": 5}) == 3
