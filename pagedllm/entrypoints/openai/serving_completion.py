"""``POST /v1/completions``: text or token-id prompts, one or a batch, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from fastapi import Request
from starlette.responses import Response

from pagedllm.core.outputs import CompletionOutput, SampleLogprobs
from pagedllm.entrypoints.async_engine import OutputStream
from pagedllm.entrypoints.openai.errors import invalid_param
from pagedllm.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from pagedllm.entrypoints.openai.serving_base import OpenAIServing, finite_logprob, json_response, random_id, usage_of
from pagedllm.entrypoints.openai.streaming import DeltaTracker, sse_event


def completion_logprobs(token_ids: Sequence[int], logprobs: SampleLogprobs, text_offset: int = 0
                        ) -> CompletionLogProbs:
    """The legacy completions logprobs of some generated tokens, text offsets starting at ``text_offset``.

    ``top_logprobs`` holds the requested alternatives and the sampled token (so up to ``logprobs + 1``);
    when tokens decode to the same text (e.g. byte pieces of one character), the likeliest one keeps it.
    """
    out = CompletionLogProbs()
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        sampled = entry.get(token_id)
        token = (sampled.decoded_token if sampled is not None else None) or ""
        out.tokens.append(token)
        out.token_logprobs.append(None if sampled is None else finite_logprob(sampled.logprob))
        top: dict[str, float] = {}
        for lp in sorted(entry.values(), key=lambda lp: -lp.logprob):
            top.setdefault(lp.decoded_token or "", finite_logprob(lp.logprob))  # tokens may share a text
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out


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
        if request.echo and request.logprobs is not None:
            raise invalid_param("echo with logprobs needs prompt logprobs, which this server does not compute yet",
                                "echo")
        prompts = await self._prompt_token_ids(request)
        params = [
            self.sampling_params(request, self.resolve_max_tokens(len(ids), request.max_tokens, "prompt",
                                                                  "max_tokens"), request.logprobs, {})
            for ids in prompts
        ]
        echo = [await self._echo_text(request.prompt, i, ids) for i, ids in enumerate(prompts)] \
            if request.echo else None
        request_id = random_id("cmpl")
        stream = await self.add(request_id, prompts, params, arrival, {}, "prompt")
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return self.stream_response(stream, lambda: self._chunks(
                stream, request_id, model, request.n, params[0].stop, echo, include_usage))
        outputs = await self.collect(stream, raw_request)
        choices = []
        for i, output in enumerate(outputs):
            for completion in output.outputs:
                choices.append(self._choice(i * request.n + completion.index, completion,
                                            echo[i] if echo else ""))
        return json_response(CompletionResponse(id=request_id, model=model, choices=choices,
                                                usage=usage_of(outputs)))

    async def _prompt_token_ids(self, request: CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            items: list[str | list[int]] = [prompt]  # type: ignore[list-item]
        else:
            items = list(prompt)  # type: ignore[arg-type]
        if not items:
            raise invalid_param("prompt is empty: give a string, a list of strings or token ids", "prompt")
        prompts = []
        for item in items:
            if isinstance(item, str):
                try:
                    ids = await self.tokenizer.encode(item, request.add_special_tokens)
                except ValueError as exc:
                    raise invalid_param(str(exc), "prompt") from exc
            else:
                ids = list(item)
            self.check_prompt_ids(ids, "prompt")
            prompts.append(ids)
        return prompts

    async def _echo_text(self, prompt: object, index: int, token_ids: list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[index], str):
            return prompt[index]
        return await self.tokenizer.decode(token_ids) if self.tokenizer.tokenizer is not None else ""

    @staticmethod
    def _choice(index: int, completion: CompletionOutput, echo: str) -> CompletionChoice:
        logprobs = None
        if completion.logprobs is not None:
            logprobs = completion_logprobs(completion.token_ids, completion.logprobs, len(echo))
        return CompletionChoice(index=index, text=echo + completion.text, logprobs=logprobs,
                                finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)

    async def _chunks(self, stream: OutputStream, request_id: str, model: str, n: int, stop: list[str] | None,
                      echo: list[str] | None, include_usage: bool) -> AsyncIterator[str]:
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
                    text = delta.text if offset is not None or echo is None else echo[i] + delta.text
                    offset = offset or 0
                    logprobs = None
                    if delta.logprobs is not None:
                        logprobs = completion_logprobs(delta.token_ids, delta.logprobs, offset)
                    sent_chars[key] = offset + len(text)
                    choice = CompletionChoice(index=i * n + completion.index, text=text, logprobs=logprobs,
                                              finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)
                    yield sse_event(CompletionStreamResponse(id=request_id, created=created, model=model,
                                                             choices=[choice]))
        if include_usage:
            yield sse_event(CompletionStreamResponse(id=request_id, created=created, model=model, choices=[],
                                                     usage=usage_of(list(final.values()))))
