"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, for every failure.

Bad parameters and impossible prompts are 400 naming the field, a wrong API key 401, an unknown model or
route 404; anything unexpected is a 500 whose body says what failed but carries no traceback (that goes to
the server log). The server keeps serving after each.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm.entrypoints.async_engine import EngineDeadError
from pagedllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_PARAMS_FIELD = re.compile(r"^(?:Sampling|Pooling)Params\.(\w+) (.*)$", re.DOTALL)
_STATUS_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error"}


class ClientDisconnected(Exception):
    """The client went away before a non-streamed answer was ready; its generation was aborted."""


class OpenAIError(Exception):
    """An error answered in OpenAI's shape; raise it anywhere in a handler."""

    def __init__(self, message: str, status_code: int = 400, *, param: str | None = None,
                 code: str | int | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.error_type = error_type or _STATUS_TYPES.get(status_code, "server_error")

    def to_model(self) -> ErrorResponse:
        """The response body."""
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.error_type, param=self.param,
                                             code=self.code))

    def to_response(self) -> JSONResponse:
        """The whole HTTP response."""
        return JSONResponse(self.to_model().model_dump(), status_code=self.status_code)


def invalid_param(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    """A 400 for a bad request field."""
    return OpenAIError(message, 400, param=param, code=code)


def from_value_error(exc: ValueError, param_names: Mapping[str, str] | None = None,
                     default_param: str | None = None) -> OpenAIError:
    """Turn an engine, ``SamplingParams`` or ``PoolingParams`` ValueError into a 400 naming the request field.

    ``SamplingParams.<field> <reason>`` and ``PoolingParams.<field> <reason>`` messages name
    ``param_names.get(field, field)`` (a chat request calls ``max_tokens`` ``max_completion_tokens``, for
    instance); other messages name ``default_param``.
    """
    text = str(exc)
    match = _PARAMS_FIELD.match(text)
    if match:
        field, reason = match.groups()
        param = (param_names or {}).get(field, field)
        return invalid_param(f"{param} {reason}", param)
    return invalid_param(text, default_param)


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = exc.errors()
    if not errors:
        return invalid_param("the request body is invalid")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return invalid_param(f"malformed JSON in the request body: {first.get('ctx', {}).get('error', first['msg'])}",
                             code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not loc:
        if first.get("type") == "missing":
            return invalid_param("the request body is missing: send a JSON object")
        return invalid_param(f"the request body must be a JSON object: {first['msg']}")
    # pydantic adds union member names (e.g. "str", "list[int]") to the location: name the top-level field
    return invalid_param(f"{'.'.join(loc)}: {first['msg']}", loc[0])


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` in OpenAI's shape."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.to_response()

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return OpenAIError(str(exc), 503, code="engine_unavailable").to_response()

    @app.exception_handler(ClientDisconnected)
    async def _client_gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).to_response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        message = f"{exc.detail}: {request.method} {request.url.path}" if exc.status_code in (404, 405) \
            else str(exc.detail)
        return OpenAIError(message, exc.status_code, code=code).to_response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error while serving %s %s", request.method, request.url.path)
        return OpenAIError(f"internal server error ({type(exc).__name__}: {exc}); see the server log", 500,
                           error_type="server_error", code="internal_error").to_response()
