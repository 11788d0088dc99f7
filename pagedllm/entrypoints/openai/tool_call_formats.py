"""The tool-call formats a ``tool_choice="auto"`` reply is parsed with (``--tool-call-parser``), as vLLM names them:

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks after any text (Qwen2.5, Qwen3,
  Hermes);
- ``mistral``: ``[TOOL_CALLS]`` then a JSON array of ``{"name": ..., "arguments": {...}}`` objects (Mistral 7B
  v0.3, Mistral NeMo, Mixtral), or ``[TOOL_CALLS]name[ARGS]{...}`` per call (Mistral's v11+ tokenizers);
  ``[TOOL_CALLS]`` is a special token, so these replies keep special tokens;
- ``llama3_json``: a reply that *begins* with ``{"name": ..., "parameters": {...}}`` (after an optional
  ``<|python_tag|>``), several calls separated by ``;`` (Llama 3.1, 3.2, 3.3);
- ``pythonic``: a reply that *begins* with a Python list of calls, ``[get_weather(city="Paris")]`` (Llama 3.2
  and 4 with their pythonic templates, ToolACE);
- ``qwen3_coder``: ``<tool_call><function=NAME><parameter=KEY>value</parameter>...</function></tool_call>`` blocks
  after any text (Qwen3-Coder); each value is text, read as its parameter's JSON-schema type says.

Each format says where a reply's calls begin and cuts the text after that into one piece per call, the last
perhaps cut short; parsing a finished reply and streaming one (``tool_call_stream``) both read those pieces.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar

from pagedllm.entrypoints.openai.protocol import FunctionCall, ToolCall
from pagedllm.entrypoints.openai.reasoning import held_back

_DECODER = json.JSONDecoder()


class ToolCallFormat:
    """How one model family writes tool calls. Subclasses set :attr:`name` and :attr:`marker` and cut the calls'
    text into pieces (:meth:`blocks`)."""

    name: ClassVar[str]
    marker: ClassVar[str]  # the text that opens a reply's calls
    keeps_special_tokens: ClassVar[bool] = False  # the marker is a special token: detokenize with special tokens

    def for_tools(self, tools: Sequence[dict[str, Any]]) -> ToolCallFormat:
        """This format for a request offering ``tools`` (OpenAI's ``{"type": "function", "function": {...}}``):
        itself, unless reading its calls needs the functions' parameter schemas."""
        return self

    def calls_start(self, text: str) -> int | None:
        """Where ``text``'s calls begin (the marker's index), or None when it holds none."""
        index = text.find(self.marker)
        return None if index < 0 else index

    def content_end(self, text: str) -> int:
        """How much of a reply still being written is surely content: up to where its calls begin, holding back a
        tail that could be the start of the marker."""
        start = self.calls_start(text)
        if start is not None:
            return start
        return len(text) - held_back(text, self.marker)

    def blocks(self, text: str) -> list[str]:
        """The text of each call of ``text``, in order, the last perhaps cut short ([] when it holds none)."""
        raise NotImplementedError

    def finished_blocks(self, text: str) -> list[str]:
        """The pieces of a finished reply that are calls (by default all of :meth:`blocks`)."""
        return self.blocks(text)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """``(content, calls)`` of a finished reply: the text before the calls (None when empty) and every call,
        or ``(text, [])`` when it holds none or any of its calls is not a JSON object naming a function."""
        start = self.calls_start(text)
        blocks = self.finished_blocks(text) if start is not None else []
        if not blocks:
            return text, []
        calls = []
        for block in blocks:
            try:
                value = json.loads(block)
                arguments = value.get("arguments", value.get("parameters", {}))
                if not isinstance(value["name"], str):
                    return text, []
                calls.append(new_call(value["name"], arguments if isinstance(arguments, str)
                                      else json.dumps(arguments, ensure_ascii=False)))
            except (ValueError, TypeError, KeyError, AttributeError):
                return text, []
        content = text[:start].strip()
        return content or None, calls


class HermesFormat(ToolCallFormat):
    """``<tool_call>{...}</tool_call>`` blocks; a block without its closing tag is not a call."""

    name = "hermes"
    marker = "<tool_call>"
    end_marker = "</tool_call>"

    def blocks(self, text: str) -> list[str]:
        """Each block's text after its opening tag, up to its closing tag or, for the last, the end of ``text``."""
        blocks = []
        start = text.find(self.marker)
        while start >= 0:
            body = start + len(self.marker)
            end = text.find(self.end_marker, body)
            blocks.append(text[body:] if end < 0 else text[body:end])
            start = -1 if end < 0 else text.find(self.marker, end)
        return blocks

    def finished_blocks(self, text: str) -> list[str]:
        """The closed blocks (a last block without its closing tag is left out)."""
        blocks = self.blocks(text)
        closed = text.find(self.end_marker, text.rfind(self.marker)) >= 0
        return blocks if closed else blocks[:-1]


def json_objects(text: str, pos: int, separators: str) -> list[str]:
    """The JSON objects written one after another from ``pos`` (whitespace and ``separators`` between them), each
    as its text; the last may be cut short (the rest of ``text`` from its ``{``). Stops at anything else."""
    objects = []
    while True:
        pos = skip_space(text, pos, separators)
        if not text.startswith("{", pos):
            return objects
        try:
            _, end = _DECODER.raw_decode(text, pos)
        except ValueError:  # cut short (or broken): the rest is this call's text
            objects.append(text[pos:])
            return objects
        objects.append(text[pos:end])
        pos = end


class MistralFormat(ToolCallFormat):
    """``[TOOL_CALLS] [{...}, {...}]`` (a single object without the brackets is read too), or the form of
    Mistral's v11+ tokenizers (Mistral Small 3.1+, Devstral, Magistral): ``[TOOL_CALLS]name[ARGS]{...}`` per call,
    with an optional ``[CALL_ID]id`` before ``[ARGS]``."""

    name = "mistral"
    marker = "[TOOL_CALLS]"
    keeps_special_tokens = True

    def blocks(self, text: str) -> list[str]:
        """The calls after the first marker: the array's objects, or each named call as the JSON object
        ``{"name": ..., "arguments": ...}`` it stands for (its arguments' text as written)."""
        start = self.calls_start(text)
        if start is None:
            return []
        pos = skip_space(text, start + len(self.marker))
        if text.startswith(("[", "{"), pos) and not text.startswith(("[ARGS]", "[CALL_ID]"), pos):
            return json_objects(text, pos + 1 if text.startswith("[", pos) else pos, ",")
        return self._named_calls(text, start)

    def _named_calls(self, text: str, pos: int) -> list[str]:
        blocks = []
        while text.startswith(self.marker, pos):
            pos += len(self.marker)
            name_end = _NAME_END.search(text, pos)
            if name_end is None:  # the name is still being written
                blocks.append('{"name": "')
                break
            name = json.dumps(text[pos:name_end.start()].strip())
            pos = name_end.start()
            if text.startswith("[CALL_ID]", pos):
                args = _ARGS_START.search(text, pos)
                if args is None:
                    blocks.append(f'{{"name": {name}, "arguments": ')
                    break
                pos = args.start()
            if text.startswith("[ARGS]", pos):
                pos += len("[ARGS]")
            pos = skip_space(text, pos)
            try:
                _, end = _DECODER.raw_decode(text, pos)
            except ValueError:  # cut short: the rest is this call's arguments so far
                blocks.append(f'{{"name": {name}, "arguments": {text[pos:]}')
                break
            blocks.append(f'{{"name": {name}, "arguments": {text[pos:end]}}}')
            pos = skip_space(text, end)
        return blocks


_NAME_END = re.compile(r"\[ARGS\]|\[CALL_ID\]|\{")
_ARGS_START = re.compile(r"\[ARGS\]|\{")


def skip_space(text: str, pos: int, separators: str = "") -> int:
    """The first position from ``pos`` on that is neither whitespace nor one of ``separators`` (``len(text)`` if
    none)."""
    while pos < len(text) and (text[pos].isspace() or text[pos] in separators):
        pos += 1
    return pos


class Llama3JsonFormat(ToolCallFormat):
    """A reply that begins with a JSON object (after an optional ``<|python_tag|>``); calls separated by ``;``."""

    name = "llama3_json"
    marker = "<|python_tag|>"

    def calls_start(self, text: str) -> int | None:
        """0 when the reply (past leading whitespace) begins with ``{`` or the python tag, else None."""
        stripped = text.lstrip()
        return 0 if stripped.startswith(("{", self.marker)) else None

    def content_end(self, text: str) -> int:
        """0 while the reply may still turn out to be calls (it is blank or a start of the tag), else all of it."""
        stripped = text.lstrip()
        return 0 if self.calls_start(text) == 0 or self.marker.startswith(stripped) else len(text)

    def blocks(self, text: str) -> list[str]:
        """The objects from the start of the reply (the tag skipped)."""
        if self.calls_start(text) is None:
            return []
        pos = len(text) - len(text.lstrip())
        if text.startswith(self.marker, pos):
            pos += len(self.marker)
        return json_objects(text, pos, ";")


class PythonicFormat(ToolCallFormat):
    """A reply that begins with a Python list of calls with literal keyword arguments:
    ``[get_weather(city="Paris", days=2), get_time()]``. Each call is read as the JSON object
    ``{"name": ..., "arguments": {...}}`` it stands for (``True`` becomes ``true``, ...); its arguments stream
    whole, once the call's parenthesis closes."""

    name = "pythonic"
    marker = "["

    def calls_start(self, text: str) -> int | None:
        """0 when the reply opens with ``[name(``, else None."""
        return 0 if _opens_calls(text) else None

    def content_end(self, text: str) -> int:
        """0 while the reply may still open with a call, else all of it."""
        return len(text) if _opens_calls(text) is False else 0

    def blocks(self, text: str) -> list[str]:
        """Each call from the start of the list; a call whose parenthesis is still open names its function
        only, and one whose arguments are not literal keywords names none (it is no call)."""
        if not _opens_calls(text):
            return []
        blocks = []
        pos = text.index("[") + 1
        while True:
            pos = skip_space(text, pos, ",")
            call = _PYTHON_CALL.match(text, pos)
            if call is None:
                if _PYTHON_NAME.fullmatch(text, pos):  # the name is still being written
                    blocks.append('{"name": "')
                return blocks
            name = json.dumps(call.group(1))
            end = _closing_parenthesis(text, call.end())
            if end is None:
                blocks.append(f'{{"name": {name}, "arguments": ')
                return blocks
            arguments = _keyword_arguments(text[pos:end])
            blocks.append('{"name": null}' if arguments is None else f'{{"name": {name}, "arguments": {arguments}}}')
            pos = end


_PYTHON_NAME = re.compile(r"[A-Za-z_][\w.]*")
_PYTHON_CALL = re.compile(r"([A-Za-z_][\w.]*)\s*\(")
_PYTHON_OPENING = re.compile(r"\s*\[\s*(?:([A-Za-z_][\w.]*)\s*(\()?)?")


def _opens_calls(text: str) -> bool | None:
    """Whether a reply opens with a Python list of calls: True, False, or None while it cannot tell yet."""
    opening = _PYTHON_OPENING.match(text)
    if opening is None:
        return None if not text.strip() else False
    if opening.group(2):
        return True
    return None if opening.end() == len(text) else False


def _closing_parenthesis(text: str, pos: int) -> int | None:
    """The index after the parenthesis that closes the one opened just before ``pos`` (None: still open),
    skipping brackets inside string literals."""
    depth, quote = 1, None
    while pos < len(text):
        char = text[pos]
        if quote is not None:
            if char == "\\":
                pos += 1
            elif char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:
                return pos + 1
        pos += 1
    return None


def _keyword_arguments(call: str) -> str | None:
    """A call's keyword arguments as a JSON object, or None unless every argument is a keyword with a literal
    value JSON can hold."""
    try:
        node = ast.parse(call, mode="eval").body
        if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
            return None
        return json.dumps({k.arg: ast.literal_eval(k.value) for k in node.keywords}, ensure_ascii=False)
    except (SyntaxError, ValueError, TypeError):
        return None


class Qwen3CoderFormat(HermesFormat):
    """Qwen3-Coder's XML calls inside ``<tool_call>`` blocks::

        <tool_call>
        <function=get_weather>
        <parameter=city>
        Paris
        </parameter>
        </function>
        </tool_call>

    A block reads as the JSON object ``{"name": ..., "arguments": {...}}``: each parameter's text (less the one
    newline on each side the template writes) taken as a string, or, where the function's schema types the
    parameter ``integer``, ``number``, ``boolean``, ``null``, ``object`` or ``array``, as that value (text that
    does not read as one stays a string). A call opens once its function's name is complete; its arguments
    stream whole, once ``</function>`` closes it. A block needs its ``</tool_call>`` to count in a finished
    reply, as ``hermes``'s."""

    name = "qwen3_coder"

    def __init__(self, parameters: dict[str, dict[str, Any]] | None = None) -> None:
        self.parameters = parameters or {}  # function name -> its JSON schema's properties

    def for_tools(self, tools: Sequence[dict[str, Any]]) -> ToolCallFormat:
        """A reader typing each function's parameters by its schema."""
        return Qwen3CoderFormat({tool["function"]["name"]: (tool["function"].get("parameters") or {}).get(
            "properties") or {} for tool in tools})

    def blocks(self, text: str) -> list[str]:
        """Each ``<tool_call>`` block as JSON: whole once its function closes; ``{"name": ..., "arguments": ``
        while its parameters are being written; ``{"name": "`` while its name is."""
        return [self._as_json(block) for block in super().blocks(text)]

    def _as_json(self, block: str) -> str:
        function = _XML_FUNCTION.search(block)
        if function is None:
            return '{"name": "'
        name = function.group(1).strip()
        end = block.find("</function>", function.end())
        if end < 0:
            return f'{{"name": {json.dumps(name)}, "arguments": '
        schema = self.parameters.get(name, {})
        arguments = {key.strip(): _typed(_strip_newline(value), schema.get(key.strip()) or {})
                     for key, value in _XML_PARAMETER.findall(block, function.end(), end)}
        return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


_XML_FUNCTION = re.compile(r"<function=([^>\n]+)>")
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)
_INTEGER = re.compile(r"\s*-?\d+\s*")


def _strip_newline(value: str) -> str:
    """A parameter's text less the newline the template writes after its opening tag and before its closing one."""
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def _typed(text: str, schema: dict[str, Any]) -> Any:
    """A parameter's text as the value its JSON schema's ``type`` says (the first of a list, ``null`` aside);
    strings, parameters without a type and text that does not read as the type stay text."""
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    stripped = text.strip()
    if kind == "integer" and _INTEGER.fullmatch(text):
        return int(stripped)
    if kind == "number":
        try:
            return int(stripped) if _INTEGER.fullmatch(text) else float(stripped)
        except ValueError:
            return text
    if kind == "boolean" and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    if kind == "null" and stripped == "null":
        return None
    if kind in ("object", "array"):
        try:
            return json.loads(stripped)
        except ValueError:
            try:
                value = ast.literal_eval(stripped)
                json.dumps(value)
                return value
            except (SyntaxError, ValueError, TypeError):
                return text
    return text


TOOL_CALL_FORMATS: dict[str, ToolCallFormat] = {f.name: f for f in (HermesFormat(), MistralFormat(),
                                                                      Llama3JsonFormat(), PythonicFormat(),
                                                                      Qwen3CoderFormat())}


def new_call_id() -> str:
    """A fresh tool call id (``chatcmpl-tool-`` and 32 hex digits, as vLLM names them)."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def new_call(name: str, arguments: str) -> ToolCall:
    """A tool call of function ``name`` with ``arguments`` (JSON text) and a fresh id."""
    return ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=arguments))
