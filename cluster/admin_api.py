"""The management API: a FastAPI app served by the cluster manager (cluster/admin_server.py).

    GET    /cluster                          pools (desired/starting/ready/...), readiness, totals
    GET    /cluster/workers                  every worker: role, state, load, KV quota and use,
    GET    /cluster/workers/{id}             lease, model, process memory
    DELETE /cluster/workers/{id}             remove now (its requests fail over)              200
    POST   /cluster/workers/{id}/drain       {timeout_s?}: starts a drain, answers at once    202
    GET    /cluster/drains[/{id}]            drain status: draining -> drained | timed_out | failed | removed
    POST   /cluster/pools/{role}/scale       {replicas}: starts/drains workers                202
    GET    /cluster/kv-quota                 quota and use per worker, the resizer's plan per node
    PUT    /cluster/kv-quota/{id}            {num_blocks}: sticky override, applied now    -> ResizeResult
    DELETE /cluster/kv-quota/{id}            hand the worker back to the resizer
    GET    /metrics                          Prometheus: KV quota/use per worker, node budgets, pools
    GET    /openapi.json                     the spec
    GET    /cluster/traffic                  the endpoint's latency/throughput samples and recent routing
                                             decisions (cluster/endpoint_traffic.py)
    GET    /dashboard                        the live dashboard page (public: it holds no data; its
                                             data routes need the token; cluster/dashboard_page.py)

Auth: EVERY path but GET /dashboard (the spec and unknown paths included) answers 401 without
``Authorization: Bearer <server.admin_token>``; the check runs before routing, compares in
constant time, and never logs the header. There is no Swagger UI (a browser could not send the
header); fetch the spec with the token. Errors: ``{"error": {"message", "type", "code", "param"}}``
with 400 for every bad value (body or path), 404 for an unknown worker/pool/drain, 409 for a
worker in the wrong state, 503 when etcd is unavailable.

Drain is asynchronous: POST answers 202 with a status and a Location to poll (GET
/cluster/drains/{id}); the worker shows state "draining" in GET /cluster/workers/{id} until it is
gone (then 404 there, while its drain record stays in /cluster/drains).
"""

from __future__ import annotations

import hmac
import logging

from fastapi import Body, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster import admin_models as m
from cluster.admin_views import cluster_summary, drain_model, kv_model, metrics_text, worker_statuses
from cluster.dashboard_page import DASHBOARD_PATH, dashboard_response, is_public
from cluster.endpoint_traffic import EndpointTraffic, TrafficView
from cluster.etcd_client import EtcdUnavailableError
from cluster.manager import InvalidScaleError, UnknownWorkerError, WorkerStateConflict
from workers.protocol import Role

log = logging.getLogger(__name__)

_ERRORS = {code: {"model": m.ErrorResponse} for code in (400, 401, 404, 409, 503)}
# for a route whose own media type is not JSON (FastAPI would document its errors as that type)
_JSON_ERRORS = {code: {"description": "Error", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}} for code in (401, 503)}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def error_response(status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "code": code, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


class BearerTokenAuth:
    """ASGI middleware: every HTTP request needs the bearer token, before any routing."""

    def __init__(self, app, token: str):
        if not token:
            raise ValueError("the management API needs a non-empty token")
        self.app = app
        self._expected = f"Bearer {token}".encode()

    @staticmethod
    def presented(scope) -> bytes:
        """The credentials a request presents. (The live dashboard, a page a browser navigates
        to, will need a second way in here, e.g. an HttpOnly session cookie; same token.)"""
        return dict(scope["headers"]).get(b"authorization", b"")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not is_public(scope):
            given = self.presented(scope)
            if not hmac.compare_digest(given, self._expected):
                message = ("missing bearer token: send 'Authorization: Bearer <token>' (server.admin_token / "
                           "PDSERVE_ADMIN_TOKEN)" if not given else "invalid bearer token")
                response = error_response(401, message, "authentication_error", "invalid_token",
                                          headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(manager, token: str) -> FastAPI:
    app = FastAPI(title="pdserve management API", version="0.1.0", docs_url=None, redoc_url=None,
                  openapi_url=None, description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    # Declares the scheme in the spec (schemathesis and clients read it); the check itself is
    # BearerTokenAuth, which also covers /openapi.json and unknown paths.
    bearer = HTTPBearer(auto_error=False, description="server.admin_token")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.message, e.type, e.code, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        where = ["body" if err.get("type") == "json_invalid" else
                 ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query")) or "body"
                 for err in errors]
        message = "; ".join(f"{w}: {err.get('msg')}" for w, err in zip(where, errors)) or "invalid request"
        return error_response(400, message, "invalid_request_error", "invalid_value", where[0] if where else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind, code,
                              headers=getattr(e, "headers", None))

    @app.exception_handler(UnknownWorkerError)
    async def _unknown_worker(request: Request, e: UnknownWorkerError):
        return error_response(404, str(e), "not_found_error", "worker_not_found", "worker_id")

    @app.exception_handler(WorkerStateConflict)
    async def _conflict(request: Request, e: WorkerStateConflict):
        return error_response(409, str(e), "conflict_error", "worker_state")

    @app.exception_handler(InvalidScaleError)
    async def _bad_scale(request: Request, e: InvalidScaleError):
        return error_response(400, str(e), "invalid_request_error", "replicas_out_of_range", "replicas")

    @app.exception_handler(EtcdUnavailableError)
    async def _etcd_down(request: Request, e: EtcdUnavailableError):
        return error_response(503, f"etcd is unavailable: {e}", "service_unavailable", "etcd_unavailable")

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("management API: %s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}", "server_error", "internal_error")

    deps = {"dependencies": [Depends(bearer)], "responses": _ERRORS}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_spec() -> JSONResponse:
        return JSONResponse(app.openapi())

    # -- cluster and workers -------------------------------------------------------------------
    @app.get("/cluster", response_model=m.ClusterSummary, **deps)
    async def get_cluster():
        return await cluster_summary(manager)

    @app.get("/cluster/workers", response_model=m.WorkerList, **deps)
    async def list_workers():
        return m.WorkerList(workers=await worker_statuses(manager, list(manager.workers.values())))

    @app.get("/cluster/workers/{worker_id}", response_model=m.WorkerStatus, **deps)
    async def get_worker(worker_id: str):
        return (await worker_statuses(manager, [manager.get_worker(worker_id)]))[0]

    @app.delete("/cluster/workers/{worker_id}", response_model=m.RemovedWorker, **deps)
    async def remove_worker(worker_id: str):
        w = await manager.remove(worker_id)
        return m.RemovedWorker(worker_id=w.worker_id, role=w.role.value)

    @app.post("/cluster/workers/{worker_id}/drain", response_model=m.DrainStatusModel, status_code=202, **deps)
    async def drain_worker(worker_id: str, response: Response, body: m.DrainRequest | None = Body(None)):
        status = manager.begin_drain(worker_id, body.timeout_s if body else None)
        model = drain_model(status)
        response.headers["Location"] = model.status_url
        return model

    @app.get("/cluster/drains", response_model=m.DrainList, **deps)
    async def list_drains():
        return m.DrainList(drains=[drain_model(d) for d in manager.drains.values()])

    @app.get("/cluster/drains/{worker_id}", response_model=m.DrainStatusModel, **deps)
    async def get_drain(worker_id: str):
        status = manager.drains.get(worker_id)
        if status is None:
            raise ApiError(404, f"no drain of worker {worker_id!r} on record", "not_found_error", "drain_not_found",
                           "worker_id")
        return drain_model(status)

    @app.post("/cluster/pools/{role}/scale", response_model=m.ScaleResponse, status_code=202, **deps)
    async def scale_pool(role: str, body: m.ScaleRequest):
        if role not in {r.value for r in Role}:
            raise ApiError(404, f"no pool {role!r}: pools are {[r.value for r in Role]}", "not_found_error",
                           "pool_not_found", "role")
        return m.ScaleResponse(**await manager.scale(Role(role), body.replicas))

    # -- KV quota ------------------------------------------------------------------------------
    @app.get("/cluster/kv-quota", response_model=m.KVQuotaList, **deps)
    async def list_kv_quota():
        statuses = await worker_statuses(manager, list(manager.workers.values()), with_leases=False)
        entries = [m.KVQuotaEntry(worker_id=s.worker_id, role=s.role, state=s.state, kv=s.kv,
                                  node_ip=s.process.node_ip if s.process else None, probe_error=s.probe_error)
                   for s in statuses]
        resizer = manager.kv_resizer.status() if manager.kv_resizer else {"enabled": False}
        return m.KVQuotaList(workers=entries, resizer=resizer)

    @app.put("/cluster/kv-quota/{worker_id}", response_model=m.KVQuotaResult, **deps)
    async def set_kv_quota(worker_id: str, body: m.KVQuotaRequest):
        result = await manager.set_kv_quota(worker_id, body.num_blocks)
        return kv_model(worker_id, body.num_blocks, result)

    @app.delete("/cluster/kv-quota/{worker_id}", response_model=m.KVQuotaCleared, **deps)
    async def clear_kv_quota(worker_id: str):
        return m.KVQuotaCleared(worker_id=worker_id, had_override=await manager.clear_kv_quota(worker_id))

    # -- the endpoint's traffic, and the live dashboard -----------------------------------------
    traffic = EndpointTraffic(lambda: manager.endpoint_url)

    @app.get("/cluster/traffic", response_model=TrafficView, **deps)
    async def get_traffic():
        return await traffic.view()

    @app.get(DASHBOARD_PATH, include_in_schema=False)
    async def dashboard():
        return dashboard_response()

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(bearer)], responses=_JSON_ERRORS)
    async def metrics():
        return PlainTextResponse(await metrics_text(manager), media_type="text/plain; version=0.0.4")

    app.add_middleware(BearerTokenAuth, token=token)
    return app
