"""OpenAI's error answers, ``{"error": {"message", "type", "param", "code"}}``, and the
engine's refusals of a request as them (busy → 429, too large → 400, stopped → 503)."""
from __future__ import annotations

from typing import Any, Dict, Optional

from starlette.responses import JSONResponse

from .engine_request import EngineStopped, InvalidRequest, QueueFull, Request, RequestTooLarge


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


def submit(engine, request: Request) -> None:
    """``engine.submit(request)``, its refusals raised as :class:`APIError`."""
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
