"""What the management API shows, built from the manager's records, fresh worker probes and etcd:
the response models of GET /cluster, /cluster/workers, /cluster/kv-quota, and the Prometheus text
of GET /metrics. etcd being unreachable never fails a view: its parts are left empty and
``etcd_error`` (or ``etcd_connected: false``) says why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from cluster import admin_models as m
from cluster.etcd_client import EtcdUnavailableError
from workers.protocol import Role


async def worker_statuses(manager, ws: list, with_leases: bool = True) -> list[m.WorkerStatus]:
    probes = await asyncio.gather(*(manager.probe(w) for w in ws))
    etcd_error, leases, overrides = None, {}, {}
    try:
        overrides = await manager.kv_overrides()
        if with_leases:
            leases = await manager.leases(ws)
    except EtcdUnavailableError as e:
        etcd_error = str(e)
    members = {i.worker_id: i for i in manager.membership.members()}
    now = time.time()
    out = []
    for w, p in zip(ws, probes):
        info = members.get(w.worker_id)
        lease = leases.get(w.worker_id)
        seen = manager.registered_at.get(w.worker_id)
        kv = load = process = None
        if p.answered:  # also with a stuck engine: the listing shows what it reported (probe_error says why)
            s = p.stats
            planned = manager.kv_resizer.planned_blocks(w.worker_id) if manager.kv_resizer else None
            kv = m.WorkerKV(num_blocks=s.num_total_blocks, target_blocks=s.num_target_blocks,
                            used_blocks=s.num_used_blocks, free_blocks=s.num_free_blocks,
                            cached_free_blocks=s.num_cached_free_blocks, pinned_blocks=s.num_pinned_blocks,
                            kv_bytes=s.kv_bytes, block_bytes=p.block_bytes,
                            override_blocks=overrides.get(w.worker_id), planned_blocks=planned)
            load = m.WorkerLoadStatus(num_running=s.num_running, num_waiting=s.num_waiting,
                                      num_inflight=p.num_inflight, is_draining=p.load.is_draining,
                                      num_pending_prefill_tokens=s.num_pending_prefill_tokens,
                                      engine_stalled_s=p.load.engine_stalled_s, engine_has_work=p.load.engine_has_work)
            pi = p.process
            process = m.WorkerProcess(pid=pi.pid, rss_bytes=pi.rss_bytes, node_id=pi.node_id, node_ip=pi.node_ip,
                                      node_memory_percent=pi.node_memory_percent, device=pi.device, engine=pi.engine)
        out.append(m.WorkerStatus(
            worker_id=w.worker_id, role=w.role.value, state=w.state, error=w.error,
            model=info.model if info else manager.config.model.served_model_name,
            created_at=w.created_at, ready_at=w.ready_at, registered=info is not None,
            lease=m.LeaseStatus(**lease, registered_for_s=now - seen if seen else None) if lease else None,
            load=load, kv=kv, process=process,
            counters={k: float(v) for k, v in dataclasses.asdict(p.counters).items()} if p.counters else None,
            probe_error=p.error if w.state in ("ready", "draining") else None, etcd_error=etcd_error,
        ))
    return out


async def cluster_summary(manager) -> m.ClusterSummary:
    pairs = await manager.probe_all()
    c = manager.config
    membership = manager.membership
    pools = []
    for role in Role:
        states = [w.state for w in manager.workers.values() if w.role == role]
        pool = getattr(c.pools, role.value)
        pools.append(m.PoolStatus(
            role=role.value, desired=manager.desired[role], min_replicas=pool.min_replicas,
            max_replicas=pool.max_replicas, starting=states.count("starting"), ready=states.count("ready"),
            draining=states.count("draining") + states.count("stopping"), failed=states.count("failed"),
            registered=len(membership.members(role))))
    ok = [p for _, p in pairs if p.ok]
    totals = m.ClusterTotals(
        num_workers=len(manager.workers), kv_total_blocks=sum(p.stats.num_total_blocks for p in ok),
        kv_used_blocks=sum(p.stats.num_used_blocks for p in ok), kv_bytes=sum(p.stats.kv_bytes for p in ok),
        num_running=sum(p.stats.num_running for p in ok), num_waiting=sum(p.stats.num_waiting for p in ok),
        num_inflight=sum(p.num_inflight for p in ok))
    ready, reason = membership.is_ready(c.router.min_prefill_workers, c.router.min_decode_workers)
    return m.ClusterSummary(
        cluster_name=c.cluster_name, model=c.model.served_model_name, ready=ready, ready_reason=reason,
        etcd_connected=membership.is_connected, pools=pools, totals=totals,
        autoscaling=manager.autoscaler.status() if manager.autoscaler else {"enabled": False},
        kv_quota=manager.kv_resizer.status() if manager.kv_resizer else {"enabled": False})


def drain_model(d) -> m.DrainStatusModel:
    return m.DrainStatusModel(worker_id=d.worker_id, role=d.role.value, state=d.state, timeout_s=d.timeout_s,
                              started_at=d.started_at, finished_at=d.finished_at, error=d.error,
                              status_url=f"/cluster/drains/{d.worker_id}")


def kv_model(worker_id: str, override_blocks: int, r) -> m.KVQuotaResult:
    return m.KVQuotaResult(worker_id=worker_id, override_blocks=override_blocks, target_blocks=r.target_blocks,
                           num_blocks=r.num_blocks, num_usable_blocks=r.num_usable_blocks,
                           num_pending_blocks=r.num_pending_blocks, done=r.done)


async def metrics_text(manager) -> str:
    """KV quota and use per worker, node budgets and memory, pool sizes (Prometheus text)."""
    labels = ["worker", "role", "node"]
    fams = {name: GaugeMetricFamily(f"pdserve_{name}", doc, labels=labels) for name, doc in (
        ("kv_quota_blocks", "KV quota (target) in blocks"), ("kv_allocated_blocks", "KV blocks allocated now"),
        ("kv_used_blocks", "KV blocks in use"), ("kv_bytes", "KV cache bytes allocated"),
        ("kv_override_blocks", "Manual KV quota override (absent: none)"),
        ("kv_planned_blocks", "The KV resizer's target"), ("worker_rss_bytes", "Worker process resident memory"))}
    node_budget = GaugeMetricFamily("pdserve_node_kv_budget_blocks", "KV budget of a node, in blocks", labels=["node"])
    node_mem = GaugeMetricFamily("pdserve_node_memory_percent", "Node memory in use (%)", labels=["node"])
    desired = GaugeMetricFamily("pdserve_pool_desired_replicas", "Replicas asked for", labels=["role"])
    workers = GaugeMetricFamily("pdserve_pool_workers", "Workers by state", labels=["role", "state"])
    try:
        overrides = await manager.kv_overrides()
    except EtcdUnavailableError:
        overrides = {}
    node_percent: dict[str, float] = {}
    for w, p in await manager.probe_all():
        if not p.ok:
            continue
        s, key = p.stats, [w.worker_id, w.role.value, p.process.node_ip]
        fams["kv_quota_blocks"].add_metric(key, s.num_target_blocks)
        fams["kv_allocated_blocks"].add_metric(key, s.num_total_blocks)
        fams["kv_used_blocks"].add_metric(key, s.num_used_blocks)
        fams["kv_bytes"].add_metric(key, s.kv_bytes)
        fams["worker_rss_bytes"].add_metric(key, p.process.rss_bytes)
        if w.worker_id in overrides:
            fams["kv_override_blocks"].add_metric(key, overrides[w.worker_id])
        planned = manager.kv_resizer.planned_blocks(w.worker_id) if manager.kv_resizer else None
        if planned is not None:
            fams["kv_planned_blocks"].add_metric(key, planned)
        node_percent[p.process.node_ip] = p.process.node_memory_percent
    for node_ip, percent in sorted(node_percent.items()):
        node_mem.add_metric([node_ip], percent)
    if manager.kv_resizer is not None:
        for plan in manager.kv_resizer.nodes.values():
            node_budget.add_metric([plan.node_ip], plan.budget_blocks)
    for role in Role:
        desired.add_metric([role.value], manager.desired[role])
        for state in ("starting", "ready", "draining", "stopping", "failed"):
            workers.add_metric([role.value, state], sum(1 for w in manager.workers.values()
                                                        if w.role == role and w.state == state))
    families = [*fams.values(), node_budget, node_mem, desired, workers]

    class _Once:
        def collect(self):
            return families

    registry = CollectorRegistry()
    registry.register(_Once())
    return generate_latest(registry).decode()
