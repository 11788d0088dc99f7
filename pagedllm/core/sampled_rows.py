"""The rows of a step whose hidden states are sampled, so the model's last layer computes only those.

A decoder's last layer feeds nothing but the LM head, so only its keys and values are needed for every token
(the KV cache); its attention output, output projection, MLP and the final norm are needed only for the rows
the step samples (each request's last token of the step; none for a prompt chunk that does not end its
prompt). On a prefill-heavy step that is one row of hundreds: :class:`SampledRows` describes those rows to
the model, with attention metadata of one single-token query per row, which the backend answers like a batch
of decodes reading the cache the step has just written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.backends.interface import AttentionMetadata


@dataclass(slots=True)
class SampledRows:
    """The sampled rows of a step's flat batch, given to a model's ``forward`` as ``sampled``.

    ``indices``: ``[num_sampled]`` int64 on the device, the rows in the flat batch (ascending); ``metadata``:
    the attention batch of one query per row (``num_decodes == num_tokens == num_sampled``): row ``i``, at
    position ``p``, attends to its request's positions ``0..p`` through that request's block table.
    """

    indices: torch.Tensor
    metadata: AttentionMetadata

    def __len__(self) -> int:
        return int(self.indices.shape[0])


ALIGNMENT = 16
"""Bytes each array of a packed copy starts on: Triton specializes kernels on 16-byte aligned pointers, so an
unaligned slice would compile (mid-run) a variant of the attention kernels for it."""


def _packed(parts: list[np.ndarray], dtype: np.dtype, device: torch.device
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``parts`` (1-D) laid end to end in one host buffer of ``dtype``, each starting on :data:`ALIGNMENT`
    bytes, and copied to ``device`` at once; returns the parts' host views and their device views."""
    per_alignment = ALIGNMENT // np.dtype(dtype).itemsize
    starts = np.cumsum([0] + [-(-len(p) // per_alignment) * per_alignment for p in parts])[:-1]
    flat = np.zeros(int(starts[-1]) + len(parts[-1]), dtype=dtype)
    for part, start in zip(parts, starts, strict=True):
        flat[start : start + len(part)] = part
    host = torch.from_numpy(flat)
    dev = host.to(device, non_blocking=True)
    spans = [(int(start), int(start) + len(part)) for part, start in zip(parts, starts, strict=True)]
    return [host[a:b] for a, b in spans], [dev[a:b] for a, b in spans]


def sampled_rows(rows: np.ndarray, positions: np.ndarray, query_start: np.ndarray, metadata: AttentionMetadata,
                 device: torch.device) -> SampledRows:
    """Describe ``rows`` of a step's batch to its last layer.

    Called by the model runner while it prepares a step in which some rows are not sampled. ``rows``:
    ``[num_sampled]`` int64 flat-batch rows, ascending; ``positions``: ``[num_tokens]`` int64, each row's
    position; ``query_start``: ``[num_requests + 1]`` int64, prefix sums of the requests' new-token counts;
    ``metadata``: the step's attention batch (its block tables and slot mapping on ``device``). Returns the
    rows with their single-query metadata; two host-to-device copies.
    """
    num_rows = len(rows)
    request_of_row = np.searchsorted(query_start, rows, side="right") - 1
    seq_lens = positions[rows] + 1
    _, (row_indices, requests) = _packed([rows, request_of_row], np.int64, device)
    (query_start_cpu, seq_lens_cpu, _), (query_start_dev, seq_lens_dev, context_lens_dev) = _packed(
        [np.arange(num_rows + 1), seq_lens, seq_lens - 1], np.int32, device)
    return SampledRows(
        indices=row_indices,
        metadata=AttentionMetadata(
            num_tokens=num_rows,
            num_decodes=num_rows,
            query_start_loc=query_start_dev,
            seq_lens=seq_lens_dev,
            context_lens=context_lens_dev,
            block_tables=metadata.block_tables.index_select(0, requests),
            slot_mapping=metadata.slot_mapping.index_select(0, row_indices),
            max_query_len=1,
            max_seq_len=int(seq_lens.max()) if num_rows else 0,
            block_size=metadata.block_size,
            query_start_loc_cpu=query_start_cpu,
            seq_lens_cpu=seq_lens_cpu,
        ),
    )
