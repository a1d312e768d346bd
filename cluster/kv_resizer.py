"""KVResizer: the loop that divides each node's KV budget among the workers on it.

Every kv_quota.interval_s, per node (workers grouped by the Ray node they run on):

    budget      kv_quota.node_kv_budget_bytes, else kv_quota.budget_fraction of the node's memory
                (device memory on CUDA, RAM on CPU), in blocks of this model's layout
    pressure    node memory use (psutil, read on that node) over kv_quota.memory_high_percent: the
                planned workers' allocation is capped at what brings the node back under it; the
                cap holds until use falls under kv_quota.memory_low_percent (hysteresis: no
                shrink-grow-shrink cycle)
    fixed       workers with a manual override (PUT /cluster/kv-quota/{id}) and draining workers
                are not planned; their allocation is taken off the budget first. Overrides are
                sticky: the loop re-applies one whenever the worker's quota differs (restart,
                another resize), until DELETE /cluster/kv-quota/{id} hands it back to the planner
    plan        cluster/quota_policy.plan_quotas over the rest (demand: queue, preemptions, use)
    apply       shrinks first; then grows only into the room the node really has once the shrinks
                are done (a shrink is best effort: blocks in use stay until their requests end)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from cluster.periodic import PeriodicLoop
from cluster.quota_policy import KVQuotaConfig, WorkerKVState, plan_quotas
from cluster.worker_probe import WorkerProbe
from workers.protocol import Role

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuotaWorker:
    """A ready worker as the resizer sees it (probe must be ok)."""

    worker_id: str
    role: Role
    probe: WorkerProbe
    is_draining: bool = False


@dataclass
class NodePlan:
    node_id: str
    node_ip: str
    budget_blocks: int  # the node's whole KV budget
    effective_budget_blocks: int  # after the memory-pressure cap
    fixed_blocks: int  # allocated by overridden and draining workers
    memory_percent: float
    pressure_cap_blocks: int | None  # None: no memory pressure
    targets: dict[str, int] = field(default_factory=dict)  # planned worker -> target blocks
    applied: dict[str, int] = field(default_factory=dict)  # worker -> blocks asked of resize() this round
    at: float = 0.0


# -- pure parts ---------------------------------------------------------------------------------
def node_budget_bytes(config: KVQuotaConfig, probe: WorkerProbe) -> int:
    if config.node_kv_budget_bytes is not None:
        return config.node_kv_budget_bytes
    p = probe.process
    total = p.device_memory_total_bytes if p.device == "cuda" and p.device_memory_total_bytes else p.node_memory_total_bytes
    return int(total * config.budget_fraction)


def pressure_cap(memory_percent: float, node_memory_total_bytes: int, block_bytes: int, allocated_blocks: int,
                 previous_cap: int | None, high_percent: float, low_percent: float) -> int | None:
    """Blocks the planned workers may hold under memory pressure (None: no cap).

    Over high_percent: the allocation minus the bytes that bring the node back to high_percent.
    Between low and high: the previous cap holds. Under low_percent: no cap."""
    if memory_percent > high_percent:
        excess_blocks = -(-int((memory_percent - high_percent) / 100 * node_memory_total_bytes) // block_bytes)
        cap = max(0, allocated_blocks - excess_blocks)
        return cap if previous_cap is None else min(cap, previous_cap)
    if memory_percent >= low_percent:
        return previous_cap
    return None


def grow_grants(wants: Mapping[str, int], room_blocks: int, granularity: int) -> dict[str, int]:
    """Extra blocks per growing worker (by worker id order) within room_blocks, in whole
    granules; a worker that cannot get its whole growth gets what is left."""
    grants = {}
    for wid in sorted(wants):
        grant = min(wants[wid], room_blocks) // granularity * granularity
        if grant > 0:
            grants[wid] = grant
            room_blocks -= grant
    return grants


# -- the loop -----------------------------------------------------------------------------------
class KVResizer(PeriodicLoop):
    """workers() -> the ready workers with fresh probes; overrides() -> {worker_id: num_blocks};
    resize(worker_id, num_blocks) -> the worker's ResizeResult. ``lock``: held for a whole round;
    a manual quota change (the manager's set/clear) takes it too, so that no round plans on the
    overrides it read before the change and undoes it."""
    loop_name = "pdserve-kv-resizer"


    def __init__(self, config: KVQuotaConfig, block_granularity: int,
                 workers: Callable[[], Awaitable[Sequence[QuotaWorker]]],
                 overrides: Callable[[], Awaitable[Mapping[str, int]]],
                 resize: Callable[[str, int], Awaitable[object]], lock: asyncio.Lock | None = None):
        super().__init__(config.interval_s)  # config's thresholds are validated by KVQuotaConfig
        self.config = config
        self.lock = lock or asyncio.Lock()
        self.granularity = block_granularity
        self._workers, self._overrides, self._resize = workers, overrides, resize
        self.nodes: dict[str, NodePlan] = {}
        self._caps: dict[str, int | None] = {}
        self._last_preemptions: dict[str, int] = {}
        self.num_rounds = 0

    def planned_blocks(self, worker_id: str) -> int | None:
        for node in self.nodes.values():
            if worker_id in node.targets:
                return node.targets[worker_id]
        return None

    async def step(self) -> dict[str, NodePlan]:
        async with self.lock:
            return await self._round()

    async def _round(self) -> dict[str, NodePlan]:
        workers = [w for w in await self._workers() if w.probe.ok and w.probe.block_bytes]
        overrides = dict(await self._overrides())
        by_node: dict[str, list[QuotaWorker]] = {}
        for w in workers:
            by_node.setdefault(w.probe.process.node_id, []).append(w)
        plans = {}
        for node_id, members in sorted(by_node.items()):
            plans[node_id] = await self._step_node(node_id, members, overrides)
        self.nodes = plans
        self.num_rounds += 1
        return plans

    async def _step_node(self, node_id: str, members: list[QuotaWorker], overrides: Mapping[str, int]) -> NodePlan:
        g = self.granularity
        first = members[0].probe
        block_bytes = first.block_bytes
        budget = node_budget_bytes(self.config, first) // block_bytes
        fixed = [w for w in members if w.worker_id in overrides or w.is_draining]
        planned = [w for w in members if not (w.worker_id in overrides or w.is_draining)]
        # sticky overrides: put back any quota that drifted from its override
        applied, fixed_allocated = {}, {}
        for w in fixed:
            want = overrides.get(w.worker_id)
            fixed_allocated[w.worker_id] = w.probe.stats.num_total_blocks
            if want is not None and -(-want // g) * g != w.probe.stats.num_target_blocks:
                log.info("kv quota: re-applying the override of %s (%d blocks)", w.worker_id, want)
                result = await self._resize(w.worker_id, want)
                fixed_allocated[w.worker_id] = result.num_blocks
                applied[w.worker_id] = want
        fixed_blocks = sum(fixed_allocated.values())
        allocated = sum(w.probe.stats.num_total_blocks for w in planned)
        process = first.process
        cap = pressure_cap(process.node_memory_percent, process.node_memory_total_bytes, block_bytes, allocated,
                           self._caps.get(node_id), self.config.memory_high_percent, self.config.memory_low_percent)
        self._caps[node_id] = cap
        effective = max(0, budget - fixed_blocks) if cap is None else max(0, min(budget - fixed_blocks, cap))
        states = [self._kv_state(w) for w in planned]
        targets = plan_quotas(effective, states, self.config, block_granularity=g) if states else {}
        # a worker keeps one segment whatever the plan: with none it could not take any request
        targets = {wid: max(t, g) for wid, t in targets.items()}
        current = {w.worker_id: w.probe.stats.num_target_blocks for w in planned}
        results = {}
        for wid, target in sorted(targets.items()):
            if target < current[wid]:
                results[wid] = await self._resize(wid, target)
                applied[wid] = target
        after = {w.worker_id: getattr(results.get(w.worker_id), "num_blocks", w.probe.stats.num_total_blocks)
                 for w in planned}
        wants = {wid: t - current[wid] for wid, t in targets.items() if t > current[wid]}
        for wid, grant in grow_grants(wants, effective - sum(after.values()), g).items():
            await self._resize(wid, current[wid] + grant)
            applied[wid] = current[wid] + grant
        return NodePlan(node_id=node_id, node_ip=process.node_ip, budget_blocks=budget, effective_budget_blocks=effective,
                        fixed_blocks=fixed_blocks, memory_percent=process.node_memory_percent, pressure_cap_blocks=cap,
                        targets=targets, applied=applied, at=time.time())

    def _kv_state(self, w: QuotaWorker) -> WorkerKVState:
        s = w.probe.stats
        preemptions = s.num_preemptions - self._last_preemptions.get(w.worker_id, s.num_preemptions)
        self._last_preemptions[w.worker_id] = s.num_preemptions
        used = s.num_used_blocks
        return WorkerKVState(worker_id=w.worker_id, role=w.role, quota_blocks=s.num_target_blocks, used_blocks=used,
                             pinned_blocks=min(s.num_pinned_blocks, used), cached_free_blocks=s.num_cached_free_blocks,
                             num_waiting=s.num_waiting + s.num_waiting_imports, num_preemptions=max(0, preemptions))

    def status(self) -> dict:
        return {"enabled": True, "interval_s": self.config.interval_s, "num_rounds": self.num_rounds,
                "last_error": self.last_error, "nodes": [asdict(n) for n in self.nodes.values()]}
