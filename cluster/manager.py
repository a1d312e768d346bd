"""ClusterManager: the detached Ray actor that owns the worker pools (start, scale, drain,
remove) and serves the management API. One per cluster, named ``pdserve-manager`` in the
cluster's Ray namespace.

Workers are Ray actors named by their worker id; they register themselves in etcd once their
model is loaded, and the router routes to what etcd lists. The manager's own record of the
pools says which actors it started and in what state they are.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

import ray

from cluster.config import PdserveConfig
from router.cluster_view import ray_namespace
from workers.protocol import Role

log = logging.getLogger(__name__)

MANAGER_NAME = "pdserve-manager"


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

    async def start(self) -> None:
        """Start the initial pools (in the background) and the management API. Idempotent."""
        if self._started:
            return
        self._started = True
        for role in Role:
            for _ in range(self._pool(role).replicas):
                self._spawn(role)

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
        spec = WorkerSpec(worker_id=worker_id, role=role, cluster_name=c.cluster_name, model=c.model, engine=c.engine,
                          transfer=c.transfer, etcd=c.etcd,
                          local_prefill_threshold_tokens=c.router.local_prefill_threshold_tokens)
        pool = self._pool(role)
        cls = PrefillWorker if role == Role.PREFILL else DecodeWorker
        actor = cls.options(name=worker_id, namespace=self.namespace, num_cpus=pool.num_cpus, num_gpus=pool.num_gpus,
                            resources=dict(pool.resources) or None, max_concurrency=1000).remote(spec)
        w = ManagedWorker(worker_id, role, actor)
        self.workers[worker_id] = w
        self._background(self._await_start(w))
        return w

    async def _await_start(self, w: ManagedWorker) -> None:
        try:
            await w.actor.start.remote()
            if w.state == "starting":
                w.state, w.ready_at = "ready", time.time()
                log.info("worker %s is ready", w.worker_id)
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
        if not pool.min_replicas <= replicas <= pool.max_replicas:
            raise ValueError(f"replicas for {role.value} must be in [{pool.min_replicas}, {pool.max_replicas}], "
                             f"got {replicas}")
        current = self.pool_workers(role)
        started, stopping = [], []
        for _ in range(replicas - len(current)):
            started.append(self._spawn(role).worker_id)
        for w in sorted(current, key=lambda w: w.created_at, reverse=True)[: max(0, len(current) - replicas)]:
            stopping.append(w.worker_id)
            self._background(self.drain(w.worker_id, self.config.server.drain_timeout_s))
        return {"role": role.value, "replicas": replicas, "started": started, "stopping": stopping}

    async def drain(self, worker_id: str, timeout_s: float) -> bool:
        """Stop routing to it, let in-flight requests finish (bounded), deregister, exit."""
        w = self._get(worker_id)
        w.state = "draining"
        try:
            finished = await w.actor.drain.remote(timeout_s)
        except Exception as e:
            log.warning("drain of %s failed: %r", worker_id, e)
            finished = False
        await self._stop(w)
        return finished

    async def remove(self, worker_id: str) -> None:
        """Immediate removal: its in-flight requests fail over (migrate) in the router."""
        await self._stop(self._get(worker_id), graceful=False)

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
            raise KeyError(f"no worker {worker_id!r} in cluster {self.config.cluster_name!r}") from None

    async def list_workers(self) -> list[dict]:
        return [{"worker_id": w.worker_id, "role": w.role.value, "state": w.state, "error": w.error,
                 "created_at": w.created_at, "ready_at": w.ready_at} for w in self.workers.values()]

    async def actor_of(self, worker_id: str):
        return self._get(worker_id).actor

    async def shutdown(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
        await asyncio.gather(*(self._stop(w) for w in list(self.workers.values())), return_exceptions=True)

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


ClusterManager = ray.remote(ClusterManagerImpl)


def ensure_manager(config: PdserveConfig):
    """Get or create the cluster's manager actor and start it (idempotent)."""
    manager = ClusterManager.options(name=MANAGER_NAME, namespace=ray_namespace(config.cluster_name),
                                     lifetime="detached", get_if_exists=True, num_cpus=0,
                                     max_concurrency=1000).remote(config)
    ray.get(manager.start.remote())
    return manager
