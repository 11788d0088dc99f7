"""The FastAPI app of ``pagedllm serve`` and the uvicorn runner.

Routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/responses``, ``/v1/embeddings``, ``/v1/models`` (behind
``--api-key`` when set), ``/health``, ``/version``, ``/metrics``, ``/tokenize``, ``/detokenize``; with
``--allow-runtime-lora-updating``, ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``. The engine thread
starts with the app's lifespan and stops with it, so Ctrl-C / SIGTERM (handled by uvicorn) end the server
cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from starlette.responses import PlainTextResponse, Response

from pagedllm.core.engine import LLMEngine, load_tokenizer
from pagedllm.core.heap import freeze_heap
from pagedllm.core.lora.request import LoRARequest
from pagedllm.demo import DEMO_MODEL_NAME
from pagedllm.entrypoints.async_engine import AsyncLLMEngine
from pagedllm.entrypoints.openai.auth import APIKeyMiddleware
from pagedllm.entrypoints.openai.errors import OpenAIError, install_error_handlers
from pagedllm.entrypoints.openai.metrics import ServerMetrics
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    LoadLoRAAdapterRequest,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
    VersionResponse,
)
from pagedllm.entrypoints.openai.protocol_responses import ResponseObject, ResponsesRequest
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels, parse_lora_modules
from pagedllm.entrypoints.openai.serving_responses import OpenAIServingResponses
from pagedllm.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from pagedllm.entrypoints.openai.shutdown import ShutdownMiddleware
from pagedllm.entrypoints.openai.tokenization import AsyncTokenizer, load_chat_template
from pagedllm.entrypoints.openai.tool_call_formats import TOOL_CALL_FORMATS
from pagedllm.version import __version__

logger = logging.getLogger(__name__)

_ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
           500: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}
_SSE = {"text/event-stream": {"schema": {"type": "string"}}}


@dataclass(slots=True)
class ServerSettings:
    """What the app needs beyond the engine: the served name, the API key, the chat-template override."""

    served_model_name: str
    api_key: str | None = None
    chat_template: str | None = None
    max_logprobs: int = 20
    tool_call_parser: str | None = None  # set: chat requests may use tool_choice "auto"
    lora_modules: dict[str, LoRARequest] = field(default_factory=dict)  # served adapter names (--lora-modules)
    allow_runtime_lora_updating: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:<id>" unless a request says
    enable_prompt_tokens_details: bool = False  # usage.prompt_tokens_details.cached_tokens in every answer


def build_app(engine: LLMEngine, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving ``engine``; the engine thread runs during the app's lifespan."""
    model_config = engine.model_config
    metrics = ServerMetrics(settings.served_model_name)
    async_engine = AsyncLLMEngine(engine, observers=[metrics])
    tokenizer = AsyncTokenizer(load_tokenizer(engine.config.tokenizer or model_config.path, required=False)
                               if engine.tokenizer is not None else None, settings.chat_template)
    config = engine.config
    models = OpenAIServingModels(settings.served_model_name, model_config.path, model_config.max_model_len,
                                 settings.lora_modules, config.max_lora_rank if config.enable_lora else None)
    as_ids, cached = settings.return_tokens_as_token_ids, settings.enable_prompt_tokens_details
    completions = OpenAIServingCompletion(async_engine, tokenizer, models, settings.max_logprobs, as_ids, cached)
    chat = OpenAIServingChat(async_engine, tokenizer, models, settings.max_logprobs, as_ids, cached,
                             tool_parser=settings.tool_call_parser, reasoning_parser=config.reasoning_parser)
    tokenization = OpenAIServingTokenization(tokenizer, models, model_config.vocab_size)
    embeddings = OpenAIServingEmbedding(async_engine, tokenizer, models, settings.max_logprobs)
    responses = OpenAIServingResponses(chat)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            logger.info("shutting down: stopping the engine")
            await async_engine.shutdown()
            tokenizer.close()

    app = FastAPI(title="pagedllm OpenAI-compatible server", version=__version__, lifespan=lifespan)
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    install_error_handlers(app)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(ShutdownMiddleware)  # added last: the outermost

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        """200 while the engine runs, 503 once it has stopped."""
        if not async_engine.is_alive:
            raise OpenAIError(f"the engine is not running: {async_engine.dead_reason or 'not started'}", 503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> VersionResponse:
        """The pagedllm version."""
        return VersionResponse(version=__version__)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        """Prometheus metrics."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", responses=_ERRORS)
    async def list_models() -> ModelList:
        """The served model."""
        return models.list()

    @app.post("/v1/completions", responses={200: {"model": CompletionResponse, "content": _SSE}, **_ERRORS})
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        """OpenAI's completions (``stream: true`` answers with server-sent events)."""
        return await completions.create_completion(request, raw_request)

    @app.post("/v1/chat/completions", responses={200: {"model": ChatCompletionResponse, "content": _SSE},
                                                 **_ERRORS})
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        """OpenAI's chat completions (``stream: true`` answers with server-sent events)."""
        return await chat.create_chat_completion(request, raw_request)

    @app.post("/v1/responses", responses={200: {"model": ResponseObject, "content": _SSE}, **_ERRORS})
    async def create_response(request: ResponsesRequest, raw_request: Request) -> Response:
        """OpenAI's Responses API through the chat pipeline (``stream: true`` answers with its events)."""
        return await responses.create_response(request, raw_request)

    @app.post("/v1/embeddings", responses={200: {"model": EmbeddingResponse}, **_ERRORS})
    async def create_embedding(request: EmbeddingRequest, raw_request: Request) -> Response:
        """OpenAI's embeddings: the last token's final hidden state of each input, normalized."""
        return await embeddings.create_embedding(request, raw_request)

    if settings.allow_runtime_lora_updating:
        @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=_ERRORS)
        async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> PlainTextResponse:
            """Serve a PEFT adapter under a new model name (vLLM's route and answer)."""
            models.load_lora(request.lora_name, request.lora_path)
            logger.info("LoRA adapter %r loaded from %s", request.lora_name, request.lora_path)
            return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=_ERRORS)
        async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> PlainTextResponse:
            """Stop serving an adapter (vLLM's route and answer)."""
            models.unload_lora(request.lora_name, request.lora_int_id)
            logger.info("LoRA adapter %r unloaded", request.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' removed successfully.")

    @app.post("/tokenize", responses=_ERRORS)
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        """Token ids of a prompt or of a conversation through the chat template."""
        return await tokenization.tokenize(request)

    @app.post("/detokenize", responses=_ERRORS)
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        """Text of token ids."""
        return await tokenization.detokenize(request)

    return app


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_server(args: argparse.Namespace) -> int:
    """Build the engine from the command line, then serve until Ctrl-C or SIGTERM; returns the exit code.

    uvicorn turns the first Ctrl-C / SIGTERM into a graceful shutdown (open requests get
    ``--graceful-shutdown-timeout-s`` to finish, the engine thread stops) and then re-raises the signal;
    SIGTERM is mapped to KeyboardInterrupt like Ctrl-C, so either ends here with status 0 and no traceback,
    also while the model is still loading.
    """
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _serve(args)
    except KeyboardInterrupt:
        logger.info("stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from pagedllm.entrypoints.engine_args import engine_config_from_args

    config = engine_config_from_args(args)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError(f"--enable-auto-tool-choice needs --tool-call-parser ({', '.join(TOOL_CALL_FORMATS)})")
    chat_template = load_chat_template(args.chat_template)
    lora_modules = parse_lora_modules(getattr(args, "lora_modules", None) or [], config)
    if args.allow_runtime_lora_updating and not config.enable_lora:
        raise ValueError("--allow-runtime-lora-updating needs --enable-lora")
    engine = LLMEngine(config)
    settings = ServerSettings(
        served_model_name=config.served_model_name or config.model or DEMO_MODEL_NAME,
        api_key=args.api_key or os.environ.get("PAGEDLLM_API_KEY") or None,
        chat_template=chat_template,
        max_logprobs=args.max_logprobs,
        tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
        lora_modules=lora_modules,
        allow_runtime_lora_updating=args.allow_runtime_lora_updating,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
    )
    app = build_app(engine, settings)
    freeze_heap()  # full collections would otherwise rescan the start's heap on the engine thread's steps
    stats = app.state.async_engine.latest_stats
    logger.info(
        "pagedllm %s: backend %s, model %s served as %r, KV pool %d blocks x %d tokens = %d tokens, "
        "max_model_len %d, API key %s; listening on http://%s:%d",
        __version__, engine.backend_cls.name, engine.model_config.path, settings.served_model_name,
        stats.num_total_blocks, engine.block_size, stats.num_total_blocks * engine.block_size,
        engine.model_config.max_model_len, "required" if settings.api_key else "off", args.host, args.port,
    )
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
        access_log=not args.disable_access_log, timeout_graceful_shutdown=args.graceful_shutdown_timeout_s,
    ))
    server.run()
