"""``--api-key``: every ``/v1/*`` request must carry ``Authorization: Bearer <key>``.

A pure ASGI middleware rather than a FastAPI dependency, so the key is checked before the body is read
(a malformed body from a client without the key gets 401, not 400) and streaming is left untouched.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from pagedllm.entrypoints.openai.errors import OpenAIError


class APIKeyMiddleware:
    """Answer 401 in OpenAI's shape to ``/v1/*`` requests without the right bearer token."""

    def __init__(self, app: ASGIApp, api_key: str, prefix: str = "/v1") -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        reason = "no API key was given" if not given else "the API key is wrong"
        error = OpenAIError(f"{reason}: send the server's key as 'Authorization: Bearer <key>'", 401,
                            code="invalid_api_key")
        await error.to_response()(scope, receive, send)
