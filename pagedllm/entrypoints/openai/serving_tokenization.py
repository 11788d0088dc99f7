"""``POST /tokenize`` and ``POST /detokenize``."""

from __future__ import annotations

from pagedllm.entrypoints.openai.errors import invalid_param
from pagedllm.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels
from pagedllm.entrypoints.openai.tokenization import AsyncTokenizer, messages_for_template


class OpenAIServingTokenization:
    """Token ids of a prompt or a conversation, and text of token ids, with the served model's tokenizer."""

    def __init__(self, tokenizer: AsyncTokenizer, models: OpenAIServingModels, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.models = models
        self.vocab_size = vocab_size

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """Tokenize ``prompt``, or ``messages`` rendered by the chat template; 400 unless exactly one is given."""
        self.models.check(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise invalid_param("give exactly one of prompt and messages", "prompt")
        try:
            if request.prompt is not None:
                add_special = True if request.add_special_tokens is None else request.add_special_tokens
                ids = await self.tokenizer.encode(request.prompt, add_special)
            else:
                assert request.messages is not None
                text = await self.tokenizer.render_chat(messages_for_template(request.messages), request)
                ids = await self.tokenizer.encode(text, bool(request.add_special_tokens))
        except ValueError as exc:
            raise invalid_param(str(exc), "prompt" if request.prompt is not None else "messages") from exc
        return TokenizeResponse(count=len(ids), max_model_len=self.models.max_model_len, tokens=ids)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """The text of ``tokens``; 400 for ids outside the vocabulary."""
        self.models.check(request.model)
        bad = [t for t in request.tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise invalid_param(f"tokens must be in [0, {self.vocab_size}), got {bad[:8]}", "tokens")
        try:
            return DetokenizeResponse(prompt=await self.tokenizer.decode(request.tokens))
        except ValueError as exc:
            raise invalid_param(str(exc), "tokens") from exc
