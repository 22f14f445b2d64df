"""A request's answer from the engine's events: server-sent events in OpenAI's chunk format
(``stream: true``, ending with ``data: [DONE]``) or one JSON body when the answer is whole.

The engine runs in its own thread; :class:`EventQueue` hands its events to the server's loop.
However a response ends (done, the client gone, an error), its request leaves the batch.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Dict, List, Optional

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from .engine_request import Event, Request
from .openai_errors import APIError, error_body

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


class EventQueue:
    """The engine thread's ``put(event)`` lands in an asyncio queue of the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: "asyncio.Queue[Event]" = asyncio.Queue()

    def put(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def sse(data: Dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def usage(event: Event) -> Dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


class Answer:
    """One answer's identity (id, creation time, model) and its OpenAI shapes: a chat's
    ``chat.completion`` (chunks: ``chat.completion.chunk``) or a completion's ``text_completion``."""

    def __init__(self, model_id: str, chat: bool) -> None:
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_id, self.chat = model_id, chat

    def _envelope(self, kind: str, choice: Dict[str, Any]) -> Dict[str, Any]:
        body: Dict[str, Any] = {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}
        if self.chat:
            body["system_fingerprint"] = None
        body["choices"] = [choice]
        return body

    def chunk(self, text: Optional[str], finish: Optional[str], first: bool = False) -> Dict[str, Any]:
        """A streamed piece: ``text``, or the end with its ``finish`` reason (a chat's ``first``
        chunk carries the assistant's role)."""
        if self.chat:
            delta: Dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                {"content": text} if text else {})
            return self._envelope("chat.completion.chunk",
                                  {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish})
        return self._envelope("text_completion",
                              {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish})

    def body(self, text: str, last: Event) -> Dict[str, Any]:
        """The whole answer, ``last`` being its final event."""
        if self.chat:
            body = self._envelope("chat.completion", {"index": 0, "message": {"role": "assistant", "content": text},
                                                      "logprobs": None, "finish_reason": last.finish_reason})
        else:
            body = self._envelope("text_completion", {"index": 0, "text": text, "logprobs": None,
                                                      "finish_reason": last.finish_reason})
        body["usage"] = usage(last)
        return body


async def stream(answer: Answer, request: Request, events: EventQueue, engine, include_usage: bool):
    """The answer as server-sent events; a client gone mid-answer cancels ``request``."""
    done = False
    try:
        if answer.chat:
            yield sse(answer.chunk(None, None, first=True))
        while True:
            event = await events.queue.get()
            if event.finish_reason == "error":
                yield sse(error_body(event.error or "generation failed", "server_error"))
                done = True
                break
            if event.finish_reason == "cancelled":
                done = True
                break
            if event.text:
                yield sse(answer.chunk(event.text, None))
            if event.finish_reason is not None:
                yield sse(answer.chunk(None, event.finish_reason))
                if include_usage:
                    last = answer.chunk(None, None)
                    last["choices"], last["usage"] = [], usage(event)
                    yield sse(last)
                done = True
                break
        yield "data: [DONE]\n\n"
    finally:
        if not done:  # the client went away (the response was cancelled): leave the batch
            engine.cancel(request)


async def collect(answer: Answer, http: HTTPRequest, request: Request, events: EventQueue, engine) -> Response:
    """The whole answer as one body (499 when the client went away before it was done)."""
    parts: List[str] = []
    checked = time.monotonic()
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.queue.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                event = None
            if event is not None:
                parts.append(event.text)
                if event.finish_reason is not None:
                    break
            if time.monotonic() - checked >= DISCONNECT_POLL_S:  # events may come faster than that
                checked = time.monotonic()
                if await http.is_disconnected():
                    engine.cancel(request)
                    return Response(status_code=499)
    except BaseException:
        engine.cancel(request)
        raise
    if event.finish_reason == "error":
        raise APIError(500, event.error or "generation failed", type_="server_error")
    if event.finish_reason == "cancelled":
        return Response(status_code=499)
    return JSONResponse(answer.body("".join(parts), event))


class EventStream(StreamingResponse):
    """Server-sent events whose request leaves the batch however the response ends (a client
    gone before the first event included)."""

    def __init__(self, content, request: Request, engine) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.request, self.engine = request, engine

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.request.finished_at is None:
                self.engine.cancel(self.request)
