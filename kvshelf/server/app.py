"""kvshelf's OpenAI-compatible server: completions and chat over the HF runner with the KV cache.

Generation runs one request at a time in one generation thread (kvshelf.server.generation_queue) fed by a bounded
FIFO; the event loop stays free for health checks, metrics and stats meanwhile. Keys, body size and
body read time are checked before any route runs (kvshelf.server.gate). A request whose client goes
away, streaming or not, or whose deadline passes, stops at its next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Body, FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvshelf.assembly import Shelf
from kvshelf.errors import Interrupted, KVShelfError
from kvshelf.generation import GenerationResult
from kvshelf.metrics import Metrics
from kvshelf.server import errors
from kvshelf.server.errors import APIError
from kvshelf.server.gate import PUBLIC_PATHS, Gate
from kvshelf.server.generation_queue import Cancelled, DeadlineExceeded, GenerationQueue, Job, QueueFull
from kvshelf.server.outputs import Logprobs, TextStream
from kvshelf.server.protocol import ChatRequest, CompletionRequest, _Request, chat_prompt
from kvshelf.server.tenants import Tenant, Tenants

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 64


def create_app(shelf: Shelf, metrics: Metrics) -> FastAPI:
    config = shelf.config
    runner = shelf.runner
    tokenizer = shelf.model.tokenizer
    generator = shelf.generator
    model_name = config.served_model_name or shelf.model.path.name
    vocab_size = int(getattr(runner.config, "vocab_size", 0) or len(tokenizer))
    max_prompt = min(config.max_prompt_tokens or runner.max_positions, runner.max_positions)
    tenants = Tenants(config)
    queue = GenerationQueue(config.max_waiting_requests)
    durations = [1.0]  # recent generation times (s), for Retry-After
    metrics_here = config.server_metrics_port is None

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await asyncio.to_thread(queue.close)
        shelf.close()  # finish write-behind, close tier connections

    docs = config.server_docs
    app = FastAPI(
        title="kvshelf",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.add_middleware(
        Gate,
        tenants=tenants,
        max_body_bytes=config.max_body_bytes,
        read_timeout_s=config.read_timeout_s,
        open_paths=PUBLIC_PATHS,
    )
    errors.install(app)
    if shelf.engine is not None:
        metrics.watch_engine(shelf.engine, generator.request_stats)

    # -- admission: everything checked before a request takes a place in the queue -----------------------
    async def admit(req: _Request, prompt, request: Request, endpoint: str) -> tuple[Tenant, str, int, int]:
        """(tenant, salt, prompt token count, max new tokens); APIError for anything unacceptable."""
        if req.model is not None and req.model != model_name:
            raise APIError(
                404,
                f"model {req.model!r} is not served here; this server serves {model_name!r}",
                code="model_not_found",
            )
        budget = req.token_budget(DEFAULT_MAX_TOKENS)
        if budget > config.max_output_tokens:
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise APIError(400, f"{param}: at most {config.max_output_tokens} tokens per request", param=param)
        if isinstance(prompt, list):
            bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise APIError(
                    400, f"prompt: token id {bad} is outside the vocabulary (0..{vocab_size - 1})", param="prompt"
                )
            n_prompt = len(prompt)
        else:
            n_prompt = len((await asyncio.to_thread(tokenizer, prompt))["input_ids"])
        param = "messages" if endpoint == "chat" else "prompt"
        if n_prompt == 0 or (isinstance(prompt, str) and not prompt):
            raise APIError(400, f"{param}: prompt is empty", param=param)
        if n_prompt > max_prompt:
            limit = "the model's context" if max_prompt == runner.max_positions else "max_prompt_tokens"
            raise APIError(400, f"{param}: {n_prompt} tokens, more than {limit} of {max_prompt}", param=param)
        if n_prompt + budget > runner.max_positions:
            raise APIError(
                400,
                f"{param}: prompt ({n_prompt} tokens) + max_tokens ({budget}) exceeds the model's context of "
                f"{runner.max_positions}",
                param=param,
            )
        tenant: Tenant = request.state.tenant
        return tenant, tenants.salt(tenant, req.cache_salt), n_prompt, budget

    def start(prompt, req: _Request, salt: str, budget: int, endpoint: str) -> Job:
        """Queue the generation; 429 with Retry-After when too many already wait."""
        top = req.top_logprobs_wanted()

        def run(job: Job) -> None:  # in the generation thread
            t0 = time.monotonic()
            try:
                text = TextStream(tokenizer, req.stop_strings)
                lp = Logprobs(tokenizer, top) if top is not None else None
                stream = generator.stream(
                    prompt,
                    should_stop=lambda: text.stopped or job.should_stop(),
                    max_new_tokens=budget,
                    salt=salt,
                    temperature=req.temperature,
                    top_p=req.top_p,
                    seed=req.seed,
                    on_logits=lp.add if lp is not None else None,
                )
                while True:
                    try:
                        delta = text.add(next(stream))
                    except StopIteration as done:
                        result: GenerationResult = done.value
                        break
                    if delta:
                        job.emit("text", (delta, lp.take() if lp else None))
                if job.cancelled.is_set():
                    metrics.cancelled_requests.labels("client_gone").inc()
                    job.emit("error", Cancelled("the client went away"))
                    return
                if job.expired():
                    metrics.cancelled_requests.labels("deadline").inc()
                    job.emit("error", DeadlineExceeded(f"request deadline of {config.request_timeout_s:g} s passed"))
                    return
                job.emit("text", (text.finish(), lp.take() if lp else None))
                job.emit("done", {"result": result, "text": text.text, "logprobs": lp})
            except Interrupted:  # the prefill stopped between layers: the client went away or time ran out
                if job.expired() and not job.cancelled.is_set():
                    metrics.cancelled_requests.labels("deadline").inc()
                    job.emit("error", DeadlineExceeded(f"request deadline of {config.request_timeout_s:g} s passed"))
                else:
                    metrics.cancelled_requests.labels("client_gone").inc()
                    job.emit("error", Cancelled("the client went away"))
            except Exception as err:  # reported to the client as an error response, never swallowed
                job.emit("error", err)
            finally:
                durations[:] = [*durations[-15:], time.monotonic() - t0]

        job = Job(run, asyncio.get_running_loop(), time.monotonic() + config.request_timeout_s)
        try:
            queue.submit(job)
        except QueueFull:
            metrics.rejected_requests.labels("queue_full").inc()
            wait = math.ceil(sum(durations) / len(durations) * (queue.waiting + 1))
            raise APIError(
                429,
                f"the server is busy ({queue.waiting} requests waiting); retry later",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(max(1, wait))},
            ) from None
        metrics.requests.labels(endpoint).inc()
        return job

    def as_api_error(err: Exception, endpoint: str) -> APIError:
        if isinstance(err, DeadlineExceeded):
            return APIError(504, str(err), "timeout_error", code="deadline_exceeded")
        if isinstance(err, Cancelled):  # nobody reads this answer
            return APIError(499, str(err), "cancelled")
        metrics.request_errors.labels(endpoint).inc()
        if isinstance(err, KVShelfError):
            return APIError(400, str(err))
        log.error("generation failed: %s", err, exc_info=err)
        return APIError(500, "generation failed (see the server log)", "server_error")

    async def next_event(job: Job):
        try:
            return await asyncio.wait_for(job.events.get(), max(job.deadline - time.monotonic(), 0) + 1.0)
        except TimeoutError:
            job.cancelled.set()
            return "error", DeadlineExceeded(f"request deadline of {config.request_timeout_s:g} s passed")

    async def collect(job: Job, request: Request, endpoint: str) -> dict:
        """Wait for the whole answer; a client that hangs up cancels its job (it stops at its next token)."""

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancelled.set()
            job.events.put_nowait(("error", Cancelled("the client went away")))  # end this handler now

        watcher = asyncio.create_task(watch())
        try:
            while True:
                kind, value = await next_event(job)
                if kind == "error":
                    raise as_api_error(value, endpoint)
                if kind == "done":
                    return value
        finally:
            watcher.cancel()

    def usage(result: GenerationResult) -> dict:
        n_in, n_out = result.prompt_tokens, len(result.token_ids)
        out = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
        if config.usage_details:  # tells the client what is cached: an oracle across clients of one tenant
            out["prompt_tokens_details"] = {"cached_tokens": result.hit_tokens}
            out["kvshelf"] = {
                "hit_tokens": result.hit_tokens,
                "ttft_s": round(result.ttft_s, 6),
                "cache": result.cache_reason,
            }
        return out

    async def sse(job: Job, endpoint: str, make_chunk, include_usage: bool) -> AsyncIterator[str]:
        def data(obj) -> str:
            if include_usage and "usage" not in obj:
                obj["usage"] = None
            return f"data: {json.dumps(obj)}\n\n"

        try:
            while True:
                kind, value = await next_event(job)
                if kind == "text":
                    delta, entries = value
                    if delta or entries:
                        yield data(make_chunk(delta, None, entries))
                elif kind == "error":
                    if isinstance(value, Cancelled):
                        return
                    yield f"data: {json.dumps(as_api_error(value, endpoint).body())}\n\n"
                    break
                else:
                    result = value["result"]
                    metrics.ttft_seconds.observe(result.ttft_s)
                    yield data(make_chunk("", result.finish_reason, None))
                    if include_usage:
                        final = make_chunk("", None, None)
                        final["choices"], final["usage"] = [], usage(result)
                        yield data(final)
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # the client went away, or we are done: stop generating

    # -- OpenAI endpoints ----------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        _, salt, _, budget = await admit(req, req.prompt, request, "completions")
        job = start(req.prompt, req, salt, budget, "completions")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        lp_format = None

        def chunk(text, finish, entries):
            logprobs = None
            if entries is not None and lp_format is not None:
                logprobs = lp_format(entries)
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}],
            }

        if req.logprobs is not None:
            lp_format = Logprobs(tokenizer, req.logprobs).completion_format
        if req.stream:
            return StreamingResponse(sse(job, "completions", chunk, req.include_usage), media_type="text/event-stream")
        done = await collect(job, request, "completions")
        result = done["result"]
        metrics.ttft_seconds.observe(result.ttft_s)
        body = chunk(done["text"], result.finish_reason, done["logprobs"].entries if done["logprobs"] else None)
        body["usage"] = usage(result)
        return body

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        prompt = chat_prompt(tokenizer, runner.config.model_type, req.messages)
        _, salt, _, budget = await admit(req, prompt, request, "chat")
        job = start(prompt, req, salt, budget, "chat")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        first = [True]
        top = req.top_logprobs_wanted()
        lp_format = Logprobs(tokenizer, top).chat_format if top is not None else None

        def chunk(text, finish, entries):
            delta = {"content": text} if text or finish is None else {}
            if first[0]:
                delta["role"], first[0] = "assistant", False
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            if lp_format is not None:
                choice["logprobs"] = lp_format(entries) if entries else None
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_name,
                "choices": [choice],
            }

        if req.stream:
            return StreamingResponse(sse(job, "chat", chunk, req.include_usage), media_type="text/event-stream")
        done = await collect(job, request, "chat")
        result = done["result"]
        metrics.ttft_seconds.observe(result.ttft_s)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": done["text"]},
            "finish_reason": result.finish_reason,
            "logprobs": lp_format(done["logprobs"].entries) if lp_format is not None else None,
        }
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [choice],
            "usage": usage(result),
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "kvshelf"}]}

    # -- operations ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    if metrics_here:  # an admin key is asked for it and the stats (the gate), unless the server has no keys

        @app.get("/metrics")
        async def prometheus():
            return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/v1/cache/stats")
    async def cache_stats():
        return cache_stats_body(shelf)

    @app.get("/api/v1/layerwise/stats")
    async def layerwise_stats():
        return {
            "enabled": generator.use_layerwise,
            "num_layers": runner.num_layers,
            **generator.layerwise_stats.as_dict(),
        }

    @app.post("/api/v1/cache/clear")
    async def clear(request: Request, remote: bool = Body(False, embed=True)):
        """Clear this server's own tiers (memory, disk); `{"remote": true}` (admin keys only) also clears the
        shared remote tier, which other instances use too."""
        tenant: Tenant = request.state.tenant
        if remote and not tenant.admin:
            raise APIError(403, "clearing the shared remote tier needs an admin API key", "permission_error")
        if shelf.engine is None:
            return {"cleared": []}
        return {"cleared": await asyncio.to_thread(clear_tiers, shelf, remote)}

    return app


def clear_tiers(shelf: Shelf, include_remote: bool) -> list[str]:
    """Clear the local tiers (and the remote one if asked); the names of the tiers cleared."""
    from kvshelf.storage.disk import DiskBackend
    from kvshelf.storage.memory import MemoryBackend

    manager = shelf.engine.backend
    manager.flush()
    cleared = []
    for tier in manager.tiers:
        if include_remote or isinstance(tier.backend, MemoryBackend | DiskBackend):
            tier.call(tier.backend.clear)
            cleared.append(tier.name)
    return cleared


def cache_stats_body(shelf: Shelf) -> dict:
    engine = shelf.engine
    if engine is None:
        return {"enabled": False}
    stats = engine.stats.as_dict()
    requests = shelf.generator.request_stats.as_dict()
    # The request-level counts are the truth (bypassed requests included); the engine's own counts only
    # see lookups it was asked for.
    stats["lookup_requested_tokens"] = stats.pop("requested_tokens")
    stats["lookup_hit_tokens"] = stats.pop("hit_tokens")
    stats.update(
        requests=requests["requests"],
        requested_tokens=requests["requested_tokens"],
        hit_tokens=requests["hit_tokens"],
        hit_rate=requests["hit_rate"],
        by_reason=requests["by_reason"],
    )
    fp = engine.fingerprint
    return {
        "enabled": True,
        "chunk_size": engine.chunk_size,
        "model": {"id": fp.model_id, "dtype": fp.dtype, "layers": fp.num_layers, "fingerprint": fp.hex()[:16]},
        "engine": stats,
        "tiers": engine.backend.stats(),
    }
