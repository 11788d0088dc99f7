"""Tool calling for ``/v1/chat/completions``, as OpenAI's API and vLLM define it.

``tools`` go to the chat template. ``tool_choice`` decides how the reply may call them:

- ``"none"`` (or no tools): plain text;
- a named function (``{"type": "function", "function": {"name": ...}}``): the reply is forced, through structured
  outputs, to be a JSON object matching that function's ``parameters``; it becomes one tool call
  (``finish_reason`` ``"stop"``, as OpenAI answers a forced call);
- ``"required"``: the reply is forced to be a non-empty JSON array of ``{"name", "parameters"}`` objects naming
  the tools, each call one of them (``finish_reason`` ``"tool_calls"``);
- ``"auto"`` (OpenAI's default when tools are given): the model decides; its text is parsed by the server's
  ``--tool-call-parser`` (``hermes``, ``mistral``, ``llama3_json``, ``pythonic`` or ``qwen3_coder``:
  ``tool_call_formats``), which ``--enable-auto-tool-choice`` turns on; without it, a 400.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from pagedllm.core.sampling_params import StructuredOutputsParams
from pagedllm.entrypoints.openai.errors import invalid_param
from pagedllm.entrypoints.openai.protocol import ToolCall
from pagedllm.entrypoints.openai.tool_call_formats import TOOL_CALL_FORMATS, ToolCallFormat, new_call


@dataclass(frozen=True, slots=True)
class ToolMode:
    """How a request's reply may call its tools: ``kind`` is ``"none"``, ``"named"`` (``name`` the function),
    ``"required"`` or ``"auto"`` (``parser`` the server's tool-call parser); ``parallel`` False
    (``parallel_tool_calls``): at most one call."""

    kind: str
    name: str | None = None
    parser: str | None = None
    tools: tuple[dict[str, Any], ...] = ()
    parallel: bool = True

    @property
    def max_calls(self) -> int | None:
        """The most calls a reply makes (None: no limit)."""
        return None if self.parallel else 1

    @property
    def format(self) -> ToolCallFormat | None:
        """The tool-call format an ``"auto"`` reply is parsed with (None for the other kinds)."""
        if self.kind != "auto" or self.parser is None:
            return None
        return TOOL_CALL_FORMATS[self.parser].for_tools(self.tools)

    @property
    def parses(self) -> bool:
        """Whether the reply's text becomes tool calls (every kind but ``"none"``)."""
        return self.kind != "none"

    def structured_output(self) -> StructuredOutputsParams | None:
        """The structure a forced call's reply must have (None for ``"none"`` and ``"auto"``)."""
        if self.kind == "named":  # compact JSON: no whitespace a model could loop in
            return StructuredOutputsParams(json=_parameters(_function(self.tools, self.name)),
                                           disable_any_whitespace=True)
        if self.kind == "required":
            calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                                       "parameters": _parameters(f)},
                      "required": ["name", "parameters"]} for f in (t["function"] for t in self.tools)]
            array = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            if not self.parallel:
                array["maxItems"] = 1
            return StructuredOutputsParams(json=array, disable_any_whitespace=True)
        return None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """``(content, tool calls)`` of a finished reply's text; a reply that does not parse stays content."""
        if self.kind == "named":
            return None, [new_call(self.name or "", text)]
        if self.kind == "required":
            try:
                calls = json.loads(text)
                return None, [new_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in calls]
            except (ValueError, TypeError, KeyError):
                return text, []  # cut short by max_tokens: not a complete array
        if self.format is not None:
            content, calls = self.format.parse(text)
            return content, calls[:self.max_calls]
        return text, []


def resolve_tool_mode(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
                      parser: str | None, parallel: bool = True) -> ToolMode:
    """The request's :class:`ToolMode`; a 400 naming ``tools`` or ``tool_choice`` for a malformed tool, an
    unknown choice or function, or ``"auto"`` on a server without a tool-call parser."""
    if tools is not None:
        for i, tool in enumerate(tools):  # dicts: the request model says so
            function = tool.get("function")
            if tool.get("type", "function") != "function" or not isinstance(function, dict) or \
                    not isinstance(function.get("name"), str):
                raise invalid_param(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                                    f"'parameters': ...}}}}", "tools")
            if not isinstance(function.get("parameters", {}), dict):
                raise invalid_param(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
    if not tools:
        if tool_choice not in (None, "none"):
            raise invalid_param("tool_choice needs tools", "tool_choice")
        return ToolMode("none")
    frozen = tuple(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise invalid_param("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                                "'function': {'name': ...}}", "tool_choice")
        _function(frozen, name)
        return ToolMode("named", name=name, tools=frozen)
    if choice == "none":
        return ToolMode("none", tools=frozen)
    if choice == "required":
        return ToolMode("required", tools=frozen, parallel=parallel)
    if choice == "auto":
        if parser is None:
            raise invalid_param("tool_choice 'auto' needs a server started with --enable-auto-tool-choice and "
                                "--tool-call-parser (name a function, or use 'required')", "tool_choice")
        return ToolMode("auto", parser=parser, tools=frozen, parallel=parallel)
    raise invalid_param(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}",
                        "tool_choice")


def arguments_as_objects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with each assistant tool call's ``arguments`` as an object, not a JSON string: the form
    chat templates (Qwen's, Llama's) render."""
    for message in messages:
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                with contextlib.suppress(ValueError):  # else left as the client sent it
                    function["arguments"] = json.loads(function["arguments"])
    return messages


def _function(tools: tuple[dict[str, Any], ...], name: str | None) -> dict[str, Any]:
    for tool in tools:
        if tool["function"]["name"] == name:
            return tool["function"]
    raise invalid_param(f"tool_choice names function {name!r}, which is not among the tools "
                        f"{[t['function']['name'] for t in tools]}", "tool_choice")


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object"}
