"""The HTTP side's tokenizer: its own copy (the engine thread uses the engine's), run in one worker thread.

A Hugging Face fast tokenizer must not be used by two threads at once, and tokenizing a long prompt or
rendering a chat template should not hold up the event loop; one dedicated thread gives both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pagedllm.entrypoints.openai.protocol import ChatMessage, ChatTemplateOptions

_T = TypeVar("_T")


def messages_for_template(messages: Sequence[ChatMessage], param: str = "messages") -> list[dict[str, Any]]:
    """The conversation as the plain dicts a chat template reads; text content parts are joined.

    Raises ValueError naming the message for a non-text content part or an empty conversation.
    """
    if not messages:
        raise ValueError(f"{param} is empty: at least one message is needed")
    result = []
    for i, message in enumerate(messages):
        item = message.model_dump(exclude_none=True)
        if isinstance(message.content, list):
            texts = []
            for part in message.content:
                if part.type != "text" or part.text is None:
                    raise ValueError(f"{param}[{i}].content: only text parts are supported, got type {part.type!r}")
                texts.append(part.text)
            item["content"] = "\n".join(texts)
        result.append(item)
    return result


def load_chat_template(value: str | None) -> str | None:
    """The ``--chat-template`` option: a file's contents, or the value itself when it is an inline template.

    Raises FileNotFoundError when the value is neither an existing file nor a Jinja template.
    """
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise FileNotFoundError(f"chat template file {value!r} does not exist (pass a file or an inline Jinja template)")


class AsyncTokenizer:
    """Encode, decode and render chat templates off the event loop.

    ``tokenizer`` is a Hugging Face tokenizer or None (a model without one: only token-id prompts work);
    ``chat_template`` overrides the tokenizer's own template.
    """

    def __init__(self, tokenizer: Any | None, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedllm-tokenizer")

    async def _call(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def _require(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send prompts as token ids")
        return self.tokenizer

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (as the engine tokenizes a text prompt when ``add_special_tokens``)."""
        tokenizer = self._require()
        return await self._call(lambda: list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids))

    async def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``."""
        tokenizer = self._require()
        return await self._call(lambda: tokenizer.decode(token_ids))

    async def render_chat(self, messages: list[dict[str, Any]], options: ChatTemplateOptions,
                          tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text of a conversation (and of the ``tools`` it may call) through the chat template, as
        ``options`` ask (a request's :class:`ChatTemplateOptions` fields).

        Raises ValueError when there is no template, the options contradict each other, or the template rejects
        the conversation (with ``continue_final_message``, also when its last message is not found in the text).
        """
        tokenizer = self._require()
        if options.continue_final_message and options.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true (the first "
                             "continues the last message, the second opens a new assistant turn)")

        def render() -> str:
            import jinja2

            try:
                return tokenizer.apply_chat_template(
                    messages, chat_template=self.chat_template, add_generation_prompt=options.add_generation_prompt,
                    continue_final_message=options.continue_final_message, tokenize=False, tools=tools,
                    **(options.chat_template_kwargs or {}),
                )
            except (jinja2.TemplateError, TypeError) as exc:
                raise ValueError(f"the chat template failed on these messages: {exc}") from exc

        return await self._call(render)

    def close(self) -> None:
        """Stop the worker thread."""
        self._pool.shutdown(wait=False, cancel_futures=True)
