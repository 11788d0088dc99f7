"""A request as the scheduler sees it: tokens, progress, status and sampling parameters."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedllm.core.outputs import Logprob, RequestMetrics
from pagedllm.core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.core.lora.request import LoRARequest
    from pagedllm.core.pooling import PoolingParams
    from pagedllm.core.structured_output import GrammarMatcher

PENDING_TOKEN_ID = -1
"""Stands in a request's tokens for one sampled on the device whose value the host does not know yet
(asynchronous scheduling: the next step is scheduled and launched before this one's tokens are read)."""


class RequestStatus(enum.Enum):
    """Life of a request: WAITING -> RUNNING (-> PREEMPTED -> RUNNING ...) -> one FINISHED_* state."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        """True for the FINISHED_* states."""
        return self.value in ("stop", "length", "abort")


@dataclass(slots=True, eq=False)
class Request:
    """One sequence to generate. ``n > 1`` prompts become ``n`` Requests sharing prompt blocks.

    Invariant: ``num_computed_tokens <= num_tokens``; the tokens in ``[num_computed_tokens, num_tokens)``
    still have to go through the model (a whole prompt, a chunk, or the last sampled token). The exception: while
    a step that runs draft tokens (``spec_token_ids``, speculative decoding) is under way, ``num_computed_tokens``
    counts them too; reading the step back gives the rejected ones back.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    eos_token_ids: frozenset[int] = frozenset()
    cache_salt: str | None = None
    priority: int = 0  # under scheduling_policy "priority": lower runs first (vLLM's rule)
    lora_request: LoRARequest | None = None  # the adapter its tokens run through (EngineConfig.enable_lora)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    # with SamplingParams.prompt_logprobs: entry p for prompt token p (None for the first), filled as chunks run
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    cumulative_logprob: float = 0.0
    metrics: RequestMetrics | None = None
    parent_id: str | None = None
    index: int = 0
    # with SamplingParams.structured_outputs: this completion's place in its grammar (core/structured_output.py)
    structured: GrammarMatcher | None = None
    # prompt then generated tokens, appended as they are sampled (what the model runs and the cache hashes)
    all_token_ids: list[int] = field(default_factory=list)
    # the last token is PENDING_TOKEN_ID until the step that sampled it is read back
    has_pending_token: bool = False
    # a pooling request (LLMEngine.add_request with PoolingParams): its one sampled token is discarded, and the
    # embedding is pooled from its prompt's last final hidden state once the step computing it is read back
    pooling: PoolingParams | None = None
    embedding: list[float] | None = None
    # speculative decoding: the tokens proposed to follow, run (and checked) by the next step (core/spec_decode.py)
    spec_token_ids: list[int] = field(default_factory=list)
    # and its context as an int64 array, extended as tokens are appended (spec_decode.context_tokens): (buffer, filled)
    spec_context: tuple[Any, int] = (None, 0)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        if self.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]
        if self.metrics is None:
            self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens in the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.all_token_ids)

    @property
    def max_tokens(self) -> int:
        """The most tokens this request may generate (resolved by the engine; never None here)."""
        assert self.sampling_params.max_tokens is not None
        return self.sampling_params.max_tokens

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose values the host knows: all of them but a pending one."""
        return len(self.all_token_ids) - self.has_pending_token

    def append_output_token(self, token_id: int) -> None:
        """Record one sampled token; with a pending token, that one gets this value instead."""
        if self.has_pending_token:
            self.output_token_ids[-1] = self.all_token_ids[-1] = token_id
            self.has_pending_token = False
            return
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def append_pending_token(self) -> None:
        """Add the token being sampled on the device as :data:`PENDING_TOKEN_ID`, so the request can be
        scheduled for its next decode before the value is known (:meth:`append_output_token` fills it)."""
        assert not self.has_pending_token, "one pending token at a time"
        self.output_token_ids.append(PENDING_TOKEN_ID)
        self.all_token_ids.append(PENDING_TOKEN_ID)
        self.has_pending_token = True

    def prompt_logprob_span(self, start: int, num_new: int) -> tuple[int, int] | None:
        """The positions ``[a, b)`` of a step running tokens ``start .. start + num_new`` whose logits give a
        prompt logprob still missing (position ``p`` predicts prompt token ``p + 1``), or None."""
        if self.prompt_logprobs is None:
            return None
        a = max(start, len(self.prompt_logprobs) - 1)
        b = min(start + num_new, self.num_prompt_tokens - 1)
        return (a, b) if a < b else None

    @property
    def is_finished(self) -> bool:
        """True once a FINISHED_* status is set."""
        return self.status.is_finished
