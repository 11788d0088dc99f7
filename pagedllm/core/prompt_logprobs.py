"""Prompt logprobs (``SamplingParams.prompt_logprobs``): which rows of a step give them, and their values.

Position ``p`` of a prompt predicts prompt token ``p + 1``, so a step running positions ``start ..`` of a
request that asks for them wants the final hidden states of those rows too, not only of the row it samples
(:func:`prompt_logprob_rows` says which); :func:`compute_prompt_logprobs` runs the LM head over them a slice
at a time and turns them into the prompt tokens' logprobs, their ranks and the top alternatives, on the
device. The engine reads them back with the step's sampled tokens and the output
processor files them in ``Request.prompt_logprobs``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.core.host_copy import HostCopy
from pagedllm.core.scheduler import ScheduledRequest

LOG_SOFTMAX_ROWS = 1024
"""Rows of logits turned into log-probabilities at a time (float32 copies of ``[rows, vocab]``)."""


@dataclass(slots=True)
class PromptLogprobRows:
    """The rows of one step whose logits give prompt logprobs: one span per request, host arrays.

    Span ``i`` is request ``request_ids[i]``'s positions ``starts[i] ..`` (``counts[i]`` of them), at flat-batch
    rows ``rows[offsets[i] : offsets[i + 1]]``, predicting the prompt tokens ``targets`` at the same offsets.
    ``num_top``: the most alternatives any of them asked for.
    """

    request_ids: list[str]
    starts: list[int]
    counts: np.ndarray  # [num_spans] int64
    rows: np.ndarray  # [num_rows] int64
    targets: np.ndarray  # [num_rows] int64
    num_top: int


@dataclass(slots=True)
class PromptLogprobs(HostCopy):
    """The prompt logprobs of one step's :class:`PromptLogprobRows` (on the device, or their host copy being made).

    ``target_logprobs: [num_rows]`` float32, the log-probability of each prompt token; ``ranks: [num_rows]``
    int64 (1 = most likely); ``top_ids``/``top_logprobs``: ``[num_rows, num_top]`` (None when ``num_top`` is 0).
    """

    spans: PromptLogprobRows
    target_logprobs: torch.Tensor
    ranks: torch.Tensor
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None
    _copied: torch.Event | None = None  # recorded after the copies :meth:`start_copy` queued

    def start_copy(self) -> PromptLogprobs:
        """Queue the copies to the host and mark their end, without waiting (called right after the values are
        computed, so reading them back never waits for steps launched later); returns the host copy, to be
        read after :meth:`wait`."""
        def host(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to("cpu", non_blocking=True)  # into pinned memory on an accelerator

        device = self.target_logprobs.device
        copy = PromptLogprobs(self.spans, host(self.target_logprobs), host(self.ranks),  # type: ignore[arg-type]
                              host(self.top_ids), host(self.top_logprobs))
        copy._mark_copied(device)
        return copy


def prompt_logprob_rows(asking: Sequence[ScheduledRequest], first_rows: np.ndarray) -> PromptLogprobRows:
    """Build the step's :class:`PromptLogprobRows` from the scheduled requests that ask (each with its
    ``prompt_logprob_span``, ``prompt_logprob_targets`` and ``num_prompt_logprobs``) and the flat-batch row of
    each one's first token in the step. Called by the model runner while it prepares a step."""
    spans = [r.prompt_logprob_span for r in asking]
    counts = np.fromiter((b - a for a, b in spans), dtype=np.int64, count=len(spans))  # type: ignore[misc]
    rows = np.concatenate([np.arange(a - r.start_position, b - r.start_position, dtype=np.int64) + int(first)
                           for r, (a, b), first in zip(asking, spans, first_rows, strict=True)])  # type: ignore[misc]
    targets = np.fromiter((t for r in asking for t in r.prompt_logprob_targets),  # type: ignore[union-attr]
                          dtype=np.int64, count=int(counts.sum()))
    return PromptLogprobRows([r.request_id for r in asking], [a for a, _ in spans],  # type: ignore[misc]
                             counts, rows, targets, max(r.num_prompt_logprobs for r in asking))


@torch.inference_mode()
def compute_prompt_logprobs(logits_of: Callable[[int, int], torch.Tensor], spans: PromptLogprobRows
                            ) -> PromptLogprobs:
    """The prompt logprobs of ``spans``. ``logits_of(lo, hi)`` returns the logits ``[hi - lo, vocab]`` of its rows
    ``lo .. hi - 1`` (in ``spans.rows`` order): the LM head runs :data:`LOG_SOFTMAX_ROWS` rows at a time, so a
    long prompt chunk never holds all its rows' logits at once. Float32 log-softmax. Called by the model runner
    after the model's forward."""
    num_rows = len(spans.rows)
    targets = torch.from_numpy(spans.targets)
    parts: list[tuple[torch.Tensor, ...]] = []
    for lo in range(0, num_rows, LOG_SOFTMAX_ROWS):
        hi = min(lo + LOG_SOFTMAX_ROWS, num_rows)
        lp = torch.log_softmax(logits_of(lo, hi).float(), dim=-1)
        target_lp = lp.gather(1, targets[lo:hi, None].to(lp.device, non_blocking=True)).squeeze(1)
        ranks = (lp > target_lp[:, None]).sum(-1) + 1
        top = lp.topk(spans.num_top, dim=-1) if spans.num_top else None
        parts.append((target_lp, ranks) + ((top.indices, top.values) if top is not None else ()))
    columns = [torch.cat(column) for column in zip(*parts, strict=True)]
    return PromptLogprobs(spans, columns[0], columns[1], *(columns[2:] if spans.num_top else (None, None)))
