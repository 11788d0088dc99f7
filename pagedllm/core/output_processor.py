"""After each step: append sampled tokens, detokenize incrementally, check stops, build RequestOutputs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from pagedllm.core.detokenizer import IncrementalDetokenizer, find_stop_string
from pagedllm.core.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.core.pooling import EmbeddingOutput, EmbeddingRequestOutput, PooledRows
from pagedllm.core.prompt_logprobs import PromptLogprobs
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.sampler import SamplerOutput

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ParentRequest:
    """A user request: its prompt and the ``n`` child :class:`Request` s sampling completions of it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    completions: list[CompletionOutput] = field(default_factory=list)
    detokenizers: list[IncrementalDetokenizer] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """True once every child is finished."""
        return all(c.is_finished for c in self.children)


class OutputProcessor:
    """Owns the user-facing state of requests; the engine calls it once per step."""

    def __init__(self, tokenizer: object, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.parents: dict[str, ParentRequest] = {}
        self.parent_of: dict[str, ParentRequest] = {}

    def add(self, parent: ParentRequest) -> None:
        """Track a new user request and its children."""
        for child in parent.children:
            params = child.sampling_params
            parent.completions.append(CompletionOutput(child.index, "", [], None if params.logprobs is None
                                                       else 0.0, [] if params.logprobs is not None else None))
            parent.detokenizers.append(IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens))
            if self.tokenizer is None:
                params.detokenize = False
            self.parent_of[child.request_id] = parent
        self.parents[parent.request_id] = parent

    def process(self, request_ids: list[str], sampled: SamplerOutput, requests: dict[str, Request],
                rows: list[int] | None = None) -> list[tuple[Request, RequestStatus]]:
        """Record the sampled tokens: ``request_ids[i]`` gets row ``rows[i]`` of ``sampled`` (default: row ``i``);
        a request may get several, in order (accepted draft tokens), and none after one that finished it. Ids no
        longer in ``requests`` are skipped. Returns the requests these tokens finished, with their final status."""
        now = time.monotonic()
        finished: list[tuple[Request, RequestStatus]] = []
        done: set[str] = set()
        for row, request_id in zip(range(len(request_ids)) if rows is None else rows, request_ids, strict=True):
            request = requests.get(request_id)
            if request is None or request_id in done:  # aborted after its step was launched, or finished here
                continue
            token_id = sampled.token_ids[row]
            request.append_output_token(token_id)
            metrics = request.metrics
            assert metrics is not None
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
            parent = self.parent_of[request_id]
            completion = parent.completions[request.index]
            completion.token_ids.append(token_id)
            if sampled.sampled_logprobs is not None and completion.logprobs is not None:
                self._add_logprobs(completion, request, row, token_id, sampled)
            status = self._check_stop(request, parent, token_id)
            if status is not None:
                finished.append((request, status))
                done.add(request_id)
        return finished

    def _add_logprobs(self, completion: CompletionOutput, request: Request, row: int, token_id: int,
                      sampled: SamplerOutput) -> None:
        assert sampled.sampled_logprobs is not None and sampled.sampled_ranks is not None
        num = request.sampling_params.logprobs or 0
        entry: dict[int, Logprob] = {}
        if num and sampled.top_token_ids is not None and sampled.top_logprobs is not None:
            ids = sampled.top_token_ids[row, :num].tolist()
            values = sampled.top_logprobs[row, :num].tolist()
            for rank, (tid, lp) in enumerate(zip(ids, values, strict=True), start=1):
                entry[tid] = Logprob(lp, rank, self._token_text(tid))
        lp = float(sampled.sampled_logprobs[row])
        entry[token_id] = Logprob(lp, int(sampled.sampled_ranks[row]), self._token_text(token_id))
        assert completion.logprobs is not None
        completion.logprobs.append(entry)
        completion.cumulative_logprob = (completion.cumulative_logprob or 0.0) + lp

    def add_prompt_logprobs(self, prompt: PromptLogprobs, requests: dict[str, Request]) -> None:
        """File one step's prompt logprobs (host tensors) in ``Request.prompt_logprobs``: per position, the
        prompt token's logprob and rank and its request's ``prompt_logprobs`` top alternatives. Positions
        already filed (a prompt computed again after a preemption) and requests gone are skipped."""
        spans = prompt.spans
        offsets = np.concatenate([[0], np.cumsum(spans.counts)]).tolist()
        values, ranks = prompt.target_logprobs.tolist(), prompt.ranks.tolist()
        top_ids = prompt.top_ids.tolist() if prompt.top_ids is not None else None
        top_values = prompt.top_logprobs.tolist() if prompt.top_logprobs is not None else None
        for span, request_id in enumerate(spans.request_ids):
            request = requests.get(request_id)
            if request is None or request.prompt_logprobs is None:
                continue
            num = request.sampling_params.prompt_logprobs or 0
            for j in range(offsets[span], offsets[span + 1]):
                if spans.starts[span] + j - offsets[span] != len(request.prompt_logprobs) - 1:
                    continue
                entry: dict[int, Logprob] = {}
                if num and top_ids is not None and top_values is not None:
                    for rank, (tid, lp) in enumerate(zip(top_ids[j][:num], top_values[j][:num], strict=True), 1):
                        entry[tid] = Logprob(lp, rank, self._token_text(tid))
                target = int(spans.targets[j])
                entry[target] = Logprob(values[j], ranks[j], self._token_text(target))
                request.prompt_logprobs.append(entry)

    def _token_text(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _check_stop(self, request: Request, parent: ParentRequest, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        completion = parent.completions[request.index]
        detok = parent.detokenizers[request.index]
        can_stop = request.num_output_tokens >= params.min_tokens
        stop_token = can_stop and ((params.stop_token_ids is not None and token_id in params.stop_token_ids) or
                                   (not params.ignore_eos and token_id in request.eos_token_ids))
        # a stop token's own text is left out unless asked for (it shows when special tokens are kept)
        shown = params.detokenize and (not stop_token or params.include_stop_str_in_output)
        new_text = detok.append(token_id) if shown else ""
        completion.text = detok.text
        if request.structured is not None and not request.structured.active:
            request.structured.observe(detok.text)  # a reasoning model thinking: free until its thinking ends
        elif request.structured is not None:
            if not request.structured.accept(token_id):  # the sampler masked it out: cannot happen unless a bug
                logger.warning("request %s: token %d breaks its structured output; stopped", request.request_id,
                               token_id)
                return self._finish(request, completion, RequestStatus.FINISHED_STOPPED)
            if request.structured.is_terminated:  # the structure is complete (its end token accepted)
                return self._finish(request, completion, RequestStatus.FINISHED_STOPPED)
        if can_stop and params.stop_token_ids and token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return self._finish(request, completion, RequestStatus.FINISHED_STOPPED)
        if can_stop and not params.ignore_eos and token_id in request.eos_token_ids:
            return self._finish(request, completion, RequestStatus.FINISHED_STOPPED)
        if can_stop and params.stop and new_text:
            hit = find_stop_string(detok.text, params.stop, len(new_text))
            if hit is not None:
                stop, index = hit
                end = index + len(stop) if params.include_stop_str_in_output else index
                completion.text = detok.text = detok.text[:end]
                request.stop_reason = stop
                return self._finish(request, completion, RequestStatus.FINISHED_STOPPED)
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return self._finish(request, completion, RequestStatus.FINISHED_LENGTH)
        return None

    def _finish(self, request: Request, completion: CompletionOutput, status: RequestStatus) -> RequestStatus:
        completion.finish_reason = status.value
        completion.stop_reason = request.stop_reason
        return status

    def mark_finished(self, request: Request, status: RequestStatus) -> None:
        """Record a finish the engine decided (abort); sets the completion's finish reason."""
        parent = self.parent_of.get(request.request_id)
        if parent is not None:
            completion = parent.completions[request.index]
            if completion.finish_reason is None:
                completion.finish_reason = status.value
                if request.metrics is not None:
                    request.metrics.finished_time = time.monotonic()

    def add_embeddings(self, pooled: PooledRows, requests: dict[str, Request]) -> None:
        """Pool one step's last-token hidden states (host) into ``Request.embedding`` of the pooling requests
        still running (an aborted one is no longer in ``requests``)."""
        for request_id, hidden in zip(pooled.request_ids, pooled.hidden, strict=True):
            request = requests.get(request_id)
            if request is not None and request.pooling is not None:
                request.embedding = request.pooling.pool(hidden)

    def make_output(self, parent: ParentRequest) -> RequestOutput | EmbeddingRequestOutput:
        """Snapshot the user-facing state of ``parent`` (its embedding, for a pooling request); drops its
        bookkeeping once finished."""
        finished = parent.finished
        first = parent.children[0]
        if first.pooling is not None:
            output: RequestOutput | EmbeddingRequestOutput = EmbeddingRequestOutput(
                parent.request_id, parent.prompt, parent.prompt_token_ids, EmbeddingOutput(first.embedding or []),
                finished)  # an aborted one finishes with no embedding
        else:
            output = self._request_output(parent, finished, first)
        if finished:
            self.parents.pop(parent.request_id, None)
            for child in parent.children:
                self.parent_of.pop(child.request_id, None)
        return output

    @staticmethod
    def _request_output(parent: ParentRequest, finished: bool, first: Request) -> RequestOutput:
        """The :class:`RequestOutput` of a generation request: copies of its completions so far."""
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=[
                CompletionOutput(c.index, c.text, list(c.token_ids), c.cumulative_logprob,
                                 None if c.logprobs is None else list(c.logprobs), c.finish_reason, c.stop_reason)
                for c in parent.completions
            ],
            finished=finished,
            metrics=first.metrics,
            num_cached_tokens=first.num_cached_tokens,
            prompt_logprobs=None if first.prompt_logprobs is None else list(first.prompt_logprobs),
        )
