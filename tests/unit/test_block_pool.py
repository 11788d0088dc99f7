from __future__ import annotations

import pytest

from pagedllm.core.block_pool import BlockPool, hash_block


def test_allocate_takes_lowest_ids_first_and_skips_null_block() -> None:
    pool = BlockPool(6)
    assert pool.num_usable_blocks == 5
    assert pool.allocate(3) == [1, 2, 3]
    assert pool.num_free_blocks == 2
    assert [pool.ref_counts[b] for b in (1, 2, 3)] == [1, 1, 1]


def test_free_appends_in_given_order_lru() -> None:
    pool = BlockPool(6)
    blocks = pool.allocate(5)
    pool.free(reversed(blocks[:3]))  # tail first: 3, 2, 1
    assert list(pool.free_list) == [3, 2, 1]
    assert pool.allocate(2) == [3, 2]


def test_shared_block_needs_every_reference_freed() -> None:
    pool = BlockPool(4)
    (block,) = pool.allocate(1)
    pool.touch([block])
    assert pool.ref_counts[block] == 2
    pool.free([block])
    assert block not in pool.free_list
    pool.free([block])
    assert block in pool.free_list
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([block])


def test_cached_block_found_until_evicted_by_reallocation() -> None:
    pool = BlockPool(3)  # usable: 1, 2
    a, b = pool.allocate(2)
    h = hash_block(None, [1, 2, 3, 4])
    pool.cache(a, h)
    assert pool.lookup(h) == a
    pool.free([a])
    assert pool.lookup(h) == a  # freed but still cached
    pool.touch([a])  # a cache hit revives it
    assert pool.ref_counts[a] == 1 and a not in pool.free_list
    pool.free([a, b])
    assert pool.allocate(1) == [a]  # a is the least recently freed: evicted first
    assert pool.lookup(h) is None


def test_chained_hash_depends_on_parent_and_salt() -> None:
    tokens = [5, 6, 7, 8]
    assert hash_block(None, tokens) == hash_block(None, tokens)
    assert hash_block(None, tokens) != hash_block(hash_block(None, [1, 2, 3, 4]), tokens)
    assert hash_block(None, tokens) != hash_block(None, tokens, "salt")


def test_caching_disabled_registers_nothing() -> None:
    pool = BlockPool(3, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache(a, hash_block(None, [1]))
    assert pool.cached == {}
