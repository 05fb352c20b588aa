"""Input limits of ferryd: request body size, and error bodies for what FastAPI refuses itself.

``install_input_limits(app)`` adds all of it to the app:

* :class:`BodySizeLimit` refuses a request body larger than :data:`MAX_BODY_BYTES` with ``413``
  before any route sees it (a declared ``Content-Length`` is refused at once; a chunked body is
  counted as it arrives and never buffered beyond the limit);
* a body that is not JSON, an unknown path or a wrong method get the agent's usual error body
  (``{"error": {"code", "message", "field", "fix"}}``) instead of FastAPI's ``{"detail": ...}``;
* a peer agent (or etcd) the request made this agent contact that did not answer is reported as
  ``424 Failed Dependency``, code ``unreachable``: this agent is healthy, the request depended on
  another one that failed (a ``5xx`` would blame this agent).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vmferry.errors import UnreachableError

#: Largest request body ferryd accepts. Every request of the API is a small JSON document;
#: the largest (an incoming move's VM spec) is a few KiB.
MAX_BODY_BYTES = 1024 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _error_body(code: str, message: str, field: str | None, fix: str | None) -> bytes:
    return json.dumps(
        {"error": {"code": code, "message": message, "field": field, "fix": fix}}
    ).encode()


class BodySizeLimit:
    """Pure ASGI middleware: ``413`` for a request body over ``max_bytes``; the app never runs."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, send: Send) -> None:
        body = _error_body(
            "refused",
            f"request body is larger than {self.max_bytes} bytes",
            "body",
            "send a smaller request; every ferryd request is a small JSON document",
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the declared length, then read the body up to the limit and replay it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    await self._too_large(send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def install_input_limits(app: FastAPI, max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """Add the body size limit and the error bodies above to ``app``."""
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "refused"}.get(exc.status_code, "refused")
        message = str(exc.detail)
        field = None
        if exc.status_code == 400:
            message, field = f"request body is not valid JSON ({exc.detail})", "body"
        return JSONResponse(
            {"error": {"code": code, "message": message, "field": field, "fix": None}},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(UnreachableError)
    async def peer_unreachable(_: Request, exc: UnreachableError) -> JSONResponse:
        return JSONResponse({"error": exc.to_dict()}, status_code=424)
