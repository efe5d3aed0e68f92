"""The server's front door, a pure ASGI middleware in front of the FastAPI app.

- OPTIONS answered here: 204 with the path's methods in `Allow`, no auth needed (it reveals
  nothing), and no CORS headers: the server does not open CORS;
- Bearer auth on /v1 routes;
- a request body size limit (413), counted while reading, so chunked uploads cannot dodge it;
- a time limit for receiving the whole body (408): a client that declares more bytes than it
  sends, or drips them, would otherwise hold a connection and a task for ever.
The body is read here and replayed to the app; later receive() calls pass through, so the app
still sees a client that disconnects.
"""
from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable

from starlette.responses import JSONResponse, Response

from picochat.serve.schemas import error_body


class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, body_timeout_s: float = 30.0,
                 allowed_methods: Callable[[str], set[str]] = lambda path: set()):
        self.app, self.api_key, self.max_body, self.body_timeout = app, api_key, max_body_bytes, body_timeout_s
        self.allowed_methods = allowed_methods

    def _options(self, scope) -> Response:
        methods = self.allowed_methods(scope["path"])
        if not methods:
            return JSONResponse(error_body(f"Unknown request URL: OPTIONS {scope['path']}.", code="not_found"), 404)
        return Response(status_code=204, headers={"allow": ", ".join(sorted(methods | {"OPTIONS"}))})

    def _authorized(self, scope, headers: dict) -> bool:
        if not self.api_key or not scope["path"].startswith("/v1"):
            return True
        auth = headers.get(b"authorization", b"").decode("latin-1")
        token = auth[7:] if auth[:7].lower() == "bearer " else ""
        return hmac.compare_digest(token.encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "OPTIONS":
            return await self._options(scope)(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if not self._authorized(scope, headers):
            return await JSONResponse(error_body(
                "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.", code="invalid_api_key"),
                401, {"www-authenticate": "Bearer"})(scope, receive, send)
        too_big = JSONResponse(error_body(f"Request body too large: the limit is {self.max_body} bytes.",
                                          code="request_too_large"), 413)
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if declared > self.max_body:
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        deadline = time.monotonic() + self.body_timeout
        while more:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await JSONResponse(error_body(
                    f"The request body did not arrive within {self.body_timeout:g} s (declared "
                    f"{declared} bytes, received {size}).", code="request_timeout"),
                    408, {"connection": "close"})(scope, receive, send)
            if msg["type"] != "http.request":  # disconnected while sending the body
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await too_big(scope, receive, send)
            more = msg.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
