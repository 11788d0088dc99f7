"""Reasoning models' thinking markup as the engine needs it (``EngineConfig.reasoning_parser``, vLLM's
``--reasoning-parser``): a structured output applies to the answer, from the first token after the thinking
ends, not to the thinking. The server's reasoning parsers split replies at the same tags
(``entrypoints/openai/reasoning.py``).
"""

from __future__ import annotations

REASONING_TAGS: dict[str, tuple[str, str]] = {"deepseek_r1": ("<think>", "</think>"), "qwen3": ("<think>", "</think>")}
"""Each reasoning parser's tags: ``(start, end)`` of the thinking."""


def prompt_closes_thinking(prompt_text: str, parser: str) -> bool:
    """Whether a prompt leaves the model answering rather than thinking: its last end tag comes after its last
    start tag (Qwen3's template closes an empty thinking block when ``enable_thinking`` is false). A prompt with
    neither tag, or one that ends inside a thinking block (DeepSeek-R1's template opens it), does not."""
    start, end = REASONING_TAGS[parser]
    last_end = prompt_text.rfind(end)
    return last_end >= 0 and last_end > prompt_text.rfind(start)
