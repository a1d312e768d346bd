"""How the OpenAI endpoint (router/app.py) reports a failure, always OpenAI-shaped:

    install_error_handlers(app)  an exception out of a route -> its status and error body
    first_delta(deltas)          a routing failure before any byte is sent -> a 503 (or a 504)
    stream_error(rid, e)         the error object of a stream that already sent its status line
    ERROR_RESPONSES              the error statuses the routes declare in the OpenAPI spec
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.http_errors import HTTPError, error_response
from router.openai_models import ErrorResponse
from router.policy import NoWorkerAvailable
from router.request_flow import MigrationsExhausted, RequestTimedOut
from workers.protocol import InvalidRequestError, RequestFailedError

log = logging.getLogger(__name__)
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503, 504)}
# what ends a request with a 503 (no byte streamed yet) or an SSE error event (streaming)
UNAVAILABLE = (NoWorkerAvailable, MigrationsExhausted, RequestFailedError)


def stream_error(rid: str, e: Exception) -> dict:
    """What a stream that already sent its status line says when it fails."""
    if isinstance(e, UNAVAILABLE):
        return {"message": str(e), "type": "server_error", "param": None, "code": "no_worker"}
    if isinstance(e, RequestTimedOut):
        return {"message": str(e), "type": "timeout_error", "param": None, "code": "request_timeout"}
    log.exception("stream %s failed", rid)
    return {"message": f"internal error: {type(e).__name__}", "type": "server_error", "param": None,
            "code": "internal_error"}


async def first_delta(deltas):
    """The stream's first item, awaited before any byte is sent: routing happens now, so "no
    worker" is a proper 503 (and a timeout a 504), not an error event."""
    try:
        return await deltas.__anext__()
    except UNAVAILABLE as e:
        await deltas.aclose()
        raise HTTPError(503, str(e), "service_unavailable", code="no_worker") from e
    except RequestTimedOut as e:
        await deltas.aclose()
        raise HTTPError(504, str(e), "timeout_error", code="request_timeout") from e


def install_error_handlers(app: FastAPI) -> None:
    # module-level handlers: Serve pickles the app, and these go by reference, not by value
    for exc_class, handler in ((HTTPError, _http_error), (RequestValidationError, _validation_error),
                               (StarletteHTTPException, _starlette_error), (InvalidRequestError, _invalid),
                               (Exception, _internal)):
        app.add_exception_handler(exc_class, handler)


async def _http_error(request: Request, e: HTTPError):
    return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)


async def _validation_error(request: Request, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    msg = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}"
                    for err in e.errors())
    return error_response(400, msg or "invalid request", "invalid_request_error", ".".join(loc) or None)


async def _starlette_error(request: Request, e: StarletteHTTPException):
    # FastAPI's own errors (a body it cannot decode, an unknown path, a wrong method), OpenAI-shaped
    type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return error_response(e.status_code, str(e.detail), type_, code=code, headers=getattr(e, "headers", None))


async def _invalid(request: Request, e: InvalidRequestError):
    # also a worker's InvalidRequestError (Ray re-raises it as a subclass with the same attributes)
    return error_response(400, getattr(e, "message", str(e)), "invalid_request_error", getattr(e, "param", None))


async def _internal(request: Request, e: Exception):
    log.exception("%s %s failed", request.method, request.url.path)
    return error_response(500, f"internal error: {type(e).__name__}", "server_error", code="internal_error")
