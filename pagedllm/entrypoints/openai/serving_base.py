"""What the completion and chat endpoints share: request checks, sampling parameters, length limits,
adding to the engine, and collecting or streaming the outputs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import Response

from pagedllm.core.outputs import Logprob, RequestOutput
from pagedllm.core.pooling import PoolingParams
from pagedllm.core.sampling_params import (
    RequestOutputKind,
    SamplingParams,
    StructuredOutputsParams,
    truncated_prompt,
)
from pagedllm.entrypoints.async_engine import AsyncLLMEngine, EngineDeadError, GenerationRequest, OutputStream
from pagedllm.entrypoints.openai.errors import ClientDisconnected, OpenAIError, from_value_error, invalid_param
from pagedllm.entrypoints.openai.protocol import (
    OpenAIBaseModel,
    PromptLogprob,
    PromptLogprobList,
    PromptTokensDetails,
    SamplingRequest,
    UsageInfo,
)
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels
from pagedllm.entrypoints.openai.streaming import SSE_DONE, ClosingStreamingResponse, sse_event
from pagedllm.entrypoints.openai.tokenization import AsyncTokenizer

logger = logging.getLogger(__name__)

_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1
_MIN_LOGPROB = -9999.0


def random_id(prefix: str) -> str:
    """A fresh OpenAI-style id such as ``cmpl-<32 hex digits>``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def json_response(body: BaseModel, status_code: int = 200) -> Response:
    """A JSON response serialized by pydantic (infinite floats become null rather than failing)."""
    return Response(body.model_dump_json(), status_code=status_code, media_type="application/json")


def token_label(token_id: int, logprob: Logprob | None, as_ids: bool) -> str:
    """How a logprobs entry names a token: its text, or, with ``return_tokens_as_token_ids``, ``token_id:<id>``
    (vLLM's form, for clients that need the exact ids: a token's text may not map back to one id)."""
    if as_ids:
        return f"token_id:{token_id}"
    return (logprob.decoded_token if logprob is not None else None) or ""


def finite_logprob(value: float) -> float:
    """A logprob JSON can carry: -inf (a token the distribution excludes) becomes -9999.0, as in vLLM."""
    return max(value, _MIN_LOGPROB)


def usage_of(outputs: Sequence[RequestOutput], cached_details: bool = False) -> UsageInfo:
    """Token counts over every prompt and every completion of ``outputs``; with ``cached_details`` also how many
    prompt tokens the prefix cache held (``prompt_tokens_details.cached_tokens``)."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    details = PromptTokensDetails(cached_tokens=sum(o.num_cached_tokens for o in outputs)) if cached_details else None
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=details)


async def wait_for_disconnect(raw_request: Request) -> None:
    """Return once the client closed the connection (the request body must already be read)."""
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


class OpenAIServing:
    """Base of the completion and chat endpoints.

    ``max_logprobs`` caps ``logprobs``/``top_logprobs``. Unset sampling fields take the model's
    generation-config defaults, exactly as the offline API does.
    """

    def __init__(self, engine: AsyncLLMEngine, tokenizer: AsyncTokenizer, models: OpenAIServingModels,
                 max_logprobs: int = 20, return_tokens_as_token_ids: bool = False,
                 prompt_tokens_details: bool = False) -> None:
        self.engine = engine
        self.return_tokens_as_token_ids = return_tokens_as_token_ids  # the default of requests that do not say
        self.prompt_tokens_details = prompt_tokens_details  # usage says how many prompt tokens were cached
        self.tokenizer = tokenizer
        self.models = models
        core = engine.engine
        self.max_model_len = core.model_config.max_model_len
        self.vocab_size = core.model_config.vocab_size
        self.max_logprobs = min(max_logprobs, self.vocab_size)
        self.kv_pool_tokens = engine.latest_stats.num_total_blocks * core.block_size
        self.defaults = core.default_sampling_params()

    def tokens_as_ids(self, request: SamplingRequest) -> bool:
        """Whether ``request``'s logprobs name tokens by id (its ``return_tokens_as_token_ids``, else the server's
        ``--return-tokens-as-token-ids``)."""
        asked = request.return_tokens_as_token_ids
        return self.return_tokens_as_token_ids if asked is None else asked

    # ------------------------------------------------------------------ checks
    @staticmethod
    def warn_unknown_fields(request: OpenAIBaseModel) -> None:
        """Log the request's fields this server does not know (they are ignored, as OpenAI's API allows)."""
        if request.unknown_fields():
            logger.warning("ignoring unknown request fields: %s", ", ".join(request.unknown_fields()))

    def check_request(self, request: SamplingRequest) -> None:
        """Reject what the sampling fields cannot mean here (a 400 naming the field)."""
        self.warn_unknown_fields(request)
        if request.stream_options is not None and not request.stream:
            raise invalid_param("stream_options is only allowed when stream is true", "stream_options")
        if request.seed is not None and not _SEED_MIN <= request.seed <= _SEED_MAX:
            raise invalid_param(f"seed must be a 64-bit signed integer, got {request.seed}", "seed")
        bad = [t for t in request.stop_token_ids or [] if not 0 <= t < self.vocab_size]
        if bad:
            raise invalid_param(f"stop_token_ids must be in [0, {self.vocab_size}), got {bad}", "stop_token_ids")
        self.check_logprobs(request.prompt_logprobs, "prompt_logprobs")
        if request.prompt_logprobs is not None and request.stream:
            raise invalid_param("prompt_logprobs are returned only by non-streamed requests", "prompt_logprobs")

    def prompt_logprobs_of(self, output: RequestOutput) -> PromptLogprobList | None:
        """``output``'s prompt logprobs in the response's form (vLLM's ``prompt_logprobs`` extra), or None."""
        if output.prompt_logprobs is None:
            return None
        return [None if entry is None else
                {str(t): PromptLogprob(logprob=finite_logprob(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
                 for t, lp in entry.items()} for entry in output.prompt_logprobs]

    @staticmethod
    def structured_outputs_of(request: SamplingRequest) -> tuple[StructuredOutputsParams | None, str]:
        """The request's structured output and the field that gave it: ``response_format`` (``json_object``,
        ``json_schema``), vLLM's ``structured_outputs`` object or its older ``guided_json`` / ``guided_regex`` /
        ``guided_choice`` / ``guided_grammar``. A 400 naming the field when it is malformed or more than one
        is given."""
        given: list[tuple[str, dict[str, Any]]] = []
        fmt = request.response_format
        if fmt is not None and fmt.type == "json_object":
            given.append(("response_format", {"json_object": True}))
        elif fmt is not None and fmt.type == "json_schema":
            schema = (fmt.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise invalid_param("response_format json_schema needs json_schema.schema, a JSON schema object",
                                    "response_format")
            given.append(("response_format", {"json": schema}))
        if request.structured_outputs is not None:
            given.append(("structured_outputs", dict(request.structured_outputs)))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            if getattr(request, name) is not None:
                given.append((name, {key: getattr(request, name)}))
        if not given:
            return None, "structured_outputs"
        if len(given) > 1:
            raise invalid_param(f"give one structured output, got {[name for name, _ in given]}", given[1][0])
        name, fields = given[0]
        known = {f.name for f in dataclasses.fields(StructuredOutputsParams)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise invalid_param(f"{name} has unknown keys {unknown}; known: {sorted(known)}", name)
        try:
            return StructuredOutputsParams(**fields), name
        except ValueError as exc:
            raise invalid_param(str(exc).replace("SamplingParams.structured_outputs", name), name) from exc

    def check_logprobs(self, value: int | None, param: str) -> None:
        """Reject a logprobs count outside ``[0, max_logprobs]``."""
        if value is not None and not 0 <= value <= self.max_logprobs:
            raise invalid_param(f"{param} must be in [0, {self.max_logprobs}], got {value}", param)

    def truncate_prompt(self, request: SamplingRequest, token_ids: list[int]) -> list[int]:
        """The prompt cut as ``truncate_prompt_tokens`` asks (before the length checks, as vLLM cuts it); a 400
        naming the field for a value that means nothing."""
        try:
            return truncated_prompt(token_ids, request.truncate_prompt_tokens, self.max_model_len)
        except ValueError as exc:
            raise from_value_error(exc) from exc

    async def input_token_ids(self, prompt: str | list[str] | list[int] | list[list[int]], add_special_tokens: bool,
                              param: str, truncate: Callable[[list[int]], list[int]] | None = None
                              ) -> list[list[int]]:
        """The token ids of each prompt of ``prompt`` (a string, strings, token ids or lists of them: one prompt or
        a batch), tokenized, cut by ``truncate`` if given and checked; a 400 naming ``param`` for an empty or bad
        one."""
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            items: list[str | list[int]] = [prompt]  # type: ignore[list-item]
        else:
            items = list(prompt)  # type: ignore[arg-type]
        if not items:
            raise invalid_param(f"{param} is empty: give a string, a list of strings or token ids", param)
        prompts = []
        for item in items:
            if isinstance(item, str):
                try:
                    ids = await self.tokenizer.encode(item, add_special_tokens)
                except ValueError as exc:
                    raise invalid_param(str(exc), param) from exc
            else:
                ids = list(item)
            if truncate is not None:
                ids = truncate(ids)
            self.check_prompt_ids(ids, param)
            prompts.append(ids)
        return prompts

    def check_prompt_ids(self, token_ids: list[int], param: str) -> None:
        """Reject an empty prompt or token ids outside the vocabulary."""
        if not token_ids:
            raise invalid_param(f"{param} is empty: at least one token is needed", param)
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise invalid_param(f"{param} token ids must be in [0, {self.vocab_size}), got {bad[:8]}", param)

    def resolve_max_tokens(self, num_prompt_tokens: int, max_tokens: int | None, prompt_param: str,
                           max_tokens_param: str) -> int:
        """The number of tokens to generate at most: ``max_tokens``, or all the room left when unset.

        Raises a 400 when the prompt and completion cannot fit the model's context or the whole KV cache.
        """
        room = min(self.max_model_len, self.kv_pool_tokens) - num_prompt_tokens
        if max_tokens is None:
            if num_prompt_tokens >= self.max_model_len:
                raise invalid_param(
                    f"this model's maximum context length is {self.max_model_len} tokens, but the {prompt_param} "
                    f"has {num_prompt_tokens}; shorten it", prompt_param, "context_length_exceeded")
            if room < 1:
                raise invalid_param(
                    f"the {prompt_param} ({num_prompt_tokens} tokens) leaves no room in the KV cache "
                    f"({self.kv_pool_tokens} tokens); shorten it", prompt_param, "context_length_exceeded")
            return room
        if max_tokens < 1:
            raise invalid_param(f"{max_tokens_param} must be >= 1, got {max_tokens}", max_tokens_param)
        total = num_prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise invalid_param(
                f"this model's maximum context length is {self.max_model_len} tokens, but you requested {total} "
                f"tokens ({num_prompt_tokens} in the {prompt_param}, {max_tokens} in the completion); shorten the "
                f"{prompt_param} or lower {max_tokens_param}", prompt_param, "context_length_exceeded")
        if total > self.kv_pool_tokens:
            raise invalid_param(
                f"the request needs {total} tokens of KV cache ({num_prompt_tokens} in the {prompt_param}, "
                f"{max_tokens} in the completion) but the whole cache holds {self.kv_pool_tokens}; lower "
                f"{max_tokens_param}", max_tokens_param)
        return max_tokens

    def sampling_params(self, request: SamplingRequest, max_tokens: int, logprobs: int | None,
                        param_names: Mapping[str, str], structured: StructuredOutputsParams | None = None
                        ) -> SamplingParams:
        """Build the request's :class:`SamplingParams`; a ValueError becomes a 400 naming the request field."""
        d = self.defaults

        def given(value: object, default: object) -> object:
            return default if value is None else value

        logit_bias = None
        if request.logit_bias:
            logit_bias = {}
            for token, bias in request.logit_bias.items():
                try:
                    logit_bias[int(token)] = bias
                except ValueError:
                    raise invalid_param(f"logit_bias keys must be token ids, got {token!r}", "logit_bias") from None
        top_k = int(given(request.top_k, d.top_k))  # type: ignore[call-overload]
        if top_k > self.vocab_size:
            top_k = -1  # keeping more tokens than the vocabulary has is no filter at all
        try:
            return SamplingParams(
                n=request.n, temperature=given(request.temperature, d.temperature),  # type: ignore[arg-type]
                top_p=given(request.top_p, d.top_p), top_k=top_k,  # type: ignore[arg-type]
                min_p=given(request.min_p, d.min_p),  # type: ignore[arg-type]
                presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                repetition_penalty=given(request.repetition_penalty, d.repetition_penalty),  # type: ignore[arg-type]
                seed=request.seed, stop=request.stop, stop_token_ids=request.stop_token_ids,
                include_stop_str_in_output=request.include_stop_str_in_output, ignore_eos=request.ignore_eos,
                max_tokens=max_tokens, min_tokens=request.min_tokens, logprobs=logprobs,
                skip_special_tokens=request.skip_special_tokens, logit_bias=logit_bias,
                allowed_token_ids=request.allowed_token_ids, bad_words=request.bad_words,
                prompt_logprobs=request.prompt_logprobs, structured_outputs=structured,
                truncate_prompt_tokens=request.truncate_prompt_tokens,
                # a non-streamed response needs only the final output: no per-token snapshots
                output_kind=RequestOutputKind.CUMULATIVE if request.stream else RequestOutputKind.FINAL_ONLY,
            )
        except ValueError as exc:
            raise from_value_error(exc, param_names) from exc

    # ------------------------------------------------------------------ running
    async def add(self, request_id: str, prompts: Sequence[list[int]], params: Sequence[SamplingParams | PoolingParams],
                  arrival_time: float, param_names: Mapping[str, str], prompt_param: str,
                  priority: int = 0, model: str | None = None) -> OutputStream:
        """Queue one engine request per prompt (ids ``request_id`` or ``request_id-i``); all or none. A ``priority``
        other than 0 needs a server started with ``--scheduling-policy priority`` (else a 400 naming it). ``model``:
        the served name the request gave (a LoRA adapter's runs through it)."""
        if priority != 0 and self.engine.engine.config.scheduling_policy != "priority":
            raise invalid_param(f"priority {priority} was given, but this server schedules first come, first "
                                f"served: start it with --scheduling-policy priority", "priority")
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        lora = self.models.lora(model) if model is not None else None
        requests = [GenerationRequest(i, p, sp, priority, lora) for i, p, sp in zip(ids, prompts, params, strict=True)]
        try:
            return await self.engine.add_requests(requests, arrival_time)
        except ValueError as exc:
            raise from_value_error(exc, param_names, prompt_param) from exc

    async def collect(self, stream: OutputStream, raw_request: Request) -> list[RequestOutput]:
        """Wait for every request of ``stream`` to finish; returns their final outputs in request order.

        Aborts them and raises :class:`ClientDisconnected` if the client goes away first.
        """
        final: dict[str, RequestOutput] = {}

        async def consume() -> None:
            async for outputs in stream:
                for output in outputs:
                    final[output.request_id] = output

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(wait_for_disconnect(raw_request))
        try:
            await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not consumer.done():
                consumer.cancel()
            if not stream.finished:
                self.engine.abort(stream.request_ids)
        if not consumer.done() or consumer.cancelled():
            raise ClientDisconnected()
        consumer.result()  # re-raise an engine failure
        return [final[i] for i in stream.request_ids]

    def stream_response(self, stream: OutputStream, chunks: Callable[[], AsyncIterator[str]]
                        ) -> ClosingStreamingResponse:
        """An SSE response over ``chunks()`` that ends with ``[DONE]``, reports an engine failure as an
        error event, and aborts the unfinished requests of ``stream`` however it ends."""

        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in chunks():
                    yield chunk
            except EngineDeadError as exc:
                yield sse_event(OpenAIError(str(exc), 503, code="engine_unavailable").to_model())
            finally:
                if not stream.finished:
                    self.engine.abort(stream.request_ids)
            yield SSE_DONE

        return ClosingStreamingResponse(events())
