"""Replayable decode steps: the model's forward for pure-decode batches recorded once per batch-size bucket.

Used only when the backend's capabilities say it can capture graphs (CUDA/HIP graphs, ...) and
``enforce_eager`` is off. Inputs live in static device buffers; a step of ``n`` decodes is padded to the
smallest bucket ``>= n``: padding rows read the null block (block 0) with ``seq_len`` 1 and write nothing
(slot -1), so their results are garbage that is never read.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from pagedllm.backends.interface import AttentionMetadata, Backend

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch-size buckets: 1, 2, 4, 8, then every 8 up to 256, then every 16, capped at ``max_num_seqs``."""
    sizes = [1, 2, 4, *range(8, 257, 8), *range(272, 1025, 16)]
    capped = [s for s in sizes if s <= max_num_seqs]
    if not capped or capped[-1] < max_num_seqs <= 1024:
        capped.append(max_num_seqs)
    return capped


class DecodeGraphRunner:
    """Static buffers plus one recorded graph per bucket; :meth:`run` replays the right one."""

    def __init__(
        self, model: nn.Module, backend: Backend, device: torch.device, block_size: int,
        max_blocks_per_seq: int, max_num_seqs: int, hidden_size: int, dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.sizes = capture_sizes(max_num_seqs)
        max_bs = self.sizes[-1]
        self.max_blocks_per_seq = max_blocks_per_seq

        def zeros(*shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.input_ids = zeros(max_bs, dtype=torch.int64)
        self.positions = zeros(max_bs, dtype=torch.int64)
        self.slot_mapping = zeros(max_bs, dtype=torch.int64)
        self.seq_lens = zeros(max_bs)
        self.context_lens = zeros(max_bs)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.block_tables = zeros(max_bs, max_blocks_per_seq)
        self.hidden = torch.zeros(max_bs, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, Callable[[], None]] = {}
        # staging on the host, reused each step (pinned where the device supports it, for async copies)
        pin = device.type != "cpu"
        self.host = torch.zeros(4, max_bs, dtype=torch.int64, pin_memory=pin)
        self.host_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)

    @property
    def max_batch_size(self) -> int:
        """Largest decode batch served by a graph."""
        return self.sizes[-1]

    def _metadata(self, batch_size: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_tokens=batch_size,
            num_decodes=batch_size,
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            context_lens=self.context_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            slot_mapping=self.slot_mapping[:batch_size],
            max_query_len=1,
            max_seq_len=self.max_blocks_per_seq * self.block_size,
            block_size=self.block_size,
            query_start_loc_cpu=torch.arange(batch_size + 1, dtype=torch.int32),
            seq_lens_cpu=torch.ones(batch_size, dtype=torch.int32),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per bucket, largest first (so smaller ones reuse its memory pool)."""
        self.seq_lens.fill_(1)
        self.slot_mapping.fill_(-1)
        for batch_size in reversed(self.sizes):
            metadata = self._metadata(batch_size)

            def step(bs: int = batch_size, md: AttentionMetadata = metadata) -> None:
                self.hidden[:bs] = self.model(self.input_ids[:bs], self.positions[:bs], md)

            self.graphs[batch_size] = self.backend.capture_graph(step)
        logger.info("captured decode graphs for %d batch sizes up to %d", len(self.sizes), self.max_batch_size)

    def run(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, block_tables: np.ndarray
            ) -> torch.Tensor:
        """Replay the bucket for ``n = len(input_ids)`` decodes; returns hidden states ``[n, hidden]``.

        ``block_tables``: ``[n, max_blocks_per_seq]`` int32; the others ``[n]`` int64.
        """
        n = len(input_ids)
        bucket = self.sizes[bisect.bisect_left(self.sizes, n)]
        host = self.host[:, :bucket].numpy()
        host[0, :n], host[1, :n], host[2, :n], host[3, :n] = input_ids, positions, slots, positions + 1
        host[:, n:bucket] = np.array([[0], [0], [-1], [1]])
        tables = self.host_tables[:bucket].numpy()
        tables[:n] = block_tables
        tables[n:] = 0
        staged = self.host[:, :bucket].to(self.input_ids.device, non_blocking=True)
        self.input_ids[:bucket].copy_(staged[0], non_blocking=True)
        self.positions[:bucket].copy_(staged[1], non_blocking=True)
        self.slot_mapping[:bucket].copy_(staged[2], non_blocking=True)
        self.seq_lens[:bucket].copy_(staged[3], non_blocking=True)
        self.context_lens[:bucket].copy_(staged[1], non_blocking=True)
        self.block_tables[:bucket].copy_(self.host_tables[:bucket], non_blocking=True)
        self.graphs[bucket]()
        return self.hidden[:n]
