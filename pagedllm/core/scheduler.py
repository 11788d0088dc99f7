"""Continuous batching under a token budget, with chunked prefill, prefix caching and preemption."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from pagedllm.core.block_manager import BlockManager
from pagedllm.core.config import SCHEDULING_POLICIES, check_choice
from pagedllm.core.lora.request import LoRARequest
from pagedllm.core.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: the tokens to run and where their KV goes.

    ``token_ids`` are the ``num_new_tokens`` tokens at positions ``start_position ...``; ``block_ids`` is
    the request's whole block table; ``needs_sample`` is True when this step reaches the request's last
    token, so a new token is sampled from its logits. ``token_from_row`` set (asynchronous scheduling):
    the last of ``token_ids`` is :data:`~pagedllm.core.request.PENDING_TOKEN_ID`, its value is row
    ``token_from_row`` of the previous step's sampled tokens, still on the device; set by the engine.
    ``draft_token_ids`` (speculative decoding): the last of ``token_ids``, run after the request's last token;
    the step samples at each of their positions too.
    """

    request_id: str
    token_ids: list[int]
    start_position: int
    block_ids: list[int]
    needs_sample: bool
    token_from_row: int | None = None
    prompt_logprob_span: tuple[int, int] | None = None
    prompt_logprob_targets: list[int] | None = None
    num_prompt_logprobs: int = 0
    pools: bool = False  # a pooling request (embedding) at its prompt's last token: its final hidden state is kept
    lora: LoRARequest | None = None  # the request's adapter, if any
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def num_new_tokens(self) -> int:
        """Tokens of this request in the step."""
        return len(self.token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    """What one step runs: the scheduled requests (in schedule order) and what changed."""

    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """True when nothing runs this step."""
        return not self.scheduled


def priority_key(request: Request) -> tuple[int, float]:
    """The order of ``"priority"`` scheduling: lower ``priority`` first, then earlier arrival."""
    return request.priority, request.arrival_time


class Scheduler:
    """Continuous-batching scheduler over a :class:`BlockManager`.

    Takes scalars, not a config: ``max_num_seqs`` caps running requests, ``max_num_batched_tokens`` caps
    the tokens of one step, ``max_model_len`` caps prompt + output, ``enable_chunked_prefill`` allows
    splitting a prompt across steps. ``policy`` (vLLM's ``scheduling_policy``): ``"fcfs"`` admits waiting
    requests in arrival order and preempts the newest running one when the pool runs dry; ``"priority"``
    admits them by :func:`priority_key` and preempts the running request that key puts last. ``max_loras``: at
    most this many distinct LoRA adapters among the running requests; a waiting request whose adapter would be
    one too many is passed over (it keeps its place) for the next ones.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
        policy: str = "fcfs",
        max_loras: int = 0,
    ) -> None:
        check_choice("scheduling_policy", policy, SCHEDULING_POLICIES)
        self.policy = policy
        self.max_loras = max_loras  # distinct adapters among the running requests at most (0: no adapters)
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ admission
    def check_request(self, request: Request) -> None:
        """Raise ValueError if the request can never run (too long for the model or for the whole pool)."""
        total = request.num_prompt_tokens + request.max_tokens
        if request.num_prompt_tokens == 0:
            raise ValueError("the prompt is empty: at least one token is needed")
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens ({request.max_tokens}) = {total} "
                f"exceeds the maximum model length {self.max_model_len}; shorten the prompt or lower max_tokens"
            )
        needed = self.block_manager.blocks_for(total)
        usable = self.block_manager.pool.num_usable_blocks
        if needed > usable:
            raise ValueError(
                f"the request needs {needed} KV blocks ({total} tokens) but the whole pool has {usable}; "
                f"raise kv_cache_memory_bytes or lower max_tokens"
            )
        if not self.enable_chunked_prefill and request.num_prompt_tokens > self.max_num_batched_tokens:
            raise ValueError(
                f"prompt of {request.num_prompt_tokens} tokens exceeds max_num_batched_tokens "
                f"{self.max_num_batched_tokens} and chunked prefill is off"
            )

    def add_request(self, request: Request) -> None:
        """Queue a request (last, or by :func:`priority_key` under ``"priority"``) after :meth:`check_request`
        accepted it."""
        self.check_request(request)
        if self.policy == "priority":
            self.waiting.insert(bisect.bisect_right(self.waiting, priority_key(request), key=priority_key), request)
        else:
            self.waiting.append(request)
        self.requests[request.request_id] = request

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """End requests (stop, length or abort): drop them from the queues and free their blocks."""
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            request.status = status
            self.block_manager.free(request)
            self._finished_ids.append(request_id)

    def has_unfinished_requests(self) -> bool:
        """True while any request waits or runs."""
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> SchedulerOutput:
        """Choose the requests and token counts of the next step and reserve their slots.

        Invariant: there are no prefill and decode phases. Each request's ``num_computed_tokens`` catches
        up with its ``num_tokens``: a prefill is a request far behind, a decode one token behind, a
        chunked prefill a prefill cut by the token budget. Running requests go first (in admission
        order); when the pool runs dry a running request is preempted (the newest, or under ``"priority"``
        the last by :func:`priority_key`, even one scheduled earlier in the step; blocks freed, queued again,
        recomputed later). Waiting requests are admitted in queue order while budget, ``max_num_seqs`` and
        blocks allow, and not at all in a step that preempted.
        """
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[str] = []
        drafts_of: dict[str, list[int]] = {}

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            drafts = request.spec_token_ids[: budget - 1] if num_new == 1 else []
            request.spec_token_ids = []
            if drafts and self.block_manager.allocate_slots(request, 1 + len(drafts)) is not None:
                drafts_of[request.request_id] = drafts  # else it decodes one token, as without drafts
                scheduled.append((request, 1 + len(drafts)))
                budget -= 1 + len(drafts)
                i += 1
                continue
            if not self.enable_chunked_prefill and num_new < request.num_tokens - request.num_computed_tokens:
                break
            while self.block_manager.allocate_slots(request, num_new) is None:
                victim = self.running[-1] if self.policy == "fcfs" else max(self.running, key=priority_key)
                position = self.running.index(victim)
                self.running.pop(position)
                if position < i:  # scheduled earlier in this step (a lower priority): its tokens come back
                    index = next(k for k, (r, _) in enumerate(scheduled) if r is victim)
                    budget += scheduled.pop(index)[1]
                    i -= 1
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append((request, num_new))
                budget -= num_new
                i += 1

        adapters = {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}
        skipped: list[Request] = []  # waiting requests whose adapter would exceed max_loras: they keep their place
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            lora = request.lora_request
            if lora is not None and lora.lora_int_id not in adapters and len(adapters) >= self.max_loras:
                skipped.append(self.waiting.popleft())
                continue
            hits, num_cached = self.block_manager.get_computed_blocks(request)
            num_new = request.num_tokens - num_cached
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            if self.block_manager.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append((request, num_new))
            budget -= num_new
            if lora is not None:
                adapters.add(lora.lora_int_id)
        self.waiting.extendleft(reversed(skipped))

        out = SchedulerOutput(
            scheduled=[self._scheduled(request, num_new, drafts_of.get(request.request_id, []))
                       for request, num_new in scheduled],
            num_batched_tokens=self.max_num_batched_tokens - budget,
            preempted_ids=preempted,
            finished_ids=self._finished_ids,
        )
        self._finished_ids = []
        return out

    def _scheduled(self, request: Request, num_new: int, drafts: list[int]) -> ScheduledRequest:
        start = request.num_computed_tokens
        request.num_computed_tokens += num_new
        span = request.prompt_logprob_span(start, num_new)
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start : start + num_new - len(drafts)] + drafts,
            start_position=start,
            block_ids=list(self.block_manager.get_block_table(request.request_id)),
            needs_sample=request.num_computed_tokens >= request.num_tokens,
            prompt_logprob_span=span,
            prompt_logprob_targets=None if span is None else request.prompt_token_ids[span[0] + 1 : span[1] + 1],
            num_prompt_logprobs=request.sampling_params.prompt_logprobs or 0,
            pools=request.pooling is not None and request.num_computed_tokens == request.num_prompt_tokens,
            lora=request.lora_request,
            draft_token_ids=drafts,
        )

    def _preempt(self, request: Request) -> None:
        """Free a running request's blocks and queue it again: first (``"fcfs"``), or before the waiting requests
        its key does not put after (``"priority"``); it is recomputed when admitted."""
        self.block_manager.free(request)
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        if self.policy == "priority":
            self.waiting.insert(bisect.bisect_left(self.waiting, priority_key(request), key=priority_key), request)
        else:
            self.waiting.appendleft(request)
