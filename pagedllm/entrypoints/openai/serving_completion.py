"""``POST /v1/completions``: text or token-id prompts, one or a batch, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fastapi import Request
from starlette.responses import Response

from pagedllm.core.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.entrypoints.async_engine import OutputStream
from pagedllm.entrypoints.openai.errors import invalid_param
from pagedllm.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from pagedllm.entrypoints.openai.serving_base import (
    OpenAIServing,
    finite_logprob,
    json_response,
    random_id,
    token_label,
    usage_of,
)
from pagedllm.entrypoints.openai.streaming import DeltaTracker, sse_event


def completion_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob] | None],
                        text_offset: int = 0, first_token_text: str = "", as_ids: bool = False) -> CompletionLogProbs:
    """The legacy completions logprobs of some tokens, text offsets starting at ``text_offset``.

    ``top_logprobs`` holds the requested alternatives and the token itself (so up to ``logprobs + 1``);
    when tokens decode to the same text (e.g. byte pieces of one character), the likeliest one keeps it. An
    entry None (an echoed prompt's first token, which nothing predicts) gives null logprobs and
    ``first_token_text``. With ``as_ids`` tokens are named ``token_id:<id>`` (:func:`token_label`); the text
    offsets still count the tokens' text.
    """
    out = CompletionLogProbs()
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        if entry is None:
            out.tokens.append(f"token_id:{token_id}" if as_ids else first_token_text)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            out.text_offset.append(text_offset)
            text_offset += len(first_token_text)
            continue
        sampled = entry.get(token_id)
        out.tokens.append(token_label(token_id, sampled, as_ids))
        out.token_logprobs.append(None if sampled is None else finite_logprob(sampled.logprob))
        top: dict[str, float] = {}
        for other, lp in sorted(entry.items(), key=lambda item: -item[1].logprob):
            top.setdefault(token_label(other, lp, as_ids), finite_logprob(lp.logprob))  # tokens may share a text
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(token_label(token_id, sampled, False))
    return out


def joined(first: CompletionLogProbs, second: CompletionLogProbs) -> CompletionLogProbs:
    """``first``'s tokens then ``second``'s (an echoed prompt's, then its completion's)."""
    return CompletionLogProbs(text_offset=first.text_offset + second.text_offset, tokens=first.tokens + second.tokens,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              top_logprobs=first.top_logprobs + second.top_logprobs)


@dataclass(slots=True)
class Echo:
    """What ``echo`` puts before a prompt's completions: its text and, with ``logprobs``, its tokens'
    logprobs (filled from the first output, which carries the prompt logprobs)."""

    text: str
    token_ids: list[int]
    first_token_text: str
    logprobs: CompletionLogProbs | None = None

    def prompt_logprobs(self, output: RequestOutput, as_ids: bool = False) -> CompletionLogProbs | None:
        """The prompt tokens' logprobs from ``output`` (None unless asked for)."""
        if self.logprobs is None and output.prompt_logprobs is not None:
            self.logprobs = completion_logprobs(self.token_ids, output.prompt_logprobs, 0, self.first_token_text,
                                                as_ids)
        return self.logprobs


def choice_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]], text_offset: int,
                    echo: Echo | None, output: RequestOutput, as_ids: bool = False) -> CompletionLogProbs:
    """The logprobs a choice (or a streamed chunk) carries: its tokens', text offsets from ``text_offset``,
    after the echoed prompt's when ``echo`` precedes them and the prompt logprobs were computed; tokens named by
    id with ``as_ids``."""
    logprobs_out = completion_logprobs(token_ids, logprobs, text_offset, as_ids=as_ids)
    prompt = echo.prompt_logprobs(output, as_ids) if echo is not None else None
    return logprobs_out if prompt is None else joined(prompt, logprobs_out)


class OpenAIServingCompletion(OpenAIServing):
    """Serves ``/v1/completions``."""

    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        """Validate, queue one engine request per prompt, and answer (SSE when ``stream``)."""
        arrival = time.monotonic()
        model = self.models.check(request.model)
        self.check_request(request)
        if request.suffix:
            raise invalid_param("suffix is not supported", "suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise invalid_param(f"best_of must equal n ({request.n}) when given, got {request.best_of}", "best_of")
        self.check_logprobs(request.logprobs, "logprobs")
        prompts = await self.input_token_ids(request.prompt, request.add_special_tokens, "prompt",
                                             lambda ids: self.truncate_prompt(request, ids))
        structured, structured_param = self.structured_outputs_of(request)
        names = {"structured_outputs": structured_param}
        params = [
            self.sampling_params(request, self.resolve_max_tokens(len(ids), request.max_tokens, "prompt",
                                                                  "max_tokens"), request.logprobs, names, structured)
            for ids in prompts
        ]
        shown = request.prompt if request.truncate_prompt_tokens is None else None  # a cut prompt echoes its ids
        with_logprobs = request.logprobs is not None
        echo = [await self._echo(shown, i, ids, with_logprobs) for i, ids in enumerate(prompts)] \
            if request.echo else None
        if echo is not None and with_logprobs:
            if request.prompt_logprobs is not None and request.prompt_logprobs != request.logprobs:
                raise invalid_param("with echo and logprobs, prompt_logprobs must be left out or equal logprobs "
                                    "(the echoed prompt tokens get logprobs' alternatives)", "prompt_logprobs")
            for p in params:  # the echoed prompt's tokens get logprobs too
                p.prompt_logprobs = request.logprobs
        request_id = random_id("cmpl")
        as_ids = self.tokens_as_ids(request)
        stream = await self.add(request_id, prompts, params, arrival, names, "prompt", request.priority, model)
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return self.stream_response(stream, lambda: self._chunks(
                stream, request_id, model, request.n, params[0].stop, echo, include_usage, as_ids))
        outputs = await self.collect(stream, raw_request)
        choices = []
        for i, output in enumerate(outputs):
            prompt_logprobs = self.prompt_logprobs_of(output) if request.prompt_logprobs is not None else None
            for completion in output.outputs:
                choice = self._choice(i * request.n + completion.index, completion, output, echo[i] if echo else None,
                                      as_ids)
                choice.prompt_logprobs = prompt_logprobs
                choices.append(choice)
        return json_response(CompletionResponse(id=request_id, model=model, choices=choices,
                                                usage=usage_of(outputs, self.prompt_tokens_details)))

    async def _echo(self, prompt: object, index: int, token_ids: list[int], with_logprobs: bool) -> Echo:
        has_tokenizer = self.tokenizer.tokenizer is not None
        first = await self.tokenizer.decode(token_ids[:1]) if has_tokenizer and with_logprobs else ""
        if isinstance(prompt, str):
            return Echo(prompt, token_ids, first)
        if isinstance(prompt, list) and prompt and isinstance(prompt[index], str):
            return Echo(prompt[index], token_ids, first)
        return Echo(await self.tokenizer.decode(token_ids) if has_tokenizer else "", token_ids, first)

    @staticmethod
    def _choice(index: int, completion: CompletionOutput, output: RequestOutput, echo: Echo | None,
                as_ids: bool) -> CompletionChoice:
        prefix = echo.text if echo is not None else ""
        logprobs = None
        if completion.logprobs is not None:
            logprobs = choice_logprobs(completion.token_ids, completion.logprobs, len(prefix), echo, output, as_ids)
        return CompletionChoice(index=index, text=prefix + completion.text, logprobs=logprobs,
                                finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)

    async def _chunks(self, stream: OutputStream, request_id: str, model: str, n: int, stop: list[str] | None,
                      echo: list[Echo] | None, include_usage: bool, as_ids: bool) -> AsyncIterator[str]:
        created = int(time.time())
        prompt_index = {rid: i for i, rid in enumerate(stream.request_ids)}
        trackers: dict[tuple[int, int], DeltaTracker] = {}
        sent_chars: dict[tuple[int, int], int] = {}
        final = {}
        async for outputs in stream:
            for output in outputs:
                i = prompt_index[output.request_id]
                final[output.request_id] = output
                for completion in output.outputs:
                    key = (i, completion.index)
                    if key not in trackers:
                        trackers[key] = DeltaTracker.for_stops(stop)
                    delta = trackers[key].next(completion)
                    if delta is None:
                        continue
                    offset = sent_chars.get(key)
                    echoed = echo[i] if offset is None and echo is not None else None  # the first chunk only
                    prefix = echoed.text if echoed is not None else ""
                    offset = offset or 0
                    text = prefix + delta.text
                    logprobs = None
                    if delta.logprobs is not None:
                        logprobs = choice_logprobs(delta.token_ids, delta.logprobs, offset + len(prefix), echoed,
                                                   output, as_ids)
                    sent_chars[key] = offset + len(text)
                    choice = CompletionChoice(index=i * n + completion.index, text=text, logprobs=logprobs,
                                              finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)
                    yield sse_event(CompletionStreamResponse(id=request_id, created=created, model=model,
                                                             choices=[choice]))
        if include_usage:
            yield sse_event(CompletionStreamResponse(id=request_id, created=created, model=model, choices=[],
                                                     usage=usage_of(list(final.values()),
                                                                    self.prompt_tokens_details)))
