"""Replayable decode steps: the model's forward for pure-decode batches recorded once per batch-size bucket.

Used only when the backend's capabilities say it can capture graphs (CUDA/HIP graphs, ...) and
``enforce_eager`` is off. Inputs live in static device buffers; a step of ``n`` decodes is padded to the
smallest bucket ``>= n``: padding rows read the null block (block 0) with ``seq_len`` 1 and write nothing
(slot -1), so their results are garbage that is never read. The recorded step ends with the LM head, so a
replay yields the logits of every row; when the LM head's all-gather cannot be recorded (tensor parallelism
without a communicator that gathers) it ends with the final norm instead, and the LM head runs eagerly on the
replay's hidden states.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pagedllm.backends.interface import AttentionMetadata, Backend

if TYPE_CHECKING:
    from pagedllm.core.lora.manager import LoRAManager

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch-size buckets: 1, 2, 4, 8, then every 8 up to 256, then every 16, capped at ``max_num_seqs``."""
    sizes = [1, 2, 4, *range(8, 257, 8), *range(272, 1025, 16)]
    capped = [s for s in sizes if s <= max_num_seqs]
    if not capped or capped[-1] < max_num_seqs <= 1024:
        capped.append(max_num_seqs)
    return capped


class DecodeGraphRunner:
    """Static buffers plus one recorded graph per bucket; :meth:`run` replays the right one.

    A graph records the whole decode step up to the logits (the LM head included, unless ``with_logits`` is
    False), so one replay is the step's only launch besides two host-to-device copies of its inputs:
    ``int64 [3, max_bs]`` (input ids, positions, slots) and one flat ``int32`` buffer holding
    ``seq_lens [max_bs]``, ``context_lens [max_bs]`` then the block tables ``[max_bs, max_blocks_per_seq]``
    (a bucket's rows are a prefix of it).
    """

    def __init__(
        self, model: nn.Module, backend: Backend, device: torch.device, block_size: int,
        max_blocks_per_seq: int, max_num_seqs: int, with_logits: bool = True, lora: LoRAManager | None = None,
    ) -> None:
        self.model = model
        self.lora = lora  # with LoRA adapters: the graphs read each row's slot from a static buffer
        self.with_logits = with_logits
        self.backend = backend
        self.block_size = block_size
        self.sizes = capture_sizes(max_num_seqs)
        max_bs = self.max_bs = self.sizes[-1]
        self.max_blocks_per_seq = max_blocks_per_seq

        # device side: every static input is a view of one of two buffers
        self.i64 = torch.zeros(3, max_bs, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.i64[0], self.i64[1], self.i64[2]
        self.i32 = torch.zeros(2 * max_bs + max_bs * max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = self.i32[:max_bs]
        self.context_lens = self.i32[max_bs : 2 * max_bs]
        self.block_tables = self.i32[2 * max_bs :].view(max_bs, max_blocks_per_seq)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.lora_rows = lora.graph_rows(max_bs) if lora is not None else None
        # what the graphs end with: logits [max_bs, vocab], or hidden states [max_bs, hidden] when the LM head
        # runs after the replay; allocated by the first (largest) capture
        self.outputs: torch.Tensor | None = None
        self.graphs: dict[int, Callable[[], None]] = {}
        # host staging, reused each step (pinned where the device supports it, for async copies); the copies
        # of one step are complete before the next step writes here (the step's sampling waits for them)
        pin = device.type != "cpu"
        self.host_i64 = torch.zeros(3, max_bs, dtype=torch.int64, pin_memory=pin)
        self.host_i32 = torch.zeros(self.i32.shape[0], dtype=torch.int32, pin_memory=pin)
        self._host_i64 = self.host_i64.numpy()
        self._host_i32 = self.host_i32.numpy()
        self._host_tables = self._host_i32[2 * max_bs :].reshape(max_bs, max_blocks_per_seq)

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
                if self.lora is not None:
                    assert self.lora_rows is not None
                    self.lora.state.onehot = self.lora_rows[:bs]
                out = self.model(self.input_ids[:bs], self.positions[:bs], md)
                if self.with_logits:
                    out = self.model.compute_logits(out)
                if self.outputs is None:  # the first (largest) bucket's warm-up: allocate outside any graph
                    self.outputs = torch.empty((self.max_bs, out.shape[-1]), dtype=out.dtype, device=out.device)
                self.outputs[:bs] = out

            self.graphs[batch_size] = self.backend.capture_graph(step)
        logger.info("captured decode graphs for %d batch sizes up to %d", len(self.sizes), self.max_batch_size)

    def run(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, block_tables: np.ndarray,
            pending: tuple[torch.Tensor, torch.Tensor] | None = None, *, lora_rows: np.ndarray | None = None
            ) -> torch.Tensor:
        """Replay the bucket for ``n = len(input_ids)`` decodes; returns the logits ``[n, vocab]`` of every
        row (a view of the static buffer, valid until the next replay).

        ``block_tables``: ``[n, width]`` int32 with ``width <= max_blocks_per_seq``; the others ``[n]`` int64.
        ``pending``: ``(rows, token_ids)`` on the device, written over ``input_ids`` before the replay
        (tokens the host does not know yet: :meth:`ModelRunner.pending_token_ids`). ``lora_rows``: with LoRA, the
        rows' one-hot adapter slots ``[n, max_loras]`` (:meth:`LoRAManager.rows`; None: no adapter).
        """
        n = len(input_ids)
        bucket = self.sizes[bisect.bisect_left(self.sizes, n)]
        max_bs = self.max_bs
        i64, i32 = self._host_i64, self._host_i32
        i64[0, :n], i64[1, :n], i64[2, :n] = input_ids, positions, slots
        i64[:, n:bucket] = np.array([[0], [0], [-1]])  # padding rows: token 0 at position 0, nothing written
        i32[:n] = positions + 1
        i32[n:bucket] = 1  # padding rows attend to one key of the null block
        i32[max_bs : max_bs + n] = positions
        i32[max_bs + n : max_bs + bucket] = 0
        tables = self._host_tables
        width = block_tables.shape[1]
        tables[:n, :width] = block_tables
        tables[:n, width:] = 0
        tables[n:bucket] = 0
        self.i64.copy_(self.host_i64, non_blocking=True)
        end = 2 * max_bs + bucket * self.max_blocks_per_seq
        self.i32[:end].copy_(self.host_i32[:end], non_blocking=True)
        if pending is not None:
            self.input_ids.index_copy_(0, *pending)
        if self.lora_rows is not None:
            rows = np.zeros((bucket, self.lora_rows.shape[1]), dtype=np.float32)
            if lora_rows is not None:
                rows[:n] = lora_rows
            self.lora_rows[:bucket].copy_(torch.from_numpy(rows), non_blocking=True)
        self.graphs[bucket]()
        assert self.outputs is not None
        return self.outputs[:n] if self.with_logits else self.model.compute_logits(self.outputs[:n])
