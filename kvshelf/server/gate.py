"""The door of the server: a pure ASGI middleware that runs before any route reads the body.

- the API key is checked from the headers alone: an unauthenticated client never gets its body read;
- the body is read here, up to `max_body_bytes` (413 above, or at once when Content-Length says so) and
  within `read_timeout_s` (408: a client that sends headers and then trickles or stalls is let go);
- the route then gets the body replayed; later `receive()` calls reach the client again (so a handler
  can notice a disconnect).
The tenant found by the key travels in `scope["state"]["tenant"]` (Starlette's `request.state.tenant`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from kvshelf.server.tenants import Tenants

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/health"})
# Cache-wide counters show other tenants' reuse: admin keys only.
ADMIN_PATHS = frozenset({"/metrics", "/api/v1/cache/stats", "/api/v1/layerwise/stats"})


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def send_error(send: Send, status: int, message: str, kind: str, headers: list | None = None) -> None:
    body = json.dumps(error_body(message, kind)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Gate:
    def __init__(
        self,
        app,
        tenants: Tenants,
        *,
        max_body_bytes: int,
        read_timeout_s: float,
        open_paths: frozenset[str] = PUBLIC_PATHS,
    ):
        self.app, self.tenants = app, tenants
        self.max_body_bytes, self.read_timeout_s = max_body_bytes, read_timeout_s
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if path not in self.open_paths:
            tenant = self.tenants.authenticate(headers.get("authorization"))
            if tenant is None:
                await send_error(
                    send,
                    401,
                    "missing or wrong API key (send 'Authorization: Bearer <key>')",
                    "authentication_error",
                    [(b"www-authenticate", b"Bearer")],
                )
                return
            if path in ADMIN_PATHS and not tenant.admin:
                await send_error(send, 403, f"{path} needs an admin API key", "permission_error")
                return
            scope.setdefault("state", {})["tenant"] = tenant
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await send_error(send, 413, f"request body over {self.max_body_bytes} bytes", "invalid_request_error")
            return
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.read_timeout_s)
        except TimeoutError:
            await send_error(
                send, 408, f"request body not received within {self.read_timeout_s:g} s", "invalid_request_error"
            )
            return
        except _TooLarge:
            await send_error(send, 413, f"request body over {self.max_body_bytes} bytes", "invalid_request_error")
            return
        except _Disconnected:
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> bytes:
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass
