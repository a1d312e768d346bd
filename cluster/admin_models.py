"""The management API's request and response bodies (pydantic; the OpenAPI spec is made from them).

Errors are OpenAI-shaped: ``{"error": {"message", "type", "code", "param"}}``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RoleName = Literal["prefill", "decode"]
WorkerStateName = Literal["starting", "ready", "draining", "stopping", "failed"]
DrainStateName = Literal["draining", "drained", "timed_out", "failed", "removed"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    message: str
    type: str  # authentication_error | invalid_request_error | not_found_error | conflict_error | ...
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# -- cluster ------------------------------------------------------------------------------------
class PoolStatus(BaseModel):
    role: RoleName
    desired: int = Field(description="Replicas asked for (config, scale, autoscaler), minus drained/removed ones")
    min_replicas: int
    max_replicas: int
    starting: int
    ready: int
    draining: int
    failed: int
    registered: int = Field(description="Workers of this pool registered in etcd (what the router routes to)")


class ClusterTotals(BaseModel):
    num_workers: int
    kv_total_blocks: int
    kv_used_blocks: int
    kv_bytes: int
    num_running: int
    num_waiting: int
    num_inflight: int = Field(description="Requests in flight on the workers (decode: streams, prefill: prefills)")


class ClusterSummary(BaseModel):
    cluster_name: str
    model: str | None
    ready: bool = Field(description="Enough workers registered for the endpoint to serve")
    ready_reason: str
    etcd_connected: bool
    pools: list[PoolStatus]
    totals: ClusterTotals
    autoscaling: dict = Field(description="Autoscaler status ({enabled: false} when off)")
    kv_quota: dict = Field(description="KV resizer status ({enabled: false} when off)")


# -- workers ------------------------------------------------------------------------------------
class LeaseStatus(BaseModel):
    lease_id: int
    granted_ttl_s: int
    remaining_ttl_s: int
    registered_for_s: float | None = Field(None, description="Since this manager saw the worker register")


class WorkerLoadStatus(BaseModel):
    num_running: int
    num_waiting: int
    num_inflight: int
    is_draining: bool
    num_pending_prefill_tokens: int = Field(0, description="Prompt tokens admitted but not yet prefilled: the "
                                                           "worker's prefill backlog (what the ttft rule weighs)")
    engine_stalled_s: float = Field(0.0, description="Seconds since its engine last made progress (a step, a batch "
                                                     "of commands or an idle wake-up): ms when healthy, one step's "
                                                     "length when slow; past router.engine_stall_timeout_s the "
                                                     "router stops routing to it")
    engine_has_work: bool = Field(False, description="Requests running, waiting or in flight in its engine")


class WorkerKV(BaseModel):
    num_blocks: int = Field(description="Blocks allocated now (retiring segments included until returned)")
    target_blocks: int = Field(description="The quota the worker is at or shrinking to")
    used_blocks: int
    free_blocks: int
    cached_free_blocks: int
    pinned_blocks: int
    kv_bytes: int
    block_bytes: int | None = Field(description="Bytes per block over all layers, K and V")
    override_blocks: int | None = Field(description="Manual quota (sticky, in etcd); None: the resizer's")
    planned_blocks: int | None = Field(description="The resizer's last target for it (None: not planned)")


class WorkerProcess(BaseModel):
    pid: int
    rss_bytes: int
    node_id: str
    node_ip: str
    node_memory_percent: float
    device: str
    engine: dict[str, Any] | None = Field(None, description="The engine settings it runs with, as it reports them "
                                                              "(engine.* with its pool's pools.<role>.engine over them)")


class WorkerStatus(BaseModel):
    worker_id: str
    role: RoleName
    state: WorkerStateName
    error: str | None = None
    model: str | None = None
    created_at: float
    ready_at: float | None = None
    registered: bool = Field(description="Its key is in etcd (the router routes to it)")
    lease: LeaseStatus | None = None
    load: WorkerLoadStatus | None = None
    kv: WorkerKV | None = None
    process: WorkerProcess | None = None
    counters: dict[str, float] | None = None
    probe_error: str | None = Field(None, description="Why load/kv/process are missing (worker did not answer)")
    etcd_error: str | None = Field(None, description="Why lease/override are missing (etcd did not answer)")


class WorkerList(BaseModel):
    workers: list[WorkerStatus]


class RemovedWorker(BaseModel):
    worker_id: str
    role: RoleName
    state: Literal["removed"] = "removed"


# -- scale --------------------------------------------------------------------------------------
class ScaleRequest(_Body):
    replicas: int = Field(ge=0, description="Workers the pool should have, within [min_replicas, max_replicas]")


class ScaleResponse(BaseModel):
    role: RoleName
    replicas: int
    started: list[str] = Field(description="Workers being started (they take traffic once registered)")
    stopping: list[str] = Field(description="Workers being drained (newest first)")


# -- drain --------------------------------------------------------------------------------------
class DrainRequest(_Body):
    timeout_s: float | None = Field(None, gt=0, le=86400,
                                    description="How long in-flight requests may take (default server.drain_timeout_s)")


class DrainStatusModel(BaseModel):
    worker_id: str
    role: RoleName
    state: DrainStateName
    timeout_s: float
    started_at: float
    finished_at: float | None = None
    error: str | None = None
    status_url: str


class DrainList(BaseModel):
    drains: list[DrainStatusModel]


# -- KV quota -----------------------------------------------------------------------------------
class KVQuotaEntry(BaseModel):
    worker_id: str
    role: RoleName
    state: WorkerStateName
    node_ip: str | None = None
    kv: WorkerKV | None = None
    probe_error: str | None = None


class KVQuotaList(BaseModel):
    workers: list[KVQuotaEntry]
    resizer: dict = Field(description="KV resizer status per node ({enabled: false} when off)")


class KVQuotaRequest(_Body):
    num_blocks: int = Field(ge=1, description="The worker's KV quota in blocks (rounded up to whole segments)")


class KVQuotaResult(BaseModel):
    worker_id: str
    override_blocks: int
    target_blocks: int = Field(description="The quota asked for, rounded up to whole segments")
    num_blocks: int = Field(description="Blocks allocated right now")
    num_usable_blocks: int
    num_pending_blocks: int = Field(description="Blocks of shrinking segments still in use; returned when freed")
    done: bool


class KVQuotaCleared(BaseModel):
    worker_id: str
    had_override: bool
