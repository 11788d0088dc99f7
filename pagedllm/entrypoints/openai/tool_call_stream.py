"""Streaming a ``tool_choice="auto"`` reply as vLLM streams it, in any of the ``tool_call_formats``: the text before
the calls as it comes, then each call as soon as its name is complete (its index, id, type and name, in one
delta) and its arguments' JSON text as it grows, so a client that concatenates the ``arguments`` deltas of
an index holds the call's arguments. The reply's last chunk carries what is left: the rest of each call's
arguments, any call not opened yet, or, when the reply turns out not to hold valid calls, the rest of its text.

The arguments stream as the model writes them (its spacing, not ``json.dumps``'s); the non-streamed reply holds
the same value, re-serialized. A call whose ``arguments`` is not an object (a JSON string holding JSON, as some
models write it) is held back and sent whole at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pagedllm.entrypoints.openai.protocol import DeltaFunctionCall, DeltaToolCall, ToolCall
from pagedllm.entrypoints.openai.tool_call_formats import ToolCallFormat, new_call_id, skip_space

_DECODER = json.JSONDecoder()


class ContentBeforeCalls:
    """Streams an ``"auto"`` reply's text as it grows, up to where its tool calls begin in ``format``: text that
    could be the start of them is held back until the next tokens tell; once a call begins, nothing more is sent
    as content."""

    def __init__(self, format: ToolCallFormat) -> None:
        self.format = format
        self.sent = 0  # characters of the reply already sent

    def next(self, text: str) -> str:
        """The new content of the reply's cumulative ``text`` that can be sent now ("" if none)."""
        end = self.format.content_end(text)
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta


@dataclass(frozen=True, slots=True)
class CallSoFar:
    """What one ``<tool_call>`` block's text says so far: the function's ``name`` once its string is complete,
    and the text of its ``arguments`` (or ``parameters``) value from its first character to the end of what is
    written (``arguments_complete``: that value is whole); ``arguments_is_object``: it opens with ``{``."""

    name: str | None
    arguments: str | None
    arguments_complete: bool
    arguments_is_object: bool


def scan_call(block: str) -> CallSoFar:
    """Read the top-level members of a call's JSON object, which may be cut short anywhere (one of
    :meth:`ToolCallFormat.blocks`)."""
    name, arguments, complete = None, None, False
    pos = skip_space(block, 0)
    if not block.startswith("{", pos):
        return CallSoFar(None, None, False, False)
    pos += 1
    while True:
        pos = skip_space(block, pos)
        try:
            key, pos = _DECODER.raw_decode(block, pos)
        except ValueError:
            break
        pos = skip_space(block, pos)
        if not block.startswith(":", pos):
            break
        start = skip_space(block, pos + 1)
        try:
            value, end = _DECODER.raw_decode(block, start)
        except ValueError:  # cut short inside the value
            if key in ("arguments", "parameters") and start < len(block):
                arguments = block[start:].rstrip()
            break
        if key == "name" and isinstance(value, str):
            name = value
        elif key in ("arguments", "parameters"):
            arguments, complete = block[start:end], True
        pos = skip_space(block, end)
        if not block.startswith(",", pos):
            break
        pos += 1
    return CallSoFar(name, arguments, complete, arguments is not None and arguments.startswith("{"))


@dataclass(slots=True)
class _OpenCall:
    id: str
    sent: int = 0  # characters of the arguments' text sent


class ToolCallStream:
    """One streamed choice of an ``"auto"`` reply in ``format`` (see the module docstring). :meth:`next` takes the
    reply's cumulative text at each step; :meth:`finish` the finished reply's parsed calls."""

    def __init__(self, format: ToolCallFormat, max_calls: int | None = None) -> None:
        self.format = format
        self.max_calls = max_calls  # calls past it are never opened (parallel_tool_calls false)
        self.content = ContentBeforeCalls(format)
        self.calls: list[_OpenCall] = []

    def next(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        """``(content, call deltas)`` that ``text`` (the reply so far) adds to what went out."""
        content = self.content.next(text)
        deltas = []
        for index, block in enumerate(self.format.blocks(text)[:self.max_calls]):
            call = scan_call(block)
            delta = self._advance(index, call, call.arguments if call.arguments_is_object else None)
            if delta is None:
                break
            if delta.function is not None:
                deltas.append(delta)
        return content, deltas

    def finish(self, text: str, calls: list[ToolCall]) -> list[DeltaToolCall]:
        """The last deltas of a finished reply whose text parsed into ``calls``: the rest of every call's
        arguments (a call not opened yet whole, with the arguments as the model wrote them)."""
        deltas = []
        for index, (block, parsed) in enumerate(zip(self.format.finished_blocks(text), calls, strict=False)):
            call = scan_call(block)
            written = call.arguments if call.arguments_is_object and call.arguments_complete else None
            arguments = written if written is not None else parsed.function.arguments  # held back: whole
            delta = self._advance(index, CallSoFar(parsed.function.name, arguments, True, True), arguments)
            if delta is not None and delta.function is not None:
                deltas.append(delta)
        return deltas

    def _advance(self, index: int, call: CallSoFar, arguments: str | None) -> DeltaToolCall | None:
        """The delta that opens call ``index`` (once its name is known) and sends ``arguments`` past what went
        out; None when the call cannot open yet (calls open in order). A delta without a function: nothing new."""
        if index > len(self.calls) or (index == len(self.calls) and call.name is None):
            return None
        opening = index == len(self.calls)
        if opening:
            self.calls.append(_OpenCall(new_call_id()))
        open_call = self.calls[index]
        new = ""
        if arguments is not None and len(arguments) > open_call.sent:
            new = arguments[open_call.sent:]
            open_call.sent = len(arguments)
        if opening:
            return DeltaToolCall(index=index, id=open_call.id, type="function",
                                 function=DeltaFunctionCall(name=call.name, arguments=new))
        return DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=new) if new else None)


def merge_deltas(deltas: list[DeltaToolCall]) -> list[DeltaToolCall]:
    """One delta per call index, in index order: the first's id, type and name, the arguments concatenated."""
    merged: dict[int, DeltaToolCall] = {}
    for delta in deltas:
        first = merged.get(delta.index)
        if first is None:
            merged[delta.index] = delta
            continue
        function = first.function or DeltaFunctionCall()
        arguments = (function.arguments or "") + ((delta.function.arguments if delta.function else None) or "")
        merged[delta.index] = DeltaToolCall(index=delta.index, id=first.id, type=first.type,
                                            function=DeltaFunctionCall(name=function.name, arguments=arguments))
    return [merged[i] for i in sorted(merged)]
