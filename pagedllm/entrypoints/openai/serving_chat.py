"""``POST /v1/chat/completions``: a conversation through the chat template, streamed or not."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.responses import Response

from pagedllm.core.outputs import CompletionOutput, SampleLogprobs
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
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
)
from pagedllm.entrypoints.openai.serving_base import OpenAIServing, finite_logprob, json_response, random_id, usage_of
from pagedllm.entrypoints.openai.streaming import DeltaTracker, sse_event
from pagedllm.entrypoints.openai.tokenization import messages_for_template
from pagedllm.entrypoints.openai.tool_call_stream import ToolCallStream, merge_deltas
from pagedllm.entrypoints.openai.tool_calls import ToolMode, arguments_as_objects, resolve_tool_mode


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


def reply_of(completion: CompletionOutput, tools: ToolMode) -> tuple[ChatResponseMessage, str | None]:
    """A finished completion as the assistant's message (its text, or the tool calls ``tools`` parses from it) and
    its finish reason (``"tool_calls"`` when the model chose to call, as OpenAI reports it)."""
    content, calls = tools.parse(completion.text) if tools.parses else (completion.text, [])
    finish = completion.finish_reason
    if calls and tools.kind != "named" and finish == "stop":
        finish = "tool_calls"
    return ChatResponseMessage(content=content, tool_calls=calls or None), finish


@dataclass(frozen=True, slots=True)
class StartedChat:
    """A queued chat request: its output ``stream``, id, served ``model`` name, tool mode, how many top logprobs
    each token asks for (None: none) and its stop strings."""

    stream: OutputStream
    request_id: str
    model: str
    tools: ToolMode
    num_logprobs: int | None
    stop: list[str] | None


class OpenAIServingChat(OpenAIServing):
    """Serves ``/v1/chat/completions``; ``tool_parser`` (``--tool-call-parser``) lets ``tool_choice`` be
    ``"auto"``."""

    def __init__(self, *args: Any, tool_parser: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tool_parser = tool_parser

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        """Validate, render the conversation (and its tools), queue it and answer (SSE when ``stream``)."""
        chat = await self.start_chat(request)
        stream, request_id, model, tools, num_logprobs = (chat.stream, chat.request_id, chat.model, chat.tools,
                                                          chat.num_logprobs)
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return self.stream_response(stream, lambda: self._chunks(
                stream, request_id, model, request.n, chat.stop, num_logprobs, include_usage, tools))
        (output,) = await self.collect(stream, raw_request)
        choices = []
        for c in output.outputs:
            message, finish = reply_of(c, tools)
            choices.append(ChatCompletionChoice(
                index=c.index, message=message, finish_reason=finish, stop_reason=c.stop_reason,
                logprobs=None if c.logprobs is None else chat_logprobs(c.token_ids, c.logprobs, num_logprobs or 0),
            ))
        return json_response(ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                                    usage=usage_of([output]),
                                                    prompt_logprobs=self.prompt_logprobs_of(output)))

    async def start_chat(self, request: ChatCompletionRequest, id_prefix: str = "chatcmpl") -> StartedChat:
        """Validate the request, render the conversation (and its tools) and queue it; returns what answering
        it needs (:class:`StartedChat`). Raises :class:`OpenAIError` (a 400 naming the field) for a bad request."""
        arrival = time.monotonic()
        model = self.models.check(request.model)
        self.check_request(request)
        tools = resolve_tool_mode(request.tools, request.tool_choice, self.tool_parser)
        if request.top_logprobs is not None and not request.logprobs:
            raise invalid_param("top_logprobs requires logprobs to be true", "top_logprobs")
        self.check_logprobs(request.top_logprobs, "top_logprobs")
        num_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        try:
            messages = arguments_as_objects(messages_for_template(request.messages))
            text = await self.tokenizer.render_chat(messages, request.add_generation_prompt,
                                                    request.chat_template_kwargs, request.tools or None)
            prompt_ids = await self.tokenizer.encode(text, request.add_special_tokens)
        except ValueError as exc:
            raise invalid_param(str(exc), "messages") from exc
        prompt_ids = self.truncate_prompt(request, prompt_ids)
        self.check_prompt_ids(prompt_ids, "messages")
        max_tokens_param = "max_tokens" if request.max_completion_tokens is None else "max_completion_tokens"
        requested = request.max_tokens if request.max_completion_tokens is None else request.max_completion_tokens
        max_tokens = self.resolve_max_tokens(len(prompt_ids), requested, "messages", max_tokens_param)
        structured, structured_param = self.structured_outputs_of(request)
        forced = tools.structured_output()
        if forced is not None:
            if structured is not None:
                raise invalid_param(f"tool_choice {tools.kind!r} sets the reply's structure: leave out "
                                    f"{structured_param}", structured_param)
            structured, structured_param = forced, "tool_choice"
        names = {"max_tokens": max_tokens_param, "logprobs": "top_logprobs", "structured_outputs": structured_param}
        params = self.sampling_params(request, max_tokens, num_logprobs, names, structured)
        if tools.format is not None and tools.format.keeps_special_tokens:
            params.skip_special_tokens = False  # the format's marker is a special token (as vLLM's parser asks)
        request_id = random_id(id_prefix)
        stream = await self.add(request_id, [prompt_ids], [params], arrival, names, "messages", request.priority,
                                model)
        return StartedChat(stream, request_id, model, tools, num_logprobs, params.stop)

    async def _chunks(self, stream: OutputStream, request_id: str, model: str, n: int, stop: list[str] | None,
                      num_logprobs: int | None, include_usage: bool, tools: ToolMode) -> AsyncIterator[str]:
        """The SSE chunks of a streamed reply: text deltas as tokens come. Under ``tool_choice`` ``"auto"`` the text
        streams until a tool call begins, then each call's name and its arguments as they grow
        (``tool_call_stream``); a forced call (named or ``"required"``) arrives whole when the reply finishes.
        Text that a stop string may still cut waits, as plain text does."""
        created = int(time.time())

        def chunk(choice: ChatCompletionStreamChoice) -> str:
            return sse_event(ChatCompletionStreamResponse(id=request_id, created=created, model=model,
                                                          choices=[choice]))

        for index in range(n):  # OpenAI opens every choice with the role
            yield chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role="assistant", content="")))
        trackers = [DeltaTracker.for_stops(stop) for _ in range(n)]
        sent = [False] * n  # a tool-calling reply's last chunk
        streamed = None if tools.format is None else [ToolCallStream(tools.format) for _ in range(n)]
        final = None
        async for outputs in stream:
            final = outputs[-1]
            for completion in final.outputs:
                if tools.parses:
                    if sent[completion.index]:
                        continue
                    if completion.finished():
                        sent[completion.index] = True
                        yield chunk(self._tool_chunk(completion, tools, None if streamed is None
                                                     else streamed[completion.index]))
                    elif streamed is not None:  # all but the tail a stop string may still cut
                        held = trackers[completion.index].holdback_chars
                        content, calls = streamed[completion.index].next(completion.text[:len(completion.text) - held]
                                                                         if held else completion.text)
                        if content or calls:
                            yield chunk(ChatCompletionStreamChoice(index=completion.index, delta=DeltaMessage(
                                content=content or None, tool_calls=calls or None)))
                    continue
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

    @staticmethod
    def _tool_chunk(completion: CompletionOutput, tools: ToolMode, streamed: ToolCallStream | None
                    ) -> ChatCompletionStreamChoice:
        """The last streamed choice of a finished reply that may call tools: its calls, and the content not sent
        yet (``streamed``: what already went out as it came; None: nothing did)."""
        message, finish = reply_of(completion, tools)
        content = message.content
        if streamed is None:
            calls = [DeltaToolCall(index=i, id=call.id, type="function", function=DeltaFunctionCall(
                name=call.function.name, arguments=call.function.arguments))
                for i, call in enumerate(message.tool_calls or [])]
        else:  # what this last step adds, then what only the whole reply tells
            content, calls = streamed.next(completion.text)
            if message.tool_calls:
                calls = merge_deltas(calls + streamed.finish(completion.text, message.tool_calls))
            else:  # no valid calls after all: the rest of the text is content
                content += completion.text[streamed.content.sent:]
            content = content or None
        return ChatCompletionStreamChoice(index=completion.index, finish_reason=finish,
                                          stop_reason=completion.stop_reason,
                                          delta=DeltaMessage(content=content, tool_calls=calls or None))
