"""kvshelf's OpenAI-compatible server: completions and chat over the HF runner with the KV cache.

Generation runs one request at a time in a worker thread (one model, and on a CPU two concurrent
prefills would only slow each other down); requests wait their turn, streaming or not. The event loop
stays free for health checks, metrics and stats meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvshelf.app import Shelf
from kvshelf.errors import KVShelfError
from kvshelf.integrations.hf import GenerationResult
from kvshelf.metrics import Metrics
from kvshelf.server.protocol import ChatRequest, CompletionRequest, _Request, chat_prompt

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 64


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass
class _Job:
    """One generation, produced by a worker thread and consumed by the request handler."""

    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class _TextStream:
    """Turns token ids into text deltas, cutting at the first stop string and never emitting half of one."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stops:
            at = self.text.find(stop)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        if self.stopped:
            return self._flush(len(self.text))
        hold = max((len(s) - 1 for s in self.stops), default=0)
        end = len(self.text) - hold
        if self.text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            end = min(end, len(self.text) - 1)
        return self._flush(end)

    def finish(self) -> str:
        return self._flush(len(self.text.rstrip("\ufffd")))

    def _flush(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta


def create_app(shelf: Shelf, metrics: Metrics) -> FastAPI:
    config = shelf.config
    runner = shelf.runner
    tokenizer = shelf.model.tokenizer
    model_name = config.served_model_name or shelf.model.path.name
    gen_lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        shelf.close()  # finish write-behind, close tier connections

    app = FastAPI(title="kvshelf", version="0.1.0", lifespan=lifespan)
    if shelf.engine is not None:
        metrics.watch_engine(shelf.engine)

    def require_key(request: Request) -> None:
        if not config.api_key:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", "authentication_error")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError):
        return JSONResponse({"error": {"message": err.message, "type": err.kind}}, status_code=err.status)

    def produce(job: _Job, prompt, req: _Request, stops: list[str]) -> None:
        """Worker thread: run one generation, emitting text deltas, then the result or the error."""
        try:
            with gen_lock:
                text = _TextStream(tokenizer, stops)
                stream = shelf.generator.stream(
                    prompt,
                    should_stop=lambda: text.stopped or job.cancelled.is_set(),
                    max_new_tokens=req.token_budget(DEFAULT_MAX_TOKENS),
                    salt=req.cache_salt if req.cache_salt is not None else config.cache_salt,
                    temperature=req.temperature,
                    top_p=req.top_p,
                    seed=req.seed,
                )
                while True:
                    try:
                        delta = text.add(next(stream))
                    except StopIteration as done:
                        result: GenerationResult = done.value
                        break
                    if delta:
                        job.emit("text", delta)
                tail = text.finish()
                if tail:
                    job.emit("text", tail)
                job.emit("done", {"result": result, "text": text.text})
        except Exception as err:  # reported to the client as an error response, never swallowed
            job.emit("error", err)

    async def run(prompt, req: _Request, endpoint: str) -> tuple[_Job, threading.Thread]:
        if req.model is not None and req.model != model_name:
            raise APIError(
                404, f"model {req.model!r} is not served here; this server serves {model_name!r}", "model_not_found"
            )
        metrics.requests.labels(endpoint).inc()
        job = _Job(asyncio.Queue(), asyncio.get_running_loop())
        worker = threading.Thread(
            target=produce, args=(job, prompt, req, req.stop_strings), daemon=True, name="kvshelf-generate"
        )
        worker.start()
        return job, worker

    def usage(result: GenerationResult) -> dict:
        n_in, n_out = result.prompt_tokens, len(result.token_ids)
        return {
            "prompt_tokens": n_in,
            "completion_tokens": n_out,
            "total_tokens": n_in + n_out,
            "kvshelf": {"hit_tokens": result.hit_tokens, "ttft_s": round(result.ttft_s, 6)},
        }

    async def collect(job: _Job, endpoint: str) -> dict:
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                continue
            if kind == "error":
                raise _as_api_error(value, endpoint)
            else:
                return value

    def _as_api_error(err: Exception, endpoint: str) -> APIError:
        metrics.request_errors.labels(endpoint).inc()
        if isinstance(err, KVShelfError):
            return APIError(400, str(err))
        log.error("generation failed: %s", err, exc_info=err)
        return APIError(500, f"generation failed: {type(err).__name__}: {err}", "server_error")

    async def sse(job: _Job, endpoint: str, make_chunk) -> AsyncIterator[str]:
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield f"data: {json.dumps(make_chunk(value, None))}\n\n"
                elif kind == "error":
                    err = _as_api_error(value, endpoint)
                    yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.kind}})}\n\n"
                    break
                else:
                    metrics.ttft_seconds.observe(value["result"].ttft_s)
                    yield f"data: {json.dumps(make_chunk('', value['result'].finish_reason))}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # the client went away, or we are done: stop generating

    # -- OpenAI endpoints ----------------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(req: CompletionRequest):
        job, _ = await run(req.prompt, req, "completions")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish):
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            }

        if req.stream:
            return StreamingResponse(sse(job, "completions", chunk), media_type="text/event-stream")
        done = await collect(job, "completions")
        result = done["result"]
        metrics.ttft_seconds.observe(result.ttft_s)
        body = chunk(done["text"], result.finish_reason)
        body["usage"] = usage(result)
        return body

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat(req: ChatRequest):
        prompt = chat_prompt(tokenizer, runner.config.model_type, req.messages)
        job, _ = await run(prompt, req, "chat")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        first = [True]

        def chunk(text, finish):
            delta = {"content": text} if text or finish is None else {}
            if first[0]:
                delta["role"], first[0] = "assistant", False
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        if req.stream:
            return StreamingResponse(sse(job, "chat", chunk), media_type="text/event-stream")
        done = await collect(job, "chat")
        result = done["result"]
        metrics.ttft_seconds.observe(result.ttft_s)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": done["text"]},
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": usage(result),
        }

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "kvshelf"}]}

    # -- operations ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/v1/cache/stats", dependencies=[Depends(require_key)])
    async def cache_stats():
        return cache_stats_body(shelf)

    @app.get("/api/v1/layerwise/stats", dependencies=[Depends(require_key)])
    async def layerwise_stats():
        return {
            "enabled": shelf.generator.layerwise,
            "num_layers": runner.num_layers,
            **shelf.generator.layerwise_stats.as_dict(),
        }

    @app.post("/api/v1/cache/clear", dependencies=[Depends(require_key)])
    async def clear():
        if shelf.engine is not None:
            await asyncio.to_thread(shelf.engine.clear)
        return {"cleared": shelf.engine is not None}

    return app


def cache_stats_body(shelf: Shelf) -> dict:
    engine = shelf.engine
    if engine is None:
        return {"enabled": False}
    stats = engine.stats.as_dict()
    stats["hit_rate"] = stats["hit_tokens"] / stats["requested_tokens"] if stats["requested_tokens"] else 0.0
    fp = engine.fingerprint
    return {
        "enabled": True,
        "chunk_size": engine.chunk_size,
        "model": {"id": fp.model_id, "dtype": fp.dtype, "layers": fp.num_layers, "fingerprint": fp.hex()[:16]},
        "engine": stats,
        "tiers": engine.backend.stats(),
    }
