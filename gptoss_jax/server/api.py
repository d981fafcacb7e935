"""The OpenAI-compatible HTTP API (FastAPI/Starlette on uvicorn) over one continuous-batching `Engine`.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/responses. Every error is an
OpenAI-style {"error": {...}} object: 400 for bad input (invalid JSON, missing or empty messages, unknown roles,
max_tokens beyond the context, invalid sampling values, bodies over --max-body-bytes), 401 without the API key,
404 for an unknown model or path, 503 with Retry-After when the queue is full.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptoss_jax.server import responses as resp_api
from gptoss_jax.server.chat import (
    BadRequest,
    ChatJob,
    Output,
    chunk_object,
    completion_object,
    delta_to_openai,
    error_object,
    new_id,
    prepare_chat,
    usage,
)
from gptoss_jax.engine import Engine, EngineStopped, GenRequest, QueueFull

log = logging.getLogger("gptoss_jax.server")

MAX_BODY_BYTES = 4 << 20
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.2


def _error(status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None,
           headers=None) -> JSONResponse:
    return JSONResponse(error_object(message, type=type, param=param, code=code), status_code=status,
                        headers=headers)


class Stream:
    """One engine request seen from asyncio: tokens and the finish arrive on an asyncio queue."""

    def __init__(self, engine: Engine, job: ChatJob, loop: asyncio.AbstractEventLoop):
        self.queue: asyncio.Queue = asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item)  # noqa: E731
        self.req: GenRequest = job.request(on_token=lambda t: put(("token", t, None)),
                                           on_finish=lambda reason, error: put(("finish", reason, error)))
        engine.submit(self.req)  # QueueFull / ValueError propagate

    async def events(self, request: Request) -> AsyncIterator[tuple]:
        """(kind, value, error) items until the finish; cancels the engine request if the client goes away."""
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        self.req.cancel()
                        return
                    continue
                yield item
                if item[0] == "finish":
                    return
        finally:
            if not self.req.finished:
                self.req.cancel()


def create_app(engine: Engine, *, model_name: str | None = None, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The ASGI app. The engine must be started (`engine.start()`); the app does not stop it."""
    served = model_name or engine.model_name
    created = int(time.time())
    app = FastAPI(title="gptoss-jax", description="OpenAI-compatible API for gpt-oss", docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def server_error(request, exc):  # never a bare 500 page
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(exc).__name__}", type="server_error")

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
                return _error(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")
        return await call_next(request)

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise BadRequest(f"the request body is {int(length)} bytes, more than the limit of {max_body_bytes}",
                             None, "request_too_large")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > max_body_bytes:
                raise BadRequest(f"the request body is more than the limit of {max_body_bytes} bytes", None,
                                 "request_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"We could not parse the JSON body of your request ({e})", None,
                             "invalid_json") from None

    def submit_error(e: Exception) -> JSONResponse:
        if isinstance(e, QueueFull):
            return _error(503, f"The server is busy: {e}. Retry after {RETRY_AFTER_S} s.", type="server_busy",
                          code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        if isinstance(e, EngineStopped):
            return _error(503, str(e), type="server_error", code="engine_stopped")
        if isinstance(e, BadRequest):
            return JSONResponse(e.to_dict(), status_code=e.status)
        return _error(400, str(e), code="invalid_value")

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served, "object": "model", "created": created,
                                            "owned_by": "gptoss-jax", "max_model_len": engine.max_seq_len}]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != served:
            return _error(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return {"id": served, "object": "model", "created": created, "owned_by": "gptoss-jax"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            job = prepare_chat(await read_json(request), engine, served_model=served)
            stream = Stream(engine, job, asyncio.get_running_loop())
        except (BadRequest, QueueFull, EngineStopped, ValueError) as e:
            return submit_error(e)
        if job.stream:
            return StreamingResponse(_sse_chat(job, stream, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        out = Output(job.stop)
        reason = error = None
        async for kind, value, err in stream.events(request):
            if kind == "token":
                out.feed(value)
                if out.stopped:
                    stream.req.cancel()
            else:
                reason, error = value, err
        if error:
            return _error(500, error, type="server_error")
        out.close()
        return completion_object(job, out, reason)

    async def _sse_chat(job: ChatJob, stream: Stream, request: Request) -> AsyncIterator[str]:
        id_, created_at = new_id("chatcmpl"), int(time.time())
        sse = lambda obj: f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"  # noqa: E731
        yield sse(chunk_object(job, id_, created_at, {"role": "assistant", "content": ""}))
        out = Output(job.stop)
        reason = None
        async for kind, value, err in stream.events(request):
            if kind == "token":
                deltas = out.feed(value)
                if out.stopped:
                    stream.req.cancel()
            else:
                if err:
                    yield sse(error_object(err, type="server_error"))
                    return
                reason = value
                deltas = out.close()
            for d in deltas:
                yield sse(chunk_object(job, id_, created_at, delta_to_openai(d)))
        if reason == "cancelled" and not out.stopped:
            return  # the client went away
        yield sse(chunk_object(job, id_, created_at, {}, out.finish_reason(reason)))
        if job.include_usage:
            chunk = chunk_object(job, id_, created_at, {})
            chunk["choices"] = []
            chunk["usage"] = usage(len(job.prompt), out.n_tokens)
            yield sse(chunk)
        yield "data: [DONE]\n\n"

    @app.post("/v1/responses")
    async def responses(request: Request):
        try:
            job, meta = resp_api.prepare(await read_json(request), engine, served_model=served)
            stream = Stream(engine, job, asyncio.get_running_loop())
        except (BadRequest, QueueFull, EngineStopped, ValueError) as e:
            return submit_error(e)
        if job.stream:
            return StreamingResponse(resp_api.sse(job, meta, stream.events(request), stream.req),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        out = Output(job.stop)
        reason = error = None
        async for kind, value, err in stream.events(request):
            if kind == "token":
                out.feed(value)
            else:
                reason, error = value, err
        if error:
            return _error(500, error, type="server_error")
        out.close()
        return resp_api.response_object(job, meta, out, reason)

    return app
