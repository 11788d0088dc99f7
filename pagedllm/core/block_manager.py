"""Per-request block tables over the :class:`BlockPool`, with prefix caching by chained block hashes."""

from __future__ import annotations

from pagedllm.core.block_pool import BlockHash, BlockId, BlockPool, hash_block
from pagedllm.core.request import Request


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


class BlockManager:
    """Owns every request's block table; slots are allocated as tokens arrive, never for max length.

    ``BlockManager(num_blocks, block_size)`` is testable alone: tests drive it with tiny Requests.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.block_tables: dict[str, list[BlockId]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}
        self._num_cached_blocks: dict[str, int] = {}
        self.num_prefix_queries_tokens = 0
        self.num_prefix_hit_tokens = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now."""
        return self.pool.num_free_blocks

    def usage(self) -> float:
        """Fraction of usable blocks held by requests (0.0 when the pool is all free)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_usable_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return cdiv(num_tokens, self.block_size)

    def get_block_table(self, request_id: str) -> list[BlockId]:
        """The block ids of a request, in token order."""
        return self.block_tables.get(request_id, [])

    def num_wasted_slots(self, num_tokens_by_request: dict[str, int]) -> int:
        """Allocated slots that hold no token, given each running request's tokens in cache."""
        return sum(
            len(self.block_tables.get(rid, [])) * self.block_size - n for rid, n in num_tokens_by_request.items()
        )

    # ------------------------------------------------------------------ prefix cache
    def _block_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of the request's full blocks, extended incrementally as tokens arrive."""
        hashes = self._hashes.setdefault(request.request_id, [])
        tokens = request.all_token_ids
        num_full = request.num_known_tokens // self.block_size  # a block with a pending token waits
        while len(hashes) < num_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            chunk = tokens[i * self.block_size : (i + 1) * self.block_size]
            hashes.append(hash_block(parent, chunk, request.cache_salt))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[BlockId], int]:
        """Find the longest run of cached full blocks that starts the request's tokens.

        At least the last token is always left to compute (the model must produce its logits); a request
        asking for prompt logprobs computes its whole prompt (every position's logits are wanted). Returns
        ``(block_ids, num_computed_tokens)``; nothing is reserved until :meth:`allocate_slots`.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        hashes = self._block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[BlockId] = []
        for block_hash in hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        self.num_prefix_queries_tokens += request.num_tokens
        self.num_prefix_hit_tokens += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    # ------------------------------------------------------------------ allocation
    def can_allocate(self, request: Request, num_new_tokens: int, computed_blocks: list[BlockId]) -> bool:
        """Tell whether :meth:`allocate_slots` would succeed for these arguments."""
        _, num_needed = self._blocks_needed(request, num_new_tokens, computed_blocks)
        return num_needed <= self._num_allocatable(computed_blocks)

    def _blocks_needed(self, request: Request, num_new_tokens: int, computed_blocks: list[BlockId]
                       ) -> tuple[int, int]:
        """``(tokens the request holds after this step, new blocks that takes)``; the second may be <= 0."""
        total = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        table = self.block_tables.get(request.request_id, ())
        return total, self.blocks_for(total) - len(table) - len(computed_blocks)

    def _num_allocatable(self, computed_blocks: list[BlockId]) -> int:
        """Free blocks left to allocate once ``computed_blocks`` are taken: cache hits sitting in the free
        list stop being allocatable when touched."""
        return self.pool.num_free_blocks - sum(1 for b in computed_blocks if self.pool.ref_counts[b] == 0)

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[BlockId] | None = None
    ) -> list[BlockId] | None:
        """Give the request slots for ``num_new_tokens`` more tokens after its computed ones.

        ``computed_blocks`` are prefix-cache hits from :meth:`get_computed_blocks` (first allocation
        only); they are shared (ref count + 1). Full blocks this step completes are registered in the
        prefix cache. Returns the newly allocated block ids, or None (and changes nothing) when the pool
        has too few free blocks.
        """
        computed_blocks = computed_blocks or []
        total, num_needed = self._blocks_needed(request, num_new_tokens, computed_blocks)
        # most decodes fit the table as it is and touch nothing shared: no need to ask the pool
        if (num_needed > 0 or computed_blocks) and num_needed > self._num_allocatable(computed_blocks):
            return None
        table = self.block_tables.setdefault(request.request_id, [])
        if computed_blocks:
            self.pool.touch(computed_blocks)
            table.extend(computed_blocks)
        new_blocks = self.pool.allocate(num_needed) if num_needed > 0 else []
        table.extend(new_blocks)
        start = self._num_cached_blocks.get(request.request_id, 0)
        if self.enable_prefix_caching and total // self.block_size > start:  # this step fills a block
            hashes = self._block_hashes(request)
            num_full = min(total // self.block_size, len(hashes))
            for i in range(start, num_full):
                self.pool.cache(table[i], hashes[i])
            self._num_cached_blocks[request.request_id] = max(start, num_full)
        return new_blocks

    def free(self, request: Request) -> None:
        """Return the request's blocks to the pool, tail first (finish, abort or preemption)."""
        table = self.block_tables.pop(request.request_id, [])
        self.pool.free(reversed(table))
        self._num_cached_blocks.pop(request.request_id, None)
        if request.is_finished:
            self._hashes.pop(request.request_id, None)
