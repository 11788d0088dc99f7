"""A chat choice's reply: the message of a finished completion (:func:`reply_of`), and the stream deltas of one
being written (:class:`ChoiceStream`), with its reasoning split off (``reasoning``) and its tool calls parsed
(``tool_calls``, ``tool_call_stream``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pagedllm.core.outputs import CompletionOutput, SampleLogprobs
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionStreamChoice,
    ChatLogProbs,
    ChatLogprobToken,
    ChatResponseMessage,
    ChatTopLogprob,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
)
from pagedllm.entrypoints.openai.reasoning import ReasoningFormat, ReasoningStream
from pagedllm.entrypoints.openai.serving_base import finite_logprob, token_label
from pagedllm.entrypoints.openai.streaming import DeltaTracker
from pagedllm.entrypoints.openai.tool_call_stream import ToolCallStream, merge_deltas
from pagedllm.entrypoints.openai.tool_calls import ToolMode


def chat_logprobs(token_ids: Sequence[int], logprobs: SampleLogprobs, num_top: int,
                  as_ids: bool = False) -> ChatLogProbs:
    """The chat logprobs of some generated tokens, each with its ``num_top`` most likely alternatives; tokens
    named ``token_id:<id>`` with ``as_ids`` (:func:`token_label`)."""
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        sampled = entry.get(token_id)
        token = token_label(token_id, sampled, as_ids)
        ranked = sorted(entry.items(), key=lambda item: -item[1].logprob)[:num_top]
        top = []
        for other, lp in ranked:
            label = token_label(other, lp, as_ids)
            top.append(ChatTopLogprob(token=label, logprob=finite_logprob(lp.logprob), bytes=list(label.encode())))
        content.append(ChatLogprobToken(token=token, bytes=list(token.encode()), top_logprobs=top,
                                        logprob=finite_logprob(sampled.logprob if sampled else -math.inf)))
    return ChatLogProbs(content=content)


def reply_of(completion: CompletionOutput, tools: ToolMode, reasoning: ReasoningFormat | None = None,
             include_reasoning: bool = True) -> tuple[ChatResponseMessage, str | None]:
    """A finished completion as the assistant's message (its reasoning, split off by ``reasoning`` and kept when
    ``include_reasoning``; its answer's text, or the tool calls ``tools`` parses from the answer) and its finish
    reason (``"tool_calls"`` when the model chose to call, as OpenAI reports it)."""
    split = reasoning.split(completion.text) if reasoning is not None else None
    answer = completion.text if split is None else split.answer
    if answer is None:
        content, calls = None, []
    else:
        content, calls = tools.parse(answer) if tools.parses else (answer, [])
    finish = completion.finish_reason
    if calls and tools.kind != "named" and finish == "stop":
        finish = "tool_calls"
    thought = None if split is None or not include_reasoning else split.reasoning
    return ChatResponseMessage(content=content, tool_calls=calls or None, reasoning=thought,
                               reasoning_content=thought), finish


def _delta(content: str | None, thought: str, calls: list[DeltaToolCall] | None = None) -> DeltaMessage:
    return DeltaMessage(content=content, tool_calls=calls or None, reasoning=thought or None,
                        reasoning_content=thought or None)


class ChoiceStream:
    """One choice of a streamed chat reply. :meth:`next` takes the choice's cumulative output at each step and
    returns what goes out: the reasoning as it is written (``reasoning``), then the answer's text as it comes
    (with the tokens' logprobs); under ``tool_choice`` ``"auto"`` the answer's text until a tool call begins,
    then each call's name and its arguments as they grow (``tool_call_stream``); a forced call (named or
    ``"required"``) whole when the reply finishes. Text that a stop string may still cut waits. Without
    ``include_reasoning`` the reasoning is split off but not sent."""

    def __init__(self, index: int, tools: ToolMode, reasoning: ReasoningFormat | None, stop: list[str] | None,
                 num_logprobs: int | None, include_reasoning: bool = True, tokens_as_ids: bool = False) -> None:
        self.index = index
        self.tokens_as_ids = tokens_as_ids
        self.tools = tools
        self.reasoning_format = reasoning
        self.include_reasoning = include_reasoning
        self.num_logprobs = num_logprobs
        self.tracker = DeltaTracker.for_stops(stop)
        self.reasoning = None if reasoning is None else ReasoningStream(reasoning)
        self.calls = None if tools.format is None else ToolCallStream(tools.format, tools.max_calls)
        self.answer_sent = 0  # characters of a plain answer sent
        self.done = False

    def next(self, completion: CompletionOutput) -> ChatCompletionStreamChoice | None:
        """The stream choice that ``completion`` (this choice's output so far) adds; None when nothing new."""
        if self.done:
            return None
        delta = self.tracker.next(completion)
        if delta is None:
            return None
        finished = delta.finish_reason is not None
        self.done = finished
        visible = completion.text[:self.tracker.num_chars]
        thought, answer = self.reasoning.next(visible, finished) if self.reasoning is not None else ("", visible)
        if not self.include_reasoning:
            thought = ""
        if self.tools.parses:
            return self._last(completion, thought, answer or "") if finished else self._calls(thought, answer)
        text = (answer or "")[self.answer_sent:]
        self.answer_sent += len(text)
        logprobs = None
        if delta.logprobs is not None:
            logprobs = chat_logprobs(delta.token_ids, delta.logprobs, self.num_logprobs or 0, self.tokens_as_ids)
        return ChatCompletionStreamChoice(index=self.index, delta=_delta(text if text or not thought else None,
                                                                         thought), logprobs=logprobs,
                                          finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)

    def _calls(self, thought: str, answer: str | None) -> ChatCompletionStreamChoice | None:
        """A step of a reply that may call tools: the new reasoning, content before the calls and call deltas."""
        content, calls = "", []
        if self.calls is not None and answer is not None:
            content, calls = self.calls.next(answer)
        if not (content or calls or thought):
            return None
        return ChatCompletionStreamChoice(index=self.index, delta=_delta(content or None, thought, calls))

    def _last(self, completion: CompletionOutput, thought: str, answer: str) -> ChatCompletionStreamChoice:
        """The last choice of a finished reply that may call tools: its calls, and the content not sent yet."""
        message, finish = reply_of(completion, self.tools, self.reasoning_format, self.include_reasoning)
        content = message.content
        if self.calls is None:  # a forced call: nothing of it went out yet
            calls = [DeltaToolCall(index=i, id=call.id, type="function", function=DeltaFunctionCall(
                name=call.function.name, arguments=call.function.arguments))
                for i, call in enumerate(message.tool_calls or [])]
        else:  # what this last step adds, then what only the whole reply tells
            content, calls = self.calls.next(answer)
            if message.tool_calls:
                calls = merge_deltas(calls + self.calls.finish(answer, message.tool_calls))
            else:  # no valid calls after all: the rest of the answer is content
                content += answer[self.calls.content.sent:]
            content = content or None
        return ChatCompletionStreamChoice(index=self.index, finish_reason=finish, stop_reason=completion.stop_reason,
                                          delta=_delta(content, thought, calls))
