"""The pool of KV blocks: reference counts, an LRU free list and the prefix-cache hash map."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import NewType

BlockId = NewType("BlockId", int)
BlockHash = NewType("BlockHash", int)

NULL_BLOCK_ID = BlockId(0)


def hash_block(parent: BlockHash | None, token_ids: Iterable[int], extra_key: object = None) -> BlockHash:
    """Chained identity of a full block: hash of (parent block's hash, its token ids, extra keys)."""
    return BlockHash(hash((parent, tuple(token_ids), extra_key)))


class BlockPool:
    """``num_blocks`` KV blocks; block 0 is the reserved null block (padding in block tables).

    Free blocks sit in an LRU list (``OrderedDict``, O(1) append/pop/remove): allocation takes the least
    recently freed first, so cached content freed long ago is evicted first. A freed block keeps its hash
    and stays findable by :meth:`lookup` until it is reallocated (evicted).
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[BlockHash | None] = [None] * num_blocks
        self.free_list: OrderedDict[BlockId, None] = OrderedDict((BlockId(i), None) for i in range(1, num_blocks))
        self.cached: dict[BlockHash, BlockId] = {}
        self.ref_counts[NULL_BLOCK_ID] = 1

    @property
    def num_usable_blocks(self) -> int:
        """Blocks requests can hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0 (cached or empty), all allocatable."""
        return len(self.free_list)

    def allocate(self, num_blocks: int) -> list[BlockId]:
        """Take ``num_blocks`` from the head of the free list (evicting their cached hashes), ref count 1.

        Raises ValueError if fewer are free: callers check :attr:`num_free_blocks` first.
        """
        if num_blocks > len(self.free_list):
            raise ValueError(f"cannot allocate {num_blocks} blocks: {len(self.free_list)} free")
        blocks = []
        for _ in range(num_blocks):
            block_id, _ = self.free_list.popitem(last=False)
            self._evict(block_id)
            self.ref_counts[block_id] = 1
            blocks.append(block_id)
        return blocks

    def touch(self, block_ids: Iterable[BlockId]) -> None:
        """Take one more reference on each block (prefix-cache hits); free ones leave the free list."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.free_list[block_id]
            self.ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[BlockId]) -> None:
        """Drop one reference on each block, in the given order; blocks reaching 0 join the free list's
        tail in that order (pass a request's blocks last-first so its tail is evicted first)."""
        for block_id in block_ids:
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] < 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            if self.ref_counts[block_id] == 0:
                self.free_list[block_id] = None

    def lookup(self, block_hash: BlockHash) -> BlockId | None:
        """Return the block holding content with this hash, or None."""
        return self.cached.get(block_hash)

    def cache(self, block_id: BlockId, block_hash: BlockHash) -> None:
        """Make a full block findable by its hash (if that content is not cached already)."""
        if not self.enable_caching or self.block_hashes[block_id] is not None:
            return
        if block_hash not in self.cached:
            self.cached[block_hash] = block_id
            self.block_hashes[block_id] = block_hash

    def _evict(self, block_id: BlockId) -> None:
        block_hash = self.block_hashes[block_id]
        if block_hash is not None:
            self.block_hashes[block_id] = None
            if self.cached.get(block_hash) == block_id:
                del self.cached[block_hash]

