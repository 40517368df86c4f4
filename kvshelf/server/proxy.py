"""`kvshelf proxy`: the router of a disaggregated vLLM pair (prefill instances with kv_role=kv_producer,
decode instances with kv_role=kv_consumer, one shared kvshelf tier).

Each completion goes first to a prefill instance with max_tokens=1 (it computes the prompt and its
connector stores the prompt's KV), then unchanged to a decode instance (its connector finds that KV by the
prompt's tokens and loads it; nothing needs to be handed over in the request), whose answer is streamed
back as it comes. Instances are taken round-robin. A prefill that fails or takes longer than its
timeout is only a lost head start: the decode instance computes the prompt itself. Binds 127.0.0.1
unless told otherwise; every upstream call has a connect and a read timeout.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import FastAPI, Request  # at module level: FastAPI resolves the handlers' annotations here

from kvshelf.errors import ConfigError

log = logging.getLogger(__name__)

ROUTES = ("/v1/completions", "/v1/chat/completions")
# Request headers passed on to the instances (the API key, if the instances want one).
FORWARDED_HEADERS = ("authorization", "content-type")


@dataclass(frozen=True)
class ProxySettings:
    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8100
    connect_timeout_s: float = 5.0
    prefill_timeout_s: float = 120.0  # the whole prefill call: after it, the decode instance computes
    read_timeout_s: float = 600.0  # longest wait for the decode instance's next bytes
    max_body_bytes: int = 16 << 20
    max_connections: int = 256

    def __post_init__(self):
        if not self.decode:
            raise ConfigError("kvshelf proxy needs at least one decode instance (--decode URL)")
        if not self.prefill:
            raise ConfigError("kvshelf proxy needs at least one prefill instance (--prefill URL)")
        for url in (*self.prefill, *self.decode):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"instance URL {url!r} is not http(s)://host[:port]")
        for name in ("connect_timeout_s", "prefill_timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"proxy {name} must be > 0 (got {getattr(self, name)})")

    @classmethod
    def of(cls, prefill: Sequence[str], decode: Sequence[str], **kwargs) -> ProxySettings:
        strip = lambda urls: tuple(u.rstrip("/") for u in urls)  # noqa: E731
        return cls(strip(prefill), strip(decode), **kwargs)


def prefill_body(body: dict) -> dict:
    """The request as the prefill instance gets it: one token, no streaming."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["n"] = 1
    return out


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_proxy_app(settings: ProxySettings):
    import httpx
    from fastapi.responses import Response, StreamingResponse
    from starlette.background import BackgroundTask

    prefill_cycle = itertools.cycle(settings.prefill)
    decode_cycle = itertools.cycle(settings.decode)
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(_app):
        limits = httpx.Limits(max_connections=settings.max_connections)
        timeout = httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            state["client"] = client
            yield
        state.clear()

    app = FastAPI(title="kvshelf proxy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.counts = {"requests": 0, "prefill_failures": 0}

    async def prefill(path: str, body: dict, headers: dict) -> bool:
        url = next(prefill_cycle) + path
        try:
            reply = await state["client"].post(
                url,
                json=prefill_body(body),
                headers=headers,
                timeout=httpx.Timeout(settings.prefill_timeout_s, connect=settings.connect_timeout_s),
            )
        except httpx.HTTPError as err:
            log.warning("kvshelf proxy: prefill at %s failed (%s); the decode instance computes the prompt", url, err)
            return False
        if reply.status_code != 200:
            log.warning(
                "kvshelf proxy: prefill at %s answered %d; the decode instance computes", url, reply.status_code
            )
            return False
        return True

    async def route(request: Request, path: str):
        raw = bytearray()
        async for piece in request.stream():  # bounded while reading, not after
            raw += piece
            if len(raw) > settings.max_body_bytes:
                return _error(413, f"request body over {settings.max_body_bytes} bytes")
        raw = bytes(raw)
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        app.state.counts["requests"] += 1
        prefilled = await prefill(path, body, headers)
        if not prefilled:
            app.state.counts["prefill_failures"] += 1
        marker = {"x-kvshelf-prefill": "ok" if prefilled else "fallback"}
        client = state["client"]
        url = next(decode_cycle) + path
        try:
            upstream = await client.send(client.build_request("POST", url, content=raw, headers=headers), stream=True)
        except httpx.HTTPError as err:
            log.warning("kvshelf proxy: decode instance %s failed: %s", url, err)
            return _error(502, "the decode instance could not be reached", "upstream_error")
        media = upstream.headers.get("content-type", "application/json")
        if not body.get("stream") or upstream.status_code != 200:
            try:
                content = await upstream.aread()
            except httpx.HTTPError as err:
                return _error(502, f"the decode instance's answer broke off ({type(err).__name__})", "upstream_error")
            finally:
                await upstream.aclose()
            return Response(content, status_code=upstream.status_code, media_type=media, headers=marker)

        async def relay():
            try:
                async for piece in upstream.aiter_bytes():  # decoded: no content-encoding is passed on
                    yield piece
            except httpx.HTTPError as err:  # the client sees the stream end early; say why here
                log.warning("kvshelf proxy: decode stream from %s broke off: %s", url, err)

        return StreamingResponse(
            relay(), status_code=200, media_type=media, headers=marker, background=BackgroundTask(upstream.aclose)
        )

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await route(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await route(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models(request: Request):
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        try:
            reply = await state["client"].get(settings.decode[0] + "/v1/models", headers=headers)
        except httpx.HTTPError:
            return _error(502, "the decode instance could not be reached", "upstream_error")
        return Response(reply.content, status_code=reply.status_code, media_type=reply.headers.get("content-type"))

    @app.get("/health")
    async def health():
        return {"status": "ok", **app.state.counts}

    return app


def run_proxy(settings: ProxySettings) -> None:
    import uvicorn

    from kvshelf.server import is_loopback

    if not is_loopback(settings.host):
        log.warning("kvshelf proxy on %s: it forwards to the instances whatever reaches it", settings.host)
    log.info("kvshelf proxy: prefill %s, decode %s", list(settings.prefill), list(settings.decode))
    uvicorn.run(
        create_proxy_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_keep_alive=5,
        limit_concurrency=settings.max_connections,
        server_header=False,
    )
