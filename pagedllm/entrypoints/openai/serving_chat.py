"""``POST /v1/chat/completions``: a conversation through the chat template, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.responses import Response

from pagedllm.core.outputs import RequestOutput
from pagedllm.entrypoints.async_engine import OutputStream
from pagedllm.entrypoints.openai.chat_reply import ChoiceStream, chat_logprobs, reply_of
from pagedllm.entrypoints.openai.errors import invalid_param
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    CompletionTokensDetails,
    DeltaMessage,
    UsageInfo,
)
from pagedllm.entrypoints.openai.reasoning import (
    REASONING_FORMATS,
    ReasoningFormat,
    end_tag_token,
    reasoning_token_count,
)
from pagedllm.entrypoints.openai.serving_base import OpenAIServing, json_response, random_id, usage_of
from pagedllm.entrypoints.openai.streaming import sse_event
from pagedllm.entrypoints.openai.tokenization import messages_for_template
from pagedllm.entrypoints.openai.tool_calls import ToolMode, arguments_as_objects, resolve_tool_mode


@dataclass(frozen=True, slots=True)
class StartedChat:
    """A queued chat request: its output ``stream``, id, served ``model`` name, tool mode, how many top logprobs
    each token asks for (None: none), its stop strings, how its reasoning is split off (None: not at all) and
    whether the reply shows it."""

    stream: OutputStream
    request_id: str
    model: str
    tools: ToolMode
    num_logprobs: int | None
    stop: list[str] | None
    reasoning: ReasoningFormat | None = None
    include_reasoning: bool = True
    reasoning_end_token: int | None = None  # the end tag's id when it is one token
    decode: Callable[[list[int]], str] | None = None  # the tokenizer's, to count a tag written in pieces
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:<id>"
    cached_details: bool = False  # usage says how many prompt tokens were cached

    def usage(self, output: RequestOutput) -> UsageInfo:
        """The token counts of the finished chat; with its reasoning split off, also how many completion tokens
        were thinking (known when the end tag is one token, or when no choice ended its thinking)."""
        usage = usage_of([output], self.cached_details)
        if self.reasoning is not None:
            counts = [reasoning_token_count(self.reasoning, c.text, c.token_ids, self.reasoning_end_token,
                                            self.decode) for c in output.outputs]
            if None not in counts:
                usage.completion_tokens_details = CompletionTokensDetails(reasoning_tokens=sum(counts))
        return usage


class OpenAIServingChat(OpenAIServing):
    """Serves ``/v1/chat/completions``; ``tool_parser`` (``--tool-call-parser``) lets ``tool_choice`` be
    ``"auto"``; ``reasoning_parser`` (``--reasoning-parser``) splits replies' reasoning from their answers."""

    def __init__(self, *args: Any, tool_parser: str | None = None, reasoning_parser: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tool_parser = tool_parser
        self.reasoning = None if reasoning_parser is None else REASONING_FORMATS[reasoning_parser]
        self.reasoning_end_token = (None if self.reasoning is None
                                    else end_tag_token(self.reasoning, self.tokenizer.tokenizer))

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        """Validate, render the conversation (and its tools), queue it and answer (SSE when ``stream``)."""
        chat = await self.start_chat(request)
        stream, request_id, model, tools, num_logprobs = (chat.stream, chat.request_id, chat.model, chat.tools,
                                                          chat.num_logprobs)
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return self.stream_response(stream, lambda: self._chunks(chat, request.n, include_usage))
        (output,) = await self.collect(stream, raw_request)
        choices = []
        for c in output.outputs:
            message, finish = reply_of(c, tools, chat.reasoning, chat.include_reasoning)
            choices.append(ChatCompletionChoice(
                index=c.index, message=message, finish_reason=finish, stop_reason=c.stop_reason,
                logprobs=None if c.logprobs is None else chat_logprobs(c.token_ids, c.logprobs, num_logprobs or 0,
                                                                       chat.tokens_as_ids),
            ))
        return json_response(ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                                    usage=chat.usage(output),
                                                    prompt_logprobs=self.prompt_logprobs_of(output)))

    async def start_chat(self, request: ChatCompletionRequest, id_prefix: str = "chatcmpl") -> StartedChat:
        """Validate the request, render the conversation (and its tools) and queue it; returns what answering
        it needs (:class:`StartedChat`). Raises :class:`OpenAIError` (a 400 naming the field) for a bad request."""
        arrival = time.monotonic()
        model = self.models.check(request.model)
        self.check_request(request)
        tools = resolve_tool_mode(request.tools, request.tool_choice, self.tool_parser, request.parallel_tool_calls)
        if request.top_logprobs is not None and not request.logprobs:
            raise invalid_param("top_logprobs requires logprobs to be true", "top_logprobs")
        self.check_logprobs(request.top_logprobs, "top_logprobs")
        num_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        try:
            messages = arguments_as_objects(messages_for_template(request.messages))
            text = await self.tokenizer.render_chat(messages, request, request.tools or None)
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
        tokenizer = self.tokenizer.tokenizer
        return StartedChat(stream, request_id, model, tools, num_logprobs, params.stop, self.reasoning,
                           request.include_reasoning, self.reasoning_end_token,
                           None if tokenizer is None else tokenizer.decode, self.tokens_as_ids(request),
                           self.prompt_tokens_details)

    async def _chunks(self, chat: StartedChat, n: int, include_usage: bool) -> AsyncIterator[str]:
        """The SSE chunks of a streamed reply (``n`` choices): each choice opened with the role, then what each
        step adds to it (:class:`ChoiceStream`), then the usage when asked for."""
        created = int(time.time())
        request_id, model = chat.request_id, chat.model

        def chunk(choice: ChatCompletionStreamChoice) -> str:
            return sse_event(ChatCompletionStreamResponse(id=request_id, created=created, model=model,
                                                          choices=[choice]))

        for index in range(n):  # OpenAI opens every choice with the role
            yield chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role="assistant", content="")))
        choices = [ChoiceStream(index, chat.tools, chat.reasoning, chat.stop, chat.num_logprobs, chat.include_reasoning,
                                chat.tokens_as_ids) for index in range(n)]
        final = None
        async for outputs in chat.stream:
            final = outputs[-1]
            for completion in final.outputs:
                choice = choices[completion.index].next(completion)
                if choice is not None:
                    yield chunk(choice)
        if include_usage and final is not None:
            yield sse_event(ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=[],
                                                         usage=chat.usage(final)))
