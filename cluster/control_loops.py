"""The manager's control loops, started with it, each wired to the manager through plain callables
(the loops know nothing of the manager; their policies are pure, cluster/*_policy.py):

    pool keeper   server.replace_dead_workers   pings workers; a dead one -> manager.on_worker_death
    autoscaler    autoscaling.enabled           worker loads + every endpoint replica's latencies
                                                -> manager.scale
    KV resizer    kv_quota.enabled              worker probes + overrides -> manager.resize_worker_kv
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workers.protocol import Role

if TYPE_CHECKING:
    from cluster.autoscaler import Autoscaler
    from cluster.kv_resizer import KVResizer
    from cluster.manager import ClusterManagerImpl
    from cluster.pool_keeper import PoolKeeper


def start_control_loops(manager: "ClusterManagerImpl") -> tuple["PoolKeeper | None", "Autoscaler | None",
                                                                 "KVResizer | None"]:
    """Start the loops the config turns on; None for those it leaves off. Call on the manager's
    event loop."""
    c = manager.config
    pool_keeper = autoscaler = kv_resizer = None
    if c.server.replace_dead_workers:
        from cluster.pool_keeper import PoolKeeper

        pool_keeper = PoolKeeper(c.server.health_check_interval_s, lambda: list(manager.workers.values()),
                                 manager.on_worker_death)
        pool_keeper.start()
    if c.autoscaling.enabled:
        from cluster.autoscaler import Autoscaler, LatencyScraper
        from cluster.ingress_replicas import IngressReplicas

        async def loads():
            return [p.load for _, p in await manager.probe_all() if p.ok]

        autoscaler = Autoscaler(
            c.autoscaling, {r: getattr(c.pools, r.value) for r in Role}, loads,
            LatencyScraper(IngressReplicas(lambda: manager.endpoint_url)),
            current=lambda: {r: len(manager.pool_workers(r)) for r in Role}, apply=manager.scale)
        autoscaler.start()
    if c.kv_quota.enabled:
        from cluster.kv_resizer import KVResizer, QuotaWorker

        async def quota_workers():
            return [QuotaWorker(w.worker_id, w.role, p, w.state == "draining") for w, p in await manager.probe_all()]

        kv_resizer = KVResizer(c.kv_quota, c.engine.blocks_per_segment, quota_workers, manager.kv_overrides,
                               manager.resize_worker_kv, lock=manager.kv_quota_lock)
        kv_resizer.start()
    return pool_keeper, autoscaler, kv_resizer
