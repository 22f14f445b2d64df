"""``sli serve``: an OpenAI-compatible HTTP server over a :class:`sli.engine.BatchingEngine`.

Starlette routes (ASGI; uvicorn serves them): ``POST /v1/chat/completions`` (the tokenizer's
chat template), ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``. ``stream: true``
answers as server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.
Concurrent requests share each pass over the layers (continuous batching, see
:mod:`sli.engine`); a client that goes away is dropped from the batch at the next step.
A body is read and checked by :mod:`sli.openai_requests`, answered by :mod:`sli.openai_responses`.

Errors have OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``
(:mod:`sli.openai_errors`): malformed JSON or a bad field → 400, a prompt longer than the
model's context → 400 (``context_length_exceeded``), a wrong or missing API key (with
``api_key``) → 401, an unknown model → 404, the waiting queue full → 429 (``Retry-After: 1``).
No request can stop the server: anything unexpected is a 500 with that body.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .engine import BatchingEngine
from .openai_errors import APIError, error_response, submit
from .openai_requests import build_chat_prompt, chat_prompt_ids, completion_prompt_ids, make_request, parse_body
from .openai_responses import Answer, EventQueue, EventStream, collect, stream

logger = logging.getLogger(__name__)

__all__ = ["create_app", "serve", "ServerSettings", "build_chat_prompt"]


class ServerSettings:
    """What the routes need besides the engine: the model's name, tokenizer, context and key."""

    def __init__(self, model_id: str, tokenizer, max_positions: Optional[int], api_key: Optional[str] = None,
                 eos_token_ids: Sequence[int] = ()) -> None:
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.max_positions = max_positions
        self.api_key = api_key or None
        self.eos_token_ids = list(eos_token_ids)
        self.created = int(time.time())


# ---------------------------------------------------------------------- the app
def create_app(engine: BatchingEngine, settings: ServerSettings, manage_engine: bool = True) -> Starlette:
    """The ASGI app over ``engine`` (started and stopped with the app when ``manage_engine``)."""

    async def run(http: HTTPRequest, prompt_ids: List[int], body: Dict[str, Any], chat: bool) -> Response:
        events = EventQueue(asyncio.get_running_loop())
        request = make_request(body, prompt_ids, chat=chat, max_positions=settings.max_positions, engine=engine,
                               output=events)
        submit(engine, request)
        answer = Answer(settings.model_id, chat)
        if body.get("stream"):
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return EventStream(stream(answer, request, events, engine, include_usage), request, engine)
        return await collect(answer, http, request, events, engine)

    def guarded(handler):
        """Every route: APIError → its answer; anything else → a 500 with an OpenAI body."""

        async def route(http: HTTPRequest) -> Response:
            try:
                return await handler(http)
            except APIError as exc:
                return exc.response()
            except Exception as exc:  # the server keeps serving
                logger.exception("%s %s failed", http.method, http.url.path)
                return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

        return route

    @guarded
    async def chat_completions(http: HTTPRequest) -> Response:
        body = parse_body(await http.body(), settings.model_id)
        return await run(http, chat_prompt_ids(settings.tokenizer, body), body, chat=True)

    @guarded
    async def completions(http: HTTPRequest) -> Response:
        body = parse_body(await http.body(), settings.model_id)
        return await run(http, completion_prompt_ids(settings.tokenizer, body), body, chat=False)

    def model_card() -> Dict[str, Any]:
        return {"id": settings.model_id, "object": "model", "created": settings.created, "owned_by": "sli",
                "max_model_len": settings.max_positions}

    @guarded
    async def models(http: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @guarded
    async def model(http: HTTPRequest) -> Response:
        name = http.path_params["name"]
        if name != settings.model_id:
            raise APIError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
        return JSONResponse(model_card())

    @guarded
    async def health(http: HTTPRequest) -> Response:
        stats = engine.stats()
        return JSONResponse({"status": "ok" if stats["running"] else "stopped", "model": settings.model_id,
                             "engine": stats}, status_code=200 if stats["running"] else 503)

    async def http_error(http: HTTPRequest, exc: HTTPException) -> Response:
        return error_response(exc.status_code, f"{http.method} {http.url.path}: {exc.detail}",
                              code="not_found" if exc.status_code == 404 else None, headers=exc.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{name:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.engine, app.state.settings = engine, settings
    return _ApiKeyMiddleware(app, settings.api_key) if settings.api_key else app


class _ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` on every /v1 route (``/health`` stays open, for probes)."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.api_key = app, api_key.encode()
        self.state = app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, key = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.api_key):
                response = error_response(401, "Incorrect or missing API key: pass `Authorization: Bearer KEY`",
                                          code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------- building it from a processor
def stop_ids_for(processor, tokenizer) -> List[int]:
    """The ids that end an answer: the config's, generation_config.json's and the tokenizer's eos."""
    from .stopping import end_token_ids

    return end_token_ids(processor.model_dir, processor.config, tokenizer)


def build_app(processor, *, tokenizer=None, model_name: Optional[str] = None, api_key: Optional[str] = None,
              max_batch_size: int = 8, max_queue: int = 64, kv_budget_bytes: Optional[int] = None,
              manage_engine: bool = True) -> Tuple[Any, BatchingEngine]:
    """(the ASGI app, its engine) for a loaded processor; the engine starts with the app."""
    from .model_check import load_tokenizer

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(Path(processor.model_dir))
    eos = stop_ids_for(processor, tokenizer)
    engine = BatchingEngine(processor, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                            kv_budget_bytes=kv_budget_bytes, eos_token_ids=eos)
    settings = ServerSettings(model_name or Path(processor.model_dir).name, tokenizer, processor.max_positions,
                              api_key=api_key, eos_token_ids=eos)
    return create_app(engine, settings, manage_engine=manage_engine), engine


def serve(processor, *, host: str = "127.0.0.1", port: int = 8000, model_name: Optional[str] = None,
          api_key: Optional[str] = None, max_batch_size: int = 8, max_queue: int = 64,
          kv_budget_bytes: Optional[int] = None, log_level: str = "info") -> None:
    """Serve ``processor`` until interrupted (uvicorn; Ctrl-C stops it)."""
    import uvicorn

    app, engine = build_app(processor, model_name=model_name, api_key=api_key, max_batch_size=max_batch_size,
                            max_queue=max_queue, kv_budget_bytes=kv_budget_bytes)
    logger.info("serving %s at http://%s:%d/v1 (batches of up to %d, %d waiting at most, KV budget %.1f MB%s)",
                app.state.settings.model_id, host, port, max_batch_size, max_queue, engine.kv_budget_bytes / 1e6,
                ", API key required" if api_key else "")
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
