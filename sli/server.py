"""``sli serve``: an OpenAI-compatible HTTP server over a :class:`sli.engine.BatchingEngine`.

Starlette routes (ASGI; uvicorn serves them): ``POST /v1/chat/completions`` (the tokenizer's
chat template), ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``. ``stream: true``
answers as server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.
Concurrent requests share each pass over the layers (continuous batching, see
:mod:`sli.engine`); a client that goes away is dropped from the batch at the next step.

Errors have OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: malformed JSON
or a bad field → 400, a prompt longer than the model's context → 400
(``context_length_exceeded``), a wrong or missing API key (with ``api_key``) → 401, an unknown
model → 404, the waiting queue full → 429 (``Retry-After: 1``). No request can stop the server:
anything unexpected is a 500 with that body.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import BatchingEngine, EngineStopped, Event, InvalidRequest, QueueFull, Request, RequestTooLarge

logger = logging.getLogger(__name__)

__all__ = ["create_app", "serve", "ServerSettings", "build_chat_prompt"]

MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_CHAT_MAX_TOKENS = 256  # when a chat request gives none (OpenAI: up to the context)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's legacy completions default
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


class APIError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                   code: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


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


# ---------------------------------------------------------------------- prompts
def _content_text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}: only text content parts ({{'type': 'text', 'text': ...}}) are "
                                    "supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"{where}: content must be a string or a list of text parts", param="messages")


def _messages(body: Dict[str, Any]) -> List[Dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"messages[{index}] must be an object with a string 'role'", param="messages")
        out.append({"role": message["role"], "content": _content_text(message.get("content"), f"messages[{index}]")})
    return out


def build_chat_prompt(tokenizer, messages: List[Dict[str, str]]) -> List[int]:
    """Token ids of a conversation: the tokenizer's chat template (``add_generation_prompt``),
    tokenized without added special tokens (the template writes them). A tokenizer without a
    template gets the plain ``role: content`` lines and ``assistant:``, with its usual special tokens."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # the template's own checks (roles that must alternate, ...)
            raise APIError(400, f"the model's chat template refused these messages: {exc}",
                           param="messages") from None
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return list(tokenizer(text, verbose=False)["input_ids"])


def _completion_prompt(tokenizer, body: Dict[str, Any]) -> List[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a list
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        return list(tokenizer(prompt, verbose=False)["input_ids"])
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise APIError(400, "one prompt per request is supported; send several requests (they are batched)",
                       param="prompt")
    raise APIError(400, "'prompt' must be a non-empty string or a list of token ids", param="prompt")


# ---------------------------------------------------------------------- parameters
def _number(body: Dict[str, Any], name: str, low: float, high: float, default: Optional[float],
            low_open: bool = False) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a finite number", param=name)
    if value < low or value > high or (low_open and value == low):
        where = f"> {low:g}" if high == math.inf else f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"'{name}' is {value}; it must be {where}", param=name)
    return float(value)


def _integer(body: Dict[str, Any], name: str, low: int) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer", param=name)
    if value < low:
        raise APIError(400, f"'{name}' is {value}; it must be >= {low}", param=name)
    return value


MAX_STOP_STRINGS = 4  # OpenAI's limit


def _stop(body: Dict[str, Any]) -> List[str]:
    """OpenAI's ``stop``: a string or a list of up to 4; the answer ends before the first one."""
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP_STRINGS:
        return [s for s in stop if s]
    raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", param="stop")


def _unsupported(body: Dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise APIError(400, "only n=1 is supported; send several requests (they are batched)", param="n")
    if body.get("echo"):
        raise APIError(400, "echo is not supported", param="echo")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if body.get("tools") or body.get("functions"):
        raise APIError(400, "tools are not supported", param="tools")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream")


def _make_request(settings: ServerSettings, engine: BatchingEngine, body: Dict[str, Any], prompt_ids: List[int],
                  default_max_tokens: int, output) -> Request:
    """The engine request of ``body``: context checked the way OpenAI does (prompt + max_tokens
    within the model's positions), ``max_tokens`` defaulted to what is left."""
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    limit = settings.max_positions
    budget_positions = engine.kv_budget_bytes // max(1, engine.kv_bytes_per_token)
    context = min(limit, budget_positions) if limit is not None else budget_positions
    prompt = len(prompt_ids)
    if prompt >= context or (max_tokens is not None and prompt + max_tokens > context):
        asked = f"{prompt + max_tokens} tokens ({prompt} in the prompt, {max_tokens} for the completion)" \
            if max_tokens is not None else f"{prompt} tokens in the prompt, and at least 1 for the completion"
        why = "" if limit is not None and context == limit else \
            f" (this server's KV budget holds {budget_positions} positions)"
        raise APIError(400, f"This model's maximum context length is {context} tokens{why}. However, you "
                            f"requested {asked}. Please reduce the length of the prompt or the completion.",
                       param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(default_max_tokens, context - prompt)
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, None, low_open=True)
    min_p = _number(body, "min_p", 0.0, 1.0, None)  # vLLM's and llama.cpp's extensions, as transformers applies them
    repetition_penalty = _number(body, "repetition_penalty", 0.0, math.inf, 1.0, low_open=True)
    frequency_penalty = _number(body, "frequency_penalty", -2.0, 2.0, 0.0)
    presence_penalty = _number(body, "presence_penalty", -2.0, 2.0, 0.0)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, "'seed' must be an integer", param="seed")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, "'ignore_eos' must be true or false", param="ignore_eos")
    return Request(prompt_ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                   seed=None if seed is None else seed % (2 ** 63), stop=_stop(body), output=output,
                   ignore_eos=ignore_eos, min_p=min_p, repetition_penalty=repetition_penalty,
                   frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)


# ---------------------------------------------------------------------- events across threads
class _LoopQueue:
    """The engine thread's ``put(event)`` lands in an asyncio queue of the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: "asyncio.Queue[Event]" = asyncio.Queue()

    def put(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _submit(engine: BatchingEngine, request: Request) -> None:
    try:
        engine.submit(request)
    except QueueFull as exc:
        raise APIError(429, f"the server is busy: {exc}", type_="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": "1"}) from None
    except RequestTooLarge as exc:
        raise APIError(400, str(exc), code="context_length_exceeded") from None
    except InvalidRequest as exc:
        raise APIError(400, str(exc), param="prompt") from None
    except EngineStopped as exc:
        raise APIError(503, f"{exc}; the server is shutting down", type_="server_error") from None


def _sse(data: Dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(event: Event) -> Dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


# ---------------------------------------------------------------------- the app
def create_app(engine: BatchingEngine, settings: ServerSettings, manage_engine: bool = True) -> Starlette:
    """The ASGI app over ``engine`` (started and stopped with the app when ``manage_engine``)."""

    async def read_body(http: HTTPRequest) -> Dict[str, Any]:
        raw = await http.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES // (1024 * 1024)} MB")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"We could not parse the JSON body of your request ({exc}). The body must be "
                                "a JSON object.") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "you must provide a model parameter", param="model")
        if model != settings.model_id:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{settings.model_id}`",
                           param="model", code="model_not_found")
        _unsupported(body)
        return body

    async def run(http: HTTPRequest, body: Dict[str, Any], prompt_ids: List[int], chat: bool) -> Response:
        sink = _LoopQueue(asyncio.get_running_loop())
        request = _make_request(settings, engine, body, prompt_ids,
                                DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_COMPLETION_MAX_TOKENS, sink)
        _submit(engine, request)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage")) \
                if isinstance(body.get("stream_options"), dict) else False
            return _EventStream(_stream(request, sink, ident, created, chat, include_usage), request, engine)
        return await _collect(http, request, sink, ident, created, chat)

    def chunk(ident: str, created: int, chat: bool, text: Optional[str], finish: Optional[str],
              first: bool = False) -> Dict[str, Any]:
        if chat:
            delta: Dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                {"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": settings.model_id,
                    "system_fingerprint": None, "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": ident, "object": "text_completion", "created": created, "model": settings.model_id,
                "choices": [choice]}

    async def _stream(request: Request, sink: _LoopQueue, ident: str, created: int, chat: bool, include_usage: bool):
        done = False
        try:
            if chat:
                yield _sse(chunk(ident, created, chat, None, None, first=True))
            while True:
                event = await sink.queue.get()
                if event.finish_reason == "error":
                    yield _sse(error_body(event.error or "generation failed", "server_error"))
                    done = True
                    break
                if event.finish_reason == "cancelled":
                    done = True
                    break
                if event.text:
                    yield _sse(chunk(ident, created, chat, event.text, None))
                if event.finish_reason is not None:
                    yield _sse(chunk(ident, created, chat, None, event.finish_reason))
                    if include_usage:
                        last = chunk(ident, created, chat, None, None)
                        last["choices"], last["usage"] = [], _usage(event)
                        yield _sse(last)
                    done = True
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away (the response was cancelled): leave the batch
                request.cancel()
                engine.wake()

    async def _collect(http: HTTPRequest, request: Request, sink: _LoopQueue, ident: str, created: int,
                       chat: bool) -> Response:
        parts: List[str] = []
        checked = time.monotonic()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(sink.queue.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    event = None
                if event is not None:
                    parts.append(event.text)
                    if event.finish_reason is not None:
                        break
                if time.monotonic() - checked >= DISCONNECT_POLL_S:  # events may come faster than that
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        request.cancel()
                        engine.wake()
                        return Response(status_code=499)
        except BaseException:
            request.cancel()
            engine.wake()
            raise
        if event.finish_reason == "error":
            raise APIError(500, event.error or "generation failed", type_="server_error")
        if event.finish_reason == "cancelled":
            return Response(status_code=499)
        text = "".join(parts)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": event.finish_reason}
            body = {"id": ident, "object": "chat.completion", "created": created, "model": settings.model_id,
                    "system_fingerprint": None, "choices": [choice], "usage": _usage(event)}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason}
            body = {"id": ident, "object": "text_completion", "created": created, "model": settings.model_id,
                    "choices": [choice], "usage": _usage(event)}
        return JSONResponse(body)

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
        body = await read_body(http)
        prompt_ids = build_chat_prompt(settings.tokenizer, _messages(body))
        return await run(http, body, prompt_ids, chat=True)

    @guarded
    async def completions(http: HTTPRequest) -> Response:
        body = await read_body(http)
        return await run(http, body, _completion_prompt(settings.tokenizer, body), chat=False)

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


class _EventStream(StreamingResponse):
    """Server-sent events whose request leaves the batch however the response ends (a client
    gone before the first event included)."""

    def __init__(self, content, request: Request, engine: BatchingEngine) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.request, self.engine = request, engine

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.request.finished_at is None:
                self.request.cancel()
                self.engine.wake()


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
