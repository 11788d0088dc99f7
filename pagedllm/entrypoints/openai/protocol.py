"""Every request and response body of the server, as pydantic models shaped as OpenAI's (plus pagedllm extras).

Requests accept unknown fields (OpenAI clients send newer ones all the time); the serving layer logs the
ones it ignores. Values are range-checked where they become :class:`~pagedllm.core.sampling_params.SamplingParams`,
so the rules live in one place and errors name the field.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer


class OpenAIBaseModel(BaseModel):
    """Base of every request model: unknown fields are kept (and reported by the server), not rejected."""

    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        """Names of the fields this server does not know (sent by the client, ignored)."""
        return sorted((self.model_extra or {}).keys())


class ResponseModel(BaseModel):
    """Base of every response model."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- errors
class ErrorInfo(ResponseModel):
    """What went wrong: a message for people, a type and code for programs, the offending request field."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(ResponseModel):
    """The body of every error answer: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo


# ---------------------------------------------------------------------------------------------- shared
class StreamOptions(OpenAIBaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk carrying the usage counts."""

    include_usage: bool = False


class ResponseFormat(OpenAIBaseModel):
    """``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object) or ``json_schema``
    (``json_schema.schema``, OpenAI's form ``{"name", "schema", "strict"}``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class SamplingRequest(OpenAIBaseModel):
    """Fields shared by ``/v1/completions`` and ``/v1/chat/completions``.

    ``None`` means "not given": the model's generation-config default applies (as offline). The fields
    after ``logit_bias`` are pagedllm extras, with vLLM's names.
    """

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    truncate_prompt_tokens: int | None = None
    priority: int = 0  # under --scheduling-policy priority: lower runs first
    return_tokens_as_token_ids: bool | None = None  # logprobs name tokens "token_id:<id>" (None: the server's)


# ---------------------------------------------------------------------------------------------- usage
class CompletionTokensDetails(ResponseModel):
    """What the completion tokens were: ``reasoning_tokens``, a reasoning model's thinking."""

    reasoning_tokens: int = 0


class PromptTokensDetails(ResponseModel):
    """How many prompt tokens the prefix cache held (their keys and values were not computed again)."""

    cached_tokens: int = 0


class UsageInfo(ResponseModel):
    """Token counts of one request (every prompt, every completion); under a ``--reasoning-parser`` the chat's
    also says how many completion tokens were thinking; with ``--enable-prompt-tokens-details``, how many prompt
    tokens came from the prefix cache."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


# ---------------------------------------------------------------------------------------------- completions
PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: one prompt or a batch, as text or token ids."""

    prompt: PromptInput
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True


class CompletionLogProbs(ResponseModel):
    """Per generated token: its text offset, text, logprob, and the top alternatives ``{text: logprob}``."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(ResponseModel):
    """One token's entry in ``prompt_logprobs`` (vLLM's extra): its logprob, rank and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobList = list[dict[str, PromptLogprob] | None]
"""Per prompt token: ``{token id: PromptLogprob}`` for it and the top alternatives (null for the first)."""


class CompletionChoice(ResponseModel):
    """One completion (``index`` counts across prompts: prompt ``i``, sample ``j`` is ``i * n + j``)."""

    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobList | None = None


class CompletionResponse(ResponseModel):
    """The answer to a non-streamed completion request."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionStreamResponse(ResponseModel):
    """One server-sent chunk of a streamed completion (``choices`` empty in the usage-only last chunk)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# ---------------------------------------------------------------------------------------------- chat
class ChatContentPart(OpenAIBaseModel):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is supported."""

    type: str
    text: str | None = None


class ChatMessage(OpenAIBaseModel):
    """One message of the conversation (other keys, e.g. ``tool_calls``, go to the chat template as is)."""

    role: str
    content: str | list[ChatContentPart] | None = None
    name: str | None = None


class ChatTemplateOptions(OpenAIBaseModel):
    """How a conversation goes through the chat template (vLLM's fields): ``add_generation_prompt`` opens the
    assistant's turn; ``continue_final_message`` instead leaves the conversation's last message open, so the
    reply continues it (a prefilled assistant answer); ``chat_template_kwargs`` are passed to the template."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingRequest, ChatTemplateOptions):
    """``POST /v1/chat/completions``: a conversation rendered through the chat template."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True  # False: at most one call per reply
    include_reasoning: bool = True  # False: a reasoning model's thinking is left out of the reply (vLLM's)
    add_special_tokens: bool = False


class ChatTopLogprob(ResponseModel):
    """One alternative token: its text, logprob and UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(ChatTopLogprob):
    """One generated token with its top alternatives."""

    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogProbs(ResponseModel):
    """The logprobs of a chat choice, token by token."""

    content: list[ChatLogprobToken] | None = None


class FunctionCall(ResponseModel):
    """The function a tool call invokes and its arguments (a JSON text)."""

    name: str
    arguments: str


class ToolCall(ResponseModel):
    """One tool call of the assistant's reply."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class OmitsUnset(ResponseModel):
    """A streamed delta that leaves out its unset (None) fields, as OpenAI's are sent: clients merge deltas key by
    key, and a ``"type": null`` after the opening delta would overwrite the call's type."""

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaFunctionCall(OmitsUnset):
    """A streamed tool call's function: its name (in the delta that opens the call) and a piece of its arguments'
    JSON text (the pieces of one call concatenate to its arguments)."""

    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OmitsUnset):
    """A streamed tool call: its place in the reply's calls; id, type and the function's name in the delta that
    opens it; the function's arguments piece by piece."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatResponseMessage(ResponseModel):
    """The assistant's reply: its text, or the tool calls it makes (``tools`` and ``tool_choice``); a reasoning
    model's thinking (``--reasoning-parser``) in ``reasoning`` and, as vLLM first named it, ``reasoning_content``."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class ChatCompletionChoice(ResponseModel):
    """One reply of a non-streamed chat completion."""

    index: int
    message: ChatResponseMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(ResponseModel):
    """The answer to a non-streamed chat completion request."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobList | None = None


class DeltaMessage(ResponseModel):
    """What a chunk adds to a reply: the role (first chunk only), new content, tool calls, or reasoning (under both
    of its names, as in :class:`ChatResponseMessage`)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class ChatCompletionStreamChoice(ResponseModel):
    """One choice's part of a streamed chat chunk."""

    index: int
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(ResponseModel):
    """One server-sent chunk of a streamed chat completion (``choices`` empty in the usage-only last chunk)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# ---------------------------------------------------------------------------------------------- models
class ModelCard(ResponseModel):
    """One served model."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedllm"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None


class ModelList(ResponseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------------- embeddings
class EmbeddingRequest(OpenAIBaseModel):
    """``POST /v1/embeddings``: ``input`` is a string, a list of strings, token ids or a list of token-id lists.

    ``encoding_format``: ``"float"`` (lists of numbers) or ``"base64"`` (little-endian float32 bytes, what the
    official client asks for by default); ``dimensions``: keep the first that many features (Matryoshka), then
    normalize. vLLM's extras: ``truncate_prompt_tokens`` (keep the last that many tokens, -1 as many as the model
    takes), ``normalize`` and ``add_special_tokens``.
    """

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None
    normalize: bool = True
    add_special_tokens: bool = True


class EmbeddingData(ResponseModel):
    """One input's embedding."""

    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str


class EmbeddingResponse(ResponseModel):
    """The embeddings of every input, in input order, and the prompt token count."""

    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo


# ---------------------------------------------------------------------------------------------- tokenizer
class TokenizeRequest(ChatTemplateOptions):
    """``POST /tokenize``: exactly one of ``prompt`` (text) or ``messages`` (rendered by the chat template).

    ``add_special_tokens`` defaults to True for a prompt and False for messages (the template has them).
    """

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None


class TokenizeResponse(ResponseModel):
    """The token ids of the input, their count and the model's context length."""

    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIBaseModel):
    """``POST /detokenize``: token ids to text."""

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(ResponseModel):
    """The text of the token ids."""

    prompt: str


# ---------------------------------------------------------------------------------------------- misc
class LoadLoRAAdapterRequest(OpenAIBaseModel):
    """``POST /v1/load_lora_adapter`` (vLLM's, with ``--allow-runtime-lora-updating``): serve the PEFT adapter in
    ``lora_path`` as the model ``lora_name``."""

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(OpenAIBaseModel):
    """``POST /v1/unload_lora_adapter``: stop serving the adapter ``lora_name`` (``lora_int_id``, when given, must
    be its id)."""

    lora_name: str
    lora_int_id: int | None = None


class VersionResponse(ResponseModel):
    """``GET /version``."""

    version: str
