"""API errors with a stable JSON shape: {"error": {"code": ..., "message": ...}}."""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers


class BodyLimit:
    """413 for request bodies over ``max_size`` bytes ([web] max_body_size): at once when
    Content-Length says so, else as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, max_size: int) -> None:
        self.app, self.max_size = app, max_size

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_size} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_size <= 0:
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_size:
                    await self._refuse(scope, send)
                    return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_size:
                    raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        if str(scope.get("path", "")).startswith("/api/"):
            body = json.dumps({"error": {"code": "too_large", "message": self._too_large()}},
                              separators=(",", ":"))
            ctype = b"application/json"
        else:
            body, ctype = "Request body too large", b"text/plain; charset=utf-8"
        data = body.encode()
        headers: list[Any] = [(b"content-type", ctype),
                              (b"content-length", str(len(data)).encode()),
                              (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": data})
