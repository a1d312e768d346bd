"""ClusterManager: the detached Ray actor that owns the worker pools (start, scale, drain,
remove) and serves the management API. One per cluster, named ``pdserve-manager`` in the
cluster's Ray namespace.

Workers are Ray actors named by their worker id; they register themselves in etcd once their
model is loaded, and the router routes to what etcd lists. The manager's own record of the
pools says which actors it started and in what state they are.

Everything runs on the actor's event loop: the management API (cluster/admin_server.py), the
pool keeper, autoscaler and KV resizer loops when enabled (cluster/control_loops.py), and a
membership watch of etcd (for the API's "registered" and lease views). Worker state a caller sees
is probed fresh from the workers (cluster/worker_probe.py). Drains are operations with a status
(``drains``); drain flags and KV quota overrides live in etcd (cluster/worker_records.py) so they
outlive the manager, and overrides win over the resizer's plan.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from dataclasses import dataclass, field

import ray

from cluster.config import PdserveConfig
from router.cluster_view import ray_namespace
from workers.gpu_visibility import NOSET_ENV as NOSET_CUDA_ENV
from workers.protocol import Role

log = logging.getLogger(__name__)

MANAGER_NAME = "pdserve-manager"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives the head node this resource (Serve pins its controller by it)
MAX_DRAIN_RECORDS = 100  # finished drains kept for GET /cluster/drains


class UnknownWorkerError(KeyError):
    """No worker with this id in the cluster (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown worker"


class InvalidScaleError(ValueError):
    """A replica count outside the pool's [min_replicas, max_replicas] (HTTP 400)."""


class WorkerStateConflict(RuntimeError):
    """The operation does not fit the worker's state, e.g. draining it twice (HTTP 409)."""


@dataclass
class DrainStatus:
    """One drain operation. state: draining -> drained (everything finished in time) |
    timed_out (stopped with requests still in flight) | failed | removed (DELETE during the drain)."""

    worker_id: str
    role: Role
    timeout_s: float
    started_at: float = field(default_factory=time.time)
    state: str = "draining"
    finished_at: float | None = None
    error: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


@dataclass
class ManagedWorker:
    worker_id: str
    role: Role
    actor: object
    state: str = "starting"  # starting | ready | draining | stopping | failed
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    ready_at: float | None = None


class ClusterManagerImpl:
    def __init__(self, config: PdserveConfig):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = config
        self.namespace = ray_namespace(config.cluster_name)
        self.workers: dict[str, ManagedWorker] = {}
        self._ids = {role: itertools.count() for role in Role}
        self._started = False
        self._tasks: set[asyncio.Task] = set()
        self.admin = None
        self.desired = {role: self._pool(role).replicas for role in Role}
        self.drains: collections.OrderedDict[str, DrainStatus] = collections.OrderedDict()
        self.membership = None  # MembershipWatcher
        self.records = None  # WorkerRecords: drain flags, KV overrides, registrations in etcd
        self.registered_at: dict[str, float] = {}  # worker id -> when this manager saw it register
        self.autoscaler = None
        self.kv_resizer = None
        self.kv_quota_lock = asyncio.Lock()  # a manual quota change vs a KV resizer round (KVResizer.lock)
        self.pool_keeper = None
        # the OpenAI endpoint (the autoscaler's latencies, the traffic view); set_endpoint_url
        # overrides it when the app is served under another route prefix
        self.endpoint_url = f"http://{config.server.host}:{config.server.port}"

    async def start(self) -> None:
        """Start the initial pools (in the background), the management API and the control loops.
        Idempotent. Raises when the management API cannot start (no token, port taken)."""
        if self._started:
            return
        self._started = True
        from cluster.admin_server import start_admin_server
        from cluster.control_loops import start_control_loops
        from cluster.membership import MembershipWatcher
        from cluster.worker_records import WorkerRecords

        c = self.config
        self.records = WorkerRecords(c.etcd, c.cluster_name)
        self.membership = MembershipWatcher(c.etcd, c.cluster_name)
        self.membership.add_listener(self._on_membership)
        await self.membership.start()
        try:
            self.admin = await start_admin_server(self)
        except BaseException:
            self._started = False  # a later start() may try again (e.g. once the port is free)
            await self.membership.stop()
            raise
        for role in Role:
            for _ in range(self._pool(role).replicas):
                self._spawn(role)
        self.pool_keeper, self.autoscaler, self.kv_resizer = start_control_loops(self)

    def _pool(self, role: Role):
        return getattr(self.config.pools, role.value)

    # -- pools ---------------------------------------------------------------------------------
    def _spawn(self, role: Role) -> ManagedWorker:
        from workers.decode_worker import DecodeWorker
        from workers.prefill_worker import PrefillWorker
        from workers.worker_base import WorkerSpec

        while True:
            worker_id = f"{role.value}-{next(self._ids[role])}"
            if worker_id not in self.workers:
                break
        c = self.config
        spec = WorkerSpec(worker_id=worker_id, role=role, cluster_name=c.cluster_name, model=c.model,
                          engine=c.engine_for(role.value),
                          transfer=c.transfer, etcd=c.etcd,
                          local_prefill_threshold_tokens=c.router.local_prefill_threshold_tokens)
        pool = self._pool(role)
        cls = PrefillWorker if role == Role.PREFILL else DecodeWorker
        # CPU workers: a fixed malloc mmap threshold, so a KV segment freed by a quota shrink goes
        # back to the OS every time (glibc's dynamic threshold otherwise moves segments onto the
        # heap after the first free; benchmarks/kv_quota_memory.py measures both)
        env = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)} if pool.num_gpus == 0 else {}
        if pool.num_gpus > 0 and c.transfer.backend == "nixl" and c.transfer.cuda_ipc != "off":
            # every GPU of the node visible, the assigned one first (workers/gpu_visibility.py):
            # CUDA IPC READs then reach a peer on another GPU instead of going through NIXL
            env[NOSET_CUDA_ENV] = "1"
        actor = cls.options(name=worker_id, namespace=self.namespace, num_cpus=pool.num_cpus, num_gpus=pool.num_gpus,
                            resources=dict(pool.resources) or None, max_concurrency=1000,
                            runtime_env={"env_vars": env} if env else None).remote(spec)
        w = ManagedWorker(worker_id, role, actor)
        self.workers[worker_id] = w
        self._background(self._await_start(w))
        return w

    async def _await_start(self, w: ManagedWorker) -> None:
        try:
            await asyncio.wait_for(w.actor.start.remote(), self.config.server.worker_start_timeout_s)
            if w.state == "starting":
                w.state, w.ready_at = "ready", time.time()
                log.info("worker %s is ready", w.worker_id)
                await self.records.apply_kv_override(w.worker_id, w.actor)
        except Exception as e:
            w.state, w.error = "failed", f"{type(e).__name__}: {e}"
            log.error("worker %s failed to start: %s", w.worker_id, w.error)

    def pool_workers(self, role: Role) -> list[ManagedWorker]:
        return [w for w in self.workers.values() if w.role == role and w.state in ("starting", "ready")]

    async def scale(self, role: Role | str, replicas: int) -> dict:
        """Start or stop workers until the pool has ``replicas`` (starting + ready) workers.
        Stopping drains the newest workers first."""
        role = Role(role)
        pool = self._pool(role)
        if isinstance(replicas, bool) or not isinstance(replicas, int):
            raise InvalidScaleError(f"replicas must be an integer, got {replicas!r}")
        if not pool.min_replicas <= replicas <= pool.max_replicas:
            raise InvalidScaleError(f"replicas for {role.value} must be in [{pool.min_replicas}, {pool.max_replicas}] "
                                    f"(pools.{role.value}.min_replicas/max_replicas), got {replicas}")
        current = self.pool_workers(role)
        started, stopping = [], []
        for _ in range(replicas - len(current)):
            started.append(self._spawn(role).worker_id)
        for w in sorted(current, key=lambda w: w.created_at, reverse=True)[: max(0, len(current) - replicas)]:
            stopping.append(w.worker_id)
            self.begin_drain(w.worker_id, self.config.server.drain_timeout_s)
        self.desired[role] = replicas
        return {"role": role.value, "replicas": replicas, "started": started, "stopping": stopping}

    def begin_drain(self, worker_id: str, timeout_s: float | None = None) -> DrainStatus:
        """Start draining (returns at once; the status says when it is done): the worker refuses
        new work (its is_draining shows in the router's next poll, and the router skips it),
        in-flight requests finish (up to timeout_s), then it deregisters and exits."""
        w = self._get(worker_id)
        if w.state in ("draining", "stopping"):
            raise WorkerStateConflict(f"worker {worker_id} is already {w.state}")
        timeout_s = self.config.server.drain_timeout_s if timeout_s is None else timeout_s
        if w.state in ("starting", "ready"):
            self.desired[w.role] = max(0, self.desired[w.role] - 1)
        w.state = "draining"
        status = DrainStatus(worker_id, w.role, timeout_s)
        self.drains[worker_id] = status
        finished = [k for k, d in self.drains.items() if d.finished_at is not None]
        for k in finished[: max(0, len(self.drains) - MAX_DRAIN_RECORDS)]:
            del self.drains[k]
        self._background(self._run_drain(w, status))
        return status

    async def _run_drain(self, w: ManagedWorker, status: DrainStatus) -> None:
        # the status leaves "draining" only once the worker is really gone
        outcome, error = "failed", None
        try:
            await self.records.set_drain_flag(w.worker_id)
            finished = await w.actor.drain.remote(status.timeout_s)
            outcome = "drained" if finished else "timed_out"
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            log.warning("drain of %s failed: %r", w.worker_id, e)
        finally:
            if self.workers.get(w.worker_id) is w:
                await self._stop(w)
            await self.records.forget(w.worker_id)
            if status.state == "draining":
                status.state, status.error = outcome, error
            status.finished_at = status.finished_at or time.time()
            status.done.set()
            log.info("drain of %s: %s", w.worker_id, status.state)

    async def drain(self, worker_id: str, timeout_s: float) -> bool:
        """Drain and wait until the worker is gone. True if its requests all finished in time."""
        status = self.begin_drain(worker_id, timeout_s)
        await status.done.wait()
        return status.state == "drained"

    async def remove(self, worker_id: str) -> ManagedWorker:
        """Immediate removal: its in-flight requests fail over (migrate) in the router."""
        w = self._get(worker_id)
        if w.state in ("starting", "ready"):
            self.desired[w.role] = max(0, self.desired[w.role] - 1)
        drain = self.drains.get(worker_id)
        if drain is not None and drain.state == "draining":
            drain.state, drain.finished_at = "removed", time.time()
        await self._stop(w, graceful=False)
        await self.records.delete_registration(w.role, w.worker_id)
        await self.records.forget(worker_id)
        return w

    async def _stop(self, w: ManagedWorker, graceful: bool = True) -> None:
        w.state = "stopping"
        if graceful:
            try:
                await asyncio.wait_for(w.actor.shutdown.remote(), 10)
            except Exception:
                pass
        ray.kill(w.actor, no_restart=True)
        self.workers.pop(w.worker_id, None)

    def _get(self, worker_id: str) -> ManagedWorker:
        try:
            return self.workers[worker_id]
        except KeyError:
            raise UnknownWorkerError(f"no worker {worker_id!r} in cluster {self.config.cluster_name!r}") from None

    async def list_workers(self) -> list[dict]:
        return [{"worker_id": w.worker_id, "role": w.role.value, "state": w.state, "error": w.error,
                 "created_at": w.created_at, "ready_at": w.ready_at} for w in self.workers.values()]

    async def actor_of(self, worker_id: str):
        return self._get(worker_id).actor

    async def shutdown(self) -> None:
        for loop in (self.pool_keeper, self.autoscaler, self.kv_resizer):
            if loop is not None:
                await loop.stop()
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        await asyncio.gather(*(self._stop(w) for w in list(self.workers.values())), return_exceptions=True)
        if self.membership is not None:
            await self.membership.stop()
        if self.records is not None:
            await self.records.close()

    # -- what the management API and the control loops use ------------------------------------
    def get_worker(self, worker_id: str) -> ManagedWorker:
        return self._get(worker_id)

    async def set_endpoint_url(self, url: str) -> None:
        """Where the OpenAI endpoint answers (e.g. with a route prefix): the autoscaler and the
        traffic view find its Serve app there and read every replica (cluster/ingress_replicas.py)."""
        self.endpoint_url = url.rstrip("/")

    async def probe(self, w: ManagedWorker):
        from cluster.worker_probe import WorkerProbe, probe_worker

        if w.state not in ("ready", "draining"):
            return WorkerProbe(w.worker_id, time.time(), error=f"worker is {w.state}")
        return await probe_worker(w.worker_id, w.actor)

    async def probe_all(self, states: tuple[str, ...] = ("ready", "draining")) -> list[tuple[ManagedWorker, object]]:
        ws = [w for w in self.workers.values() if w.state in states]
        probes = await asyncio.gather(*(self.probe(w) for w in ws))
        return list(zip(ws, probes))

    async def leases(self, ws: list[ManagedWorker]) -> dict[str, dict]:
        """Registration leases in etcd by worker id (raises EtcdUnavailableError)."""
        return await self.records.leases([(w.role, w.worker_id) for w in ws])

    async def kv_overrides(self) -> dict[str, int]:
        return await self.records.kv_overrides()

    async def set_kv_quota(self, worker_id: str, num_blocks: int):
        """Manual KV quota: recorded in etcd first (so it sticks: the resizer leaves the worker
        alone and a restarted worker gets it back), then applied. Returns the ResizeResult."""
        w = self._get(worker_id)
        if w.state not in ("ready", "draining"):
            raise WorkerStateConflict(f"worker {worker_id} is {w.state}; its KV quota can be set once it is ready")
        async with self.kv_quota_lock:  # not in the middle of a resizer round that read the overrides before
            await self.records.set_kv_override(worker_id, num_blocks)
            return await w.actor.resize.remote(num_blocks)

    async def clear_kv_quota(self, worker_id: str) -> bool:
        """Hand the worker's quota back to the resizer. True if there was an override."""
        self._get(worker_id)
        async with self.kv_quota_lock:
            return await self.records.clear_kv_override(worker_id)

    async def resize_worker_kv(self, worker_id: str, num_blocks: int):
        """The KV resizer's resize (a worker's ResizeResult)."""
        return await self._get(worker_id).actor.resize.remote(num_blocks)

    async def on_worker_death(self, death) -> None:
        """Forget a worker whose actor died; start another in its place unless it was draining
        (on its way out) or the pool already has its desired size (the pool was scaled down)."""
        w = self.workers.get(death.worker_id)
        if w is None or w.state not in ("ready", "draining"):  # being stopped or removed on purpose
            return
        was_draining = w.state == "draining"  # its drain task sees the death and records it
        self.workers.pop(death.worker_id)
        w.state, w.error = "failed", death.error
        try:
            await self.records.delete_registration(w.role, w.worker_id)
        except Exception as e:  # etcd away: its lease expires on its own (no keepalive from a dead actor)
            log.warning("could not delete the registration of dead worker %s: %r", w.worker_id, e)
        await self.records.forget(death.worker_id)
        if not was_draining and len(self.pool_workers(death.role)) < self.desired[death.role]:
            new = self._spawn(death.role)
            log.warning("worker %s died; started %s in its place", death.worker_id, new.worker_id)

    def _on_membership(self, change) -> None:
        worker_id = change.name.split("/", 1)[-1]
        if change.kind == "put":
            self.registered_at.setdefault(worker_id, time.time())
        else:
            self.registered_at.pop(worker_id, None)

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


ClusterManager = ray.remote(ClusterManagerImpl)


def ensure_manager(config: PdserveConfig):
    """Get or create the cluster's manager actor and start it (idempotent). It runs on the Ray head
    node, where the deployments expose the management API port (deploy/: `pdserve up` host,
    KubeRay head pod) and server.host can be bound."""
    manager = ClusterManager.options(name=MANAGER_NAME, namespace=ray_namespace(config.cluster_name),
                                     lifetime="detached", get_if_exists=True, num_cpus=0,
                                     resources={HEAD_NODE_RESOURCE: 0.001}, max_concurrency=1000).remote(config)
    ray.get(manager.start.remote())
    return manager
