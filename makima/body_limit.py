"""An ASGI guard on the size of request bodies sent without a ``Content-Length``.

Django checks ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (``MAKIMA_MAX_REQUEST_BYTES``)
against the declared length only. A body sent with ``Transfer-Encoding:
chunked`` declares none, so Django would spool all of it and then read it into
memory whatever its size (and DRF, seeing no length, would then ignore it).
This guard reads such a body first and answers 413 as soon as it passes the
limit; a body that fits is handed on whole, with the length it turned out to
have declared, so the API reads it like any other.
Requests that declare their length go straight through: Django refuses those
before reading anything.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings

Scope = dict[str, Any]
Message = dict[str, Any]


class RequestBodyLimit:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or any(name == b"content-length" for name, _ in scope.get("headers", ())):
            await self.app(scope, receive, send)
            return
        limit = settings.MAKIMA_MAX_REQUEST_BYTES
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away before the body ended: nothing to answer
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await _too_large(send, limit)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # what comes after the body: http.disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        headers = [*scope.get("headers", ()), (b"content-length", str(size).encode())]
        await self.app({**scope, "headers": headers}, replay, send)


async def _too_large(send: Any, limit: int) -> None:
    body = json.dumps({"detail": f"The request body is larger than {limit} bytes (MAKIMA_MAX_REQUEST_BYTES)."}).encode()
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
