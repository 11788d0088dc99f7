"""``POST /v1/responses``, OpenAI's Responses API, through the chat pipeline.

A request becomes a chat request (:func:`chat_request_of`): the ``instructions`` a system message, the ``input``
items the conversation (messages, function calls and their outputs), the function ``tools`` and ``tool_choice``
in chat's shape, ``text.format`` a ``response_format``, ``max_output_tokens`` the completion's limit. The answer
is a response object: a reasoning item with the thinking (under a ``--reasoning-parser``), a message item with
the text, a ``function_call`` item per tool call, ``status`` ``"incomplete"`` when ``max_output_tokens`` cut it.
Streamed, it is OpenAI's event sequence (``response.created`` ... ``response.reasoning_text.delta`` ...
``response.output_text.delta`` ... ``response.completed``); the thinking and the text stream as they come (under
``tool_choice`` ``"auto"``, up to where a call begins), and the calls follow whole at the end.
Errors name the Responses fields (``input``, ``max_output_tokens``, ``text``, ...).
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.responses import Response

from pagedllm.core.outputs import RequestOutput
from pagedllm.entrypoints.openai.chat_reply import reply_of
from pagedllm.entrypoints.openai.errors import OpenAIError, invalid_param
from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, ChatResponseMessage
from pagedllm.entrypoints.openai.protocol_responses import (
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    MessageItem,
    OutputText,
    OutputTokensDetails,
    ReasoningItem,
    ReasoningText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from pagedllm.entrypoints.openai.reasoning import ReasoningStream
from pagedllm.entrypoints.openai.serving_base import json_response
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat, StartedChat
from pagedllm.entrypoints.openai.tool_call_stream import ContentBeforeCalls

CHAT_TO_RESPONSES_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens",
                            "max_tokens": "max_output_tokens", "response_format": "text"}
"""A chat field named in an error -> the Responses field the client sent."""


def _text_of(content: object, where: str) -> str:
    """A message's content: a string, or the text of its ``input_text``/``output_text``/``text`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid_param(f"{where}: content part {kind!r} is not supported (text parts only)", "input")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise invalid_param(f"{where}: content must be a string or a list of text parts", "input")


def _messages_of(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The conversation of a request: its instructions, then its input items as chat messages."""
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        return [*messages, {"role": "user", "content": request.input}]
    for index, item in enumerate(request.input):
        kind = item.get("type", "message")
        where = f"input[{index}]"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid_param(f"{where}: role must be user, assistant, system or developer, got {role!r}",
                                    "input")
            messages.append({"role": "system" if role == "developer" else role,
                             "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # calls of one turn: one assistant message
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue
        else:
            raise invalid_param(f"{where}: items of type {kind!r} are not supported", "input")
    return messages


def _chat_tools(request: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, str | dict[str, Any] | None]:
    """The function tools and the tool choice in chat's shape; a 400 naming ``tools`` for other tool types."""
    tools = None
    if request.tools is not None:
        tools = []
        for index, tool in enumerate(request.tools):
            if tool.get("type") != "function":
                raise invalid_param(f"tools[{index}]: tools of type {tool.get('type')!r} are not supported "
                                    f"(function tools only)", "tools")
            function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
            tools.append({"type": "function", "function": function})
    choice = request.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools, choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` as a chat ``response_format`` (None for plain text)."""
    fmt = (text or {}).get("format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    return fmt


def chat_request_of(request: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request a Responses request runs as (see the module docstring)."""
    if request.previous_response_id is not None:
        raise invalid_param("previous_response_id is not supported: responses are not stored; send the whole "
                            "conversation in input", "previous_response_id")
    tools, choice = _chat_tools(request)
    try:
        return ChatCompletionRequest(
            model=request.model, messages=_messages_of(request), max_completion_tokens=request.max_output_tokens,
            temperature=request.temperature, top_p=request.top_p, stream=request.stream, tools=tools,
            tool_choice=choice, parallel_tool_calls=request.parallel_tool_calls,
            response_format=_response_format(request.text), seed=request.seed,
            user=request.user, priority=request.priority,
        )
    except ValidationError as exc:  # a value chat's request model refuses: name the field the client sent
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first.get("loc") else "input"
        param = CHAT_TO_RESPONSES_PARAMS.get(field, field)
        raise invalid_param(f"{param}: {first['msg']}", param) from exc


def _renamed(exc: OpenAIError) -> OpenAIError:
    """``exc`` naming the Responses field where it names a chat one."""
    param = CHAT_TO_RESPONSES_PARAMS.get(exc.param or "", exc.param)
    message = exc.message
    for chat_name, name in CHAT_TO_RESPONSES_PARAMS.items():
        message = message.replace(chat_name, name)
    return OpenAIError(message, exc.status_code, param=param, code=exc.code, error_type=exc.error_type)


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OpenAIServingResponses:
    """Serves ``/v1/responses`` through ``chat`` (its models, tool parser and engine)."""

    def __init__(self, chat: OpenAIServingChat) -> None:
        self.chat = chat

    async def create_response(self, request: ResponsesRequest, raw_request: Request) -> Response:
        """Validate, run as a chat request, and answer with a response object (events when ``stream``)."""
        self.chat.warn_unknown_fields(request)
        try:
            chat_request = chat_request_of(request)
            started = await self.chat.start_chat(chat_request, id_prefix="resp")
        except OpenAIError as exc:
            raise _renamed(exc) from exc
        if request.stream:
            return self.chat.stream_response(started.stream, lambda: self._events(request, started))
        (output,) = await self.chat.collect(started.stream, raw_request)
        return json_response(self._response(request, started, output))

    def _response(self, request: ResponsesRequest, started: StartedChat, output: RequestOutput | None,
                  message_text: str | None = None, ids: dict[str, str] | None = None,
                  call_ids: list[str] | None = None, message: ChatResponseMessage | None = None) -> ResponseObject:
        """The response object: in progress (``output`` None), or finished with its items (the message's text
        ``message_text`` and the reasoning and message item ids, ``ids["rs"]`` and ``ids["msg"]``, as a stream
        sent them, when given; ``message``: the finished reply as :func:`reply_of` parsed it, if it was)."""
        tool_choice = request.tool_choice if request.tool_choice is not None else "auto"
        common: dict[str, Any] = dict(
            id=started.request_id, model=started.model, instructions=request.instructions,
            max_output_tokens=request.max_output_tokens, temperature=request.temperature, top_p=request.top_p,
            tool_choice=tool_choice, tools=request.tools or [], parallel_tool_calls=request.parallel_tool_calls,
            text=request.text or {"format": {"type": "text"}}, metadata=request.metadata or {})
        if output is None:
            return ResponseObject(status="in_progress", **common)
        completion = output.outputs[0]
        if message is None:
            message, _ = reply_of(completion, started.tools, started.reasoning)
        cut = completion.finish_reason == "length"
        ids = ids or {}
        items: list[ReasoningItem | MessageItem | FunctionCallItem] = []
        if message.reasoning:
            items.append(ReasoningItem(id=ids.get("rs") or _item_id("rs"), content=[ReasoningText(
                text=message.reasoning)], status="incomplete" if cut and message.content is None else "completed"))
        text = message.content if message_text is None else message_text
        if text or not (message.tool_calls or items):
            items.append(MessageItem(id=ids.get("msg") or _item_id("msg"), status="incomplete" if cut else "completed",
                                     content=[OutputText(text=text or "")]))
        for index, call in enumerate(message.tool_calls or []):
            items.append(FunctionCallItem(id=call_ids[index] if call_ids else _item_id("fc"), call_id=call.id,
                                          name=call.function.name, arguments=call.function.arguments,
                                          status="completed"))
        usage = started.usage(output)
        details = usage.completion_tokens_details
        return ResponseObject(
            status="incomplete" if cut else "completed", output=items,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if cut else None,
            usage=ResponseUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                                input_tokens_details=InputTokensDetails(cached_tokens=output.num_cached_tokens),
                                total_tokens=usage.total_tokens, output_tokens_details=OutputTokensDetails(
                                    reasoning_tokens=0 if details is None else details.reasoning_tokens)),
            **common)

    async def _events(self, request: ResponsesRequest, started: StartedChat) -> AsyncIterator[str]:
        """The event stream of a response (see the module docstring)."""
        numbers = itertools.count()

        def event(kind: str, **fields: Any) -> str:
            payload = {"type": kind, "sequence_number": next(numbers), **fields}
            return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

        in_progress = self._response(request, started, None).model_dump(mode="json")
        yield event("response.created", response=in_progress)
        yield event("response.in_progress", response=in_progress)
        ids = {"rs": _item_id("rs"), "msg": _item_id("msg")}
        positions: dict[str, int] = {}  # output index of each item opened, by id
        text_streams = started.tools.kind in ("none", "auto")
        before_calls = None if started.tools.format is None else ContentBeforeCalls(started.tools.format)
        thinking = None if started.reasoning is None else ReasoningStream(started.reasoning)
        sent = ""
        final: RequestOutput | None = None

        def open_item(item: ReasoningItem | MessageItem) -> list[str]:
            """The events that add ``item`` (in progress, empty) at the next output index."""
            positions[item.id] = len(positions)
            lines = [event("response.output_item.added", output_index=positions[item.id],
                           item=item.model_dump(mode="json"))]
            if isinstance(item, MessageItem):
                lines.append(event("response.content_part.added", item_id=item.id, output_index=positions[item.id],
                                   content_index=0, part=OutputText(text="").model_dump(mode="json")))
            return lines

        def send(kind: str, delta: str) -> list[str]:
            """The events of a reasoning (``kind`` "rs") or message ("msg") text delta, opening its item first."""
            nonlocal sent
            item_id = ids[kind]
            lines = []
            if item_id not in positions:
                lines = open_item(ReasoningItem(id=item_id, content=[], status="in_progress") if kind == "rs"
                                  else MessageItem(id=item_id, status="in_progress", content=[]))
            if kind == "msg":
                sent += delta
            if kind == "rs":
                return [*lines, event("response.reasoning_text.delta", item_id=item_id,
                                      output_index=positions[item_id], content_index=0, delta=delta)]
            return [*lines, event("response.output_text.delta", item_id=item_id, output_index=positions[item_id],
                                  content_index=0, delta=delta, logprobs=[])]

        async for outputs in started.stream:
            final = outputs[-1]
            completion = final.outputs[0]
            thought, answer = (thinking.next(completion.text, completion.finished()) if thinking is not None
                               else ("", completion.text))
            for line in send("rs", thought) if thought else []:
                yield line
            if not text_streams or answer is None:
                continue
            delta = before_calls.next(answer) if before_calls is not None else answer[len(sent):]
            for line in send("msg", delta) if delta else []:
                yield line
        if final is None:
            return
        completion = final.outputs[0]
        message, _ = reply_of(completion, started.tools, started.reasoning)
        answer = (completion.text if started.reasoning is None
                  else started.reasoning.split(completion.text).answer) or ""
        if before_calls is not None and not message.tool_calls:  # no call after all: the held-back rest
            rest = answer[len(sent):]
            for line in send("msg", rest) if rest else []:
                yield line
        text = sent if text_streams else (message.content or "")
        call_ids = [_item_id("fc") for _ in message.tool_calls or []]
        done = self._response(request, started, final, message_text=text, ids=ids, call_ids=call_ids,
                              message=message)
        for index, item in enumerate(done.output):
            if isinstance(item, FunctionCallItem):
                started_item = item.model_copy(update={"arguments": "", "status": "in_progress"})
                yield event("response.output_item.added", output_index=index,
                            item=started_item.model_dump(mode="json"))
                yield event("response.function_call_arguments.delta", item_id=item.id, output_index=index,
                            delta=item.arguments)
                yield event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                            arguments=item.arguments)
            else:
                if item.id not in positions:  # a message with nothing streamed (its text came whole)
                    for line in open_item(item.model_copy(update={"content": [], "status": "in_progress"})):
                        yield line
                assert positions[item.id] == index, "items are opened in their output order"
                if isinstance(item, ReasoningItem):
                    yield event("response.reasoning_text.done", item_id=item.id, output_index=index,
                                content_index=0, text=item.content[0].text)
                else:
                    part = item.content[0].model_dump(mode="json")
                    yield event("response.output_text.done", item_id=item.id, output_index=index, content_index=0,
                                text=item.content[0].text, logprobs=[])
                    yield event("response.content_part.done", item_id=item.id, output_index=index, content_index=0,
                                part=part)
            yield event("response.output_item.done", output_index=index, item=item.model_dump(mode="json"))
        kind = "response.incomplete" if done.status == "incomplete" else "response.completed"
        yield event(kind, response=done.model_dump(mode="json"))
