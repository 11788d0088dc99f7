"""What a prompt may be, as vLLM's offline API takes it, and its checks.

A prompt is text (``str``), token ids (a sequence of ints: a list, a tuple, a 1-D integer tensor or NumPy
array), or one of vLLM's dictionaries: :class:`TextPrompt` (``{"prompt": "..."}``) and :class:`TokensPrompt`
(``{"prompt_token_ids": [...]}``). Anything else is refused with a ValueError that says what was given, before
any request is queued.
"""

from __future__ import annotations

import numbers
from array import array
from collections.abc import Sequence
from typing import TypedDict


class TextPrompt(TypedDict):
    """A text prompt as vLLM's ``TextPrompt``: ``{"prompt": "Hello"}``; tokenized with the model's tokenizer."""

    prompt: str


class _TokenIds(TypedDict):
    prompt_token_ids: Sequence[int]


class TokensPrompt(_TokenIds, total=False):
    """Token ids as vLLM's ``TokensPrompt``: ``{"prompt_token_ids": [1, 2, 3]}``; ``prompt`` (optional) is the
    text they stand for, returned as ``RequestOutput.prompt``; it is not tokenized."""

    prompt: str


PromptType = str | Sequence[int] | TextPrompt | TokensPrompt
"""One prompt: text, token ids, or a :class:`TextPrompt` / :class:`TokensPrompt`."""

_KEYS = {"prompt", "prompt_token_ids"}


def is_single_prompt(prompts: object) -> bool:
    """Whether ``prompts`` (what ``LLM.generate`` was given) is one prompt rather than a list of them: text, a
    dictionary, a 1-D tensor or array, a non-empty sequence whose first item is a number (a list of prompts
    holds strings, sequences or dictionaries), or anything that is no sequence at all (None, a number: one
    malformed prompt, which :func:`parse_prompt` then names)."""
    if isinstance(prompts, (str, dict)):
        return True
    if hasattr(prompts, "ndim"):
        return prompts.ndim == 1  # type: ignore[attr-defined]
    if not isinstance(prompts, Sequence):
        return True
    if len(prompts) > 0:
        first = prompts[0]
        return isinstance(first, numbers.Number) or getattr(first, "ndim", None) == 0  # NumPy / 0-d tensor ints
    return False


def parse_prompt(prompt: object) -> tuple[str | None, list[int] | None]:
    """Split one prompt into ``(text, token_ids)``.

    Called by ``LLMEngine.add_request`` for every prompt before it is queued. Text comes back as
    ``(text, None)`` (to be tokenized); token ids as ``(text_or_None, ids)`` with ``ids`` a new list of Python
    ints (:func:`token_ids_of`). Raises ValueError naming what is wrong for anything else.
    """
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        unknown = sorted(set(prompt) - _KEYS, key=str)
        if unknown:
            raise ValueError(f"prompt dictionary has unsupported keys {unknown}; pagedllm takes "
                             "{'prompt': str} or {'prompt_token_ids': [int, ...]} (optionally with 'prompt')")
        text = prompt.get("prompt")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"prompt['prompt'] must be a string, got {type(text).__name__}")
        if "prompt_token_ids" in prompt:
            return text, token_ids_of(prompt["prompt_token_ids"])
        if text is None:
            raise ValueError("prompt dictionary needs 'prompt' (text) or 'prompt_token_ids' (token ids)")
        return text, None
    if isinstance(prompt, (bytes, bytearray)) or not (isinstance(prompt, Sequence) or hasattr(prompt, "ndim")):
        raise ValueError(f"a prompt must be text, a list of token ids or a prompt dictionary, "
                         f"got {type(prompt).__name__}")
    return None, token_ids_of(prompt)


def token_ids_of(ids: object) -> list[int]:
    """``ids`` (a sequence of integers: Python, NumPy or 0-d tensor ints; or a 1-D integer tensor/array) as a new
    list of Python ints, converted in C (~10 us for 512 ids). Raises ValueError for anything that is not
    integers: text, floats, nested lists, a multi-dimensional array."""
    if isinstance(ids, (str, bytes, bytearray, dict)):
        raise ValueError(f"prompt token ids must be a sequence of integers, got {type(ids).__name__}")
    ndim = getattr(ids, "ndim", 1)
    if ndim != 1:
        raise ValueError(f"prompt token ids must be one-dimensional, got {ndim} dimensions")
    if hasattr(ids, "tolist"):
        ids = ids.tolist()  # a tensor or array: its ints, or floats refused below
    try:
        return array("q", ids).tolist()  # type: ignore[arg-type]
    except (TypeError, OverflowError) as exc:
        bad = next((t for t in ids if not _is_int(t)), None) if isinstance(ids, Sequence) else None  # type: ignore[union-attr]
        what = f"{bad!r} ({type(bad).__name__})" if bad is not None else str(exc)
        raise ValueError(f"prompt token ids must be integers, got {what}") from None


def _is_int(value: object) -> bool:
    try:
        array("q", [value])  # type: ignore[list-item]
    except (TypeError, OverflowError):
        return False
    return True
