"""The endpoint's HTTP edges: OpenAI-shaped error bodies (HTTPError, error_response), the API
keys (ApiKeyAuth: 401 before anything else) and the request body limit (BodyLimit: 413 before the
body is parsed), both plain ASGI middlewares."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """413 for a request body over limits.max_body_bytes (app.state.max_body_bytes), judged on
    Content-Length and on the bytes that actually arrive (a chunked body has no Content-Length).
    The body is read here, up to the limit, then handed on."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        limit = getattr(scope.get("app").state, "max_body_bytes", None) if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(limit, scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                chunks = None
                first = message
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._too_large(limit, scope, receive, send)
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(limit, scope, receive, send):
        response = error_response(413, f"the request body is larger than this server's limit of {limit} bytes "
                                       "(limits.max_body_bytes)", "invalid_request_error", code="body_too_large")
        await response(scope, receive, send)


PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class ApiKeyAuth:
    """401 for a request without one of server.api_keys as ``Authorization: Bearer <key>``
    (app.state.api_keys: the keys as bytes; none configured: every request passes), except on
    PUBLIC_PATHS: probes, scrapers and the OpenAPI pages. Every key is compared in constant time."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        keys = getattr(scope.get("app").state, "api_keys", None) if scope["type"] == "http" else None
        if keys and _route_path(scope) not in PUBLIC_PATHS:
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            scheme, _, key = given.partition(b" ")
            ok = False
            for k in keys:  # no early exit: the time does not say which key came close
                ok |= hmac.compare_digest(key.strip(), k)
            if not (ok and scheme.lower() == b"bearer"):
                message = ("Incorrect API key provided" if given else
                           "You didn't provide an API key: send 'Authorization: Bearer <key>' (server.api_keys)")
                response = error_response(401, message, "invalid_request_error", code="invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _route_path(scope) -> str:
    """The path under the app's mount point (Serve's route_prefix is the scope's root_path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
