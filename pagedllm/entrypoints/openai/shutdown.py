"""Ending requests that are still open when the server stops.

On Ctrl-C / SIGTERM uvicorn stops accepting connections, gives open requests
``--graceful-shutdown-timeout-s`` to finish, then cancels them. A cancelled request would otherwise
surface as "Exception in ASGI application" with a traceback and a cut connection; this middleware answers
it properly instead: a 503 in OpenAI's shape if nothing was sent yet, or, mid-stream, an error event and
``[DONE]`` (the generation itself is aborted by the stream's own cleanup).
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.streaming import SSE_DONE, sse_event

SHUTDOWN_MESSAGE = "the server is shutting down; retry on another instance or after it restarts"


class ShutdownMiddleware:
    """Finish HTTP requests cancelled by the server's shutdown with a proper answer (see the module)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started: Message | None = None
        completed = False

        async def tracking_send(message: Message) -> None:
            nonlocal started, completed
            if message["type"] == "http.response.start":
                started = message
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if completed:
                return
            error = OpenAIError(SHUTDOWN_MESSAGE, 503, code="server_shutting_down")
            with contextlib.suppress(Exception):  # the client may be gone too
                if started is None:
                    await error.to_response()(scope, receive, send)
                    return
                headers = dict(started.get("headers", []))
                if headers.get(b"content-type", b"").startswith(b"text/event-stream"):
                    body = (sse_event(error.to_model()) + SSE_DONE).encode()
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
