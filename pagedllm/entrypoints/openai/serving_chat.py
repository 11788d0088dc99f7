"""``POST /v1/chat/completions``: a conversation through the chat template, streamed or not."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Sequence

from fastapi import Request
from starlette.responses import Response

from pagedllm.core.outputs import SampleLogprobs
from pagedllm.entrypoints.async_engine import OutputStream
from pagedllm.entrypoints.openai.errors import invalid_param
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogProbs,
    ChatLogprobToken,
    ChatResponseMessage,
    ChatTopLogprob,
    DeltaMessage,
)
from pagedllm.entrypoints.openai.serving_base import OpenAIServing, finite_logprob, json_response, random_id, usage_of
from pagedllm.entrypoints.openai.streaming import DeltaTracker, sse_event
from pagedllm.entrypoints.openai.tokenization import messages_for_template


def chat_logprobs(token_ids: Sequence[int], logprobs: SampleLogprobs, num_top: int) -> ChatLogProbs:
    """The chat logprobs of some generated tokens, each with its ``num_top`` most likely alternatives."""
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        sampled = entry.get(token_id)
        token = (sampled.decoded_token if sampled is not None else None) or ""
        ranked = sorted(entry.values(), key=lambda lp: -lp.logprob)[:num_top]
        top = [ChatTopLogprob(token=lp.decoded_token or "", logprob=finite_logprob(lp.logprob),
                              bytes=list((lp.decoded_token or "").encode())) for lp in ranked]
        content.append(ChatLogprobToken(token=token, bytes=list(token.encode()), top_logprobs=top,
                                        logprob=finite_logprob(sampled.logprob if sampled else -math.inf)))
    return ChatLogProbs(content=content)


class OpenAIServingChat(OpenAIServing):
    """Serves ``/v1/chat/completions``."""

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        """Validate, render the conversation, queue it and answer (SSE when ``stream``)."""
        arrival = time.monotonic()
        model = self.models.check(request.model)
        self.check_request(request)
        if request.tools:
            raise invalid_param("tools are not supported yet", "tools")
        if request.top_logprobs is not None and not request.logprobs:
            raise invalid_param("top_logprobs requires logprobs to be true", "top_logprobs")
        self.check_logprobs(request.top_logprobs, "top_logprobs")
        num_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        try:
            messages = messages_for_template(request.messages)
            text = await self.tokenizer.render_chat(messages, request.add_generation_prompt,
                                                    request.chat_template_kwargs)
            prompt_ids = await self.tokenizer.encode(text, request.add_special_tokens)
        except ValueError as exc:
            raise invalid_param(str(exc), "messages") from exc
        prompt_ids = self.truncate_prompt(request, prompt_ids)
        self.check_prompt_ids(prompt_ids, "messages")
        max_tokens_param = "max_tokens" if request.max_completion_tokens is None else "max_completion_tokens"
        requested = request.max_tokens if request.max_completion_tokens is None else request.max_completion_tokens
        max_tokens = self.resolve_max_tokens(len(prompt_ids), requested, "messages", max_tokens_param)
        structured, structured_param = self.structured_outputs_of(request)
        names = {"max_tokens": max_tokens_param, "logprobs": "top_logprobs", "structured_outputs": structured_param}
        params = self.sampling_params(request, max_tokens, num_logprobs, names, structured)
        request_id = random_id("chatcmpl")
        stream = await self.add(request_id, [prompt_ids], [params], arrival, names, "messages")
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return self.stream_response(stream, lambda: self._chunks(
                stream, request_id, model, request.n, params.stop, num_logprobs, include_usage))
        (output,) = await self.collect(stream, raw_request)
        choices = [
            ChatCompletionChoice(
                index=c.index, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                logprobs=None if c.logprobs is None else chat_logprobs(c.token_ids, c.logprobs, num_logprobs or 0),
            )
            for c in output.outputs
        ]
        return json_response(ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                                    usage=usage_of([output]),
                                                    prompt_logprobs=self.prompt_logprobs_of(output)))

    async def _chunks(self, stream: OutputStream, request_id: str, model: str, n: int, stop: list[str] | None,
                      num_logprobs: int | None, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choice: ChatCompletionStreamChoice) -> str:
            return sse_event(ChatCompletionStreamResponse(id=request_id, created=created, model=model,
                                                          choices=[choice]))

        for index in range(n):  # OpenAI opens every choice with the role
            yield chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role="assistant", content="")))
        trackers = [DeltaTracker.for_stops(stop) for _ in range(n)]
        final = None
        async for outputs in stream:
            final = outputs[-1]
            for completion in final.outputs:
                delta = trackers[completion.index].next(completion)
                if delta is None:
                    continue
                logprobs = None
                if delta.logprobs is not None:
                    logprobs = chat_logprobs(delta.token_ids, delta.logprobs, num_logprobs or 0)
                yield chunk(ChatCompletionStreamChoice(
                    index=completion.index, delta=DeltaMessage(content=delta.text), logprobs=logprobs,
                    finish_reason=delta.finish_reason, stop_reason=delta.stop_reason))
        if include_usage and final is not None:
            yield sse_event(ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=[],
                                                         usage=usage_of([final])))
