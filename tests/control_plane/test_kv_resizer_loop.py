"""The KV resizer loop's parts: memory-pressure cap with hysteresis, growth grants, node budgets,
and rounds of the loop over in-process worker doubles that resize like the engine does (whole
segments; blocks in use stay until freed): budget per node, shrink before grow, sticky overrides,
draining workers left alone, memory pressure."""

import asyncio

import pytest
from pydantic import ValidationError

from cluster.kv_resizer import KVResizer, QuotaWorker, grow_grants, node_budget_bytes, pressure_cap
from cluster.quota_policy import KVQuotaConfig
from cluster.worker_probe import ProcessInfo, WorkerProbe
from workers.engine.engine import EngineStats
from workers.engine.resizer import ResizeResult
from workers.protocol import Role

BPS = 32  # blocks per segment (the resizer's granularity)
BLOCK_BYTES = 1000
GIB = 1 << 30


def process(node="n1", percent=50.0, total=16 * GIB, device="cpu", device_total=None):
    return ProcessInfo(pid=1, rss_bytes=1, node_id=node, node_ip=f"10.0.0.{node[-1]}", node_memory_total_bytes=total,
                       node_memory_available_bytes=int(total * (1 - percent / 100)), node_memory_percent=percent,
                       device=device, device_memory_total_bytes=device_total, device_memory_free_bytes=device_total)


class Worker:
    """Double of one worker's KV memory, resizing as the engine's SegmentResizer does."""

    def __init__(self, wid, role, quota, used=0, waiting=0, node="n1", draining=False, imports=0):
        self.wid, self.role, self.node, self.draining = wid, role, node, draining
        self.target, self.used, self.waiting, self.preemptions = quota, used, waiting, 0
        self.imports = imports  # KV imports waiting for free blocks
        self.percent = 50.0

    @property
    def allocated(self):  # segments still holding blocks in use stay until those are freed
        return max(self.target, -(-self.used // BPS) * BPS)

    def resize(self, n):
        self.target = -(-n // BPS) * BPS
        return ResizeResult(self.target, self.allocated, self.target, self.allocated - self.target)

    def quota_worker(self):
        stats = EngineStats(num_running=1, num_waiting=self.waiting, num_pinned=0, num_reserved=0,
                            num_used_blocks=self.used, num_free_blocks=self.allocated - self.used,
                            num_cached_free_blocks=0, num_total_blocks=self.allocated, num_target_blocks=self.target,
                            num_pinned_blocks=0, num_preemptions=self.preemptions, num_evictions=0,
                            prompt_tokens_queried=0, prompt_tokens_hit=0, kv_bytes=self.allocated * BLOCK_BYTES,
                            num_waiting_imports=self.imports)
        probe = WorkerProbe(self.wid, 0.0, stats=stats, num_inflight=1, process=process(self.node, self.percent))
        return QuotaWorker(self.wid, self.role, probe, self.draining)


class Node:
    def __init__(self, *workers, overrides=None):
        self.workers = {w.wid: w for w in workers}
        self.overrides = dict(overrides or {})
        self.calls = []  # (worker id, old target, new target) in the order resize() was called

    async def list(self):
        return [w.quota_worker() for w in self.workers.values()]

    async def get_overrides(self):
        return self.overrides

    async def resize(self, wid, n):
        w = self.workers[wid]
        self.calls.append((wid, w.target, -(-n // BPS) * BPS))
        return w.resize(n)

    def resizer(self, budget_blocks, **config):
        """config: other KVQuotaConfig fields (budget_blocks None: the node's budget_fraction)."""
        budget = {} if budget_blocks is None else {"node_kv_budget_bytes": budget_blocks * BLOCK_BYTES}
        cfg = KVQuotaConfig(enabled=True, min_blocks_per_worker=BPS, **budget, **config)
        return KVResizer(cfg, BPS, self.list, self.get_overrides, self.resize)


def test_pressure_cap_takes_back_the_excess_and_holds_until_use_falls_low():
    total = 100 * 1000 * BLOCK_BYTES // 10  # 10^7 bytes: 1 % = 100 blocks
    assert pressure_cap(85.0, total, BLOCK_BYTES, 900, None, 90, 80) is None
    cap = pressure_cap(93.0, total, BLOCK_BYTES, 900, None, 90, 80)
    assert cap == 600  # 3 % over = 300 blocks back
    assert pressure_cap(85.0, total, BLOCK_BYTES, 600, cap, 90, 80) == 600  # between low and high: hold
    assert pressure_cap(95.0, total, BLOCK_BYTES, 600, cap, 90, 80) == 100  # worse: cap from what is held now
    assert pressure_cap(79.0, total, BLOCK_BYTES, 600, cap, 90, 80) is None  # under low: released
    assert pressure_cap(100.0, total, BLOCK_BYTES, 50, None, 90, 80) == 0


def test_grow_grants_fit_the_room_in_whole_segments():
    assert grow_grants({"b": 64, "a": 64}, 100, 32) == {"a": 64, "b": 32}
    assert grow_grants({"a": 64}, 31, 32) == {}
    assert grow_grants({"a": 40}, 1000, 32) == {"a": 32}


def test_node_budget_from_config_or_a_fraction_of_the_node():
    probe = WorkerProbe("w", 0.0, process=process(total=10 * GIB))
    assert node_budget_bytes(KVQuotaConfig(node_kv_budget_bytes=12345), probe) == 12345
    assert node_budget_bytes(KVQuotaConfig(), probe) == int(10 * GIB * 0.3)  # the default fraction
    gpu = WorkerProbe("w", 0.0, process=process(total=10 * GIB, device="cuda", device_total=80 * GIB))
    assert node_budget_bytes(KVQuotaConfig(budget_fraction=0.5), gpu) == 40 * GIB  # device memory on CUDA


async def test_rounds_keep_the_node_in_budget_and_give_the_busy_decode_more():
    p = Worker("prefill-0", Role.PREFILL, 256)
    d = Worker("decode-0", Role.DECODE, 256, used=250, waiting=6)
    node = Node(p, d)
    r = node.resizer(budget_blocks=448)
    for _ in range(8):
        calls_before = len(node.calls)
        plans = await r.step()
        round_calls = node.calls[calls_before:]
        kinds = ["shrink" if new < old else "grow" for _, old, new in round_calls]
        assert kinds == sorted(kinds, key=lambda k: k != "shrink")  # every shrink before any grow
        assert p.allocated + d.allocated <= 448 or round_calls == []
    assert plans["n1"].budget_blocks == 448
    assert d.target > p.target and p.target >= BPS  # demand, with the floor kept
    assert d.target >= d.used  # never below what is in use
    assert p.target % BPS == 0 and d.target % BPS == 0
    assert r.planned_blocks("decode-0") == d.target


async def test_overrides_are_sticky_and_come_off_the_budget():
    a = Worker("decode-0", Role.DECODE, 256)
    b = Worker("decode-1", Role.DECODE, 256)
    node = Node(a, b, overrides={"decode-0": 64})
    r = node.resizer(budget_blocks=320)
    await r.step()
    assert a.target == 64  # the override was applied
    assert ("decode-0", 256, 64) in node.calls
    plan = r.nodes["n1"]
    assert "decode-0" not in plan.targets and plan.fixed_blocks == 64
    for _ in range(5):
        await r.step()
    assert a.target == 64 and b.target <= 320 - 64
    a.resize(256)  # something else moved it (a restarted worker starts at its config quota)
    await r.step()
    assert a.target == 64  # put back
    node.overrides.clear()  # DELETE /cluster/kv-quota/decode-0: the planner takes it back
    await r.step()
    assert "decode-0" in r.nodes["n1"].targets


async def test_a_manual_quota_set_during_a_round_is_not_undone_by_it():
    """PUT /cluster/kv-quota during a round that read the overrides before it: the manager's set
    waits for the round (KVResizer.lock), so the round does not grow the worker back to its plan
    (a live cluster showed the override's target 320 blocks instead of 64 right after the PUT)."""
    a = Worker("decode-0", Role.DECODE, 128)
    node = Node(a)
    probing, release = asyncio.Event(), asyncio.Event()

    async def slow_list():  # the round's probes take a while
        probing.set()
        await release.wait()
        return await node.list()

    r = KVResizer(KVQuotaConfig(enabled=True, node_kv_budget_bytes=320 * BLOCK_BYTES, min_blocks_per_worker=BPS),
                  BPS, slow_list, node.get_overrides, node.resize)

    async def set_quota(n):  # what Manager.set_kv_quota does, under the same lock
        async with r.lock:
            node.overrides["decode-0"] = n
            return await node.resize("decode-0", n)

    round_ = asyncio.create_task(r.step())
    await probing.wait()
    manual = asyncio.create_task(set_quota(64))
    await asyncio.sleep(0.01)
    assert not manual.done()  # held while the round runs
    release.set()
    await round_
    await manual
    assert node.calls[0][2] > 128 and node.calls[-1][2] == 64  # the round's growth, then the override
    assert a.target == 64
    await r.step()
    assert a.target == 64  # the next round sees the override


async def test_draining_workers_are_left_alone_and_nodes_are_planned_apart():
    busy = Worker("decode-0", Role.DECODE, 256, used=10, node="n1")
    leaving = Worker("decode-1", Role.DECODE, 256, used=100, node="n1", draining=True)
    other = Worker("decode-2", Role.DECODE, 256, node="n2")
    node = Node(busy, leaving, other)
    r = node.resizer(budget_blocks=384)
    for _ in range(6):
        await r.step()
    assert leaving.target == 256 and all(wid != "decode-1" for wid, _, _ in node.calls)
    assert busy.allocated <= 384 - 256  # the draining worker's blocks count against its node
    assert set(r.nodes) == {"n1", "n2"} and other.allocated <= 384


async def test_memory_pressure_shrinks_at_once_and_growth_waits_for_relief():
    a = Worker("decode-0", Role.DECODE, 512, used=64)
    b = Worker("prefill-0", Role.PREFILL, 512, used=0)
    node = Node(a, b)
    r = node.resizer(budget_blocks=1024)
    await r.step()
    held = a.allocated + b.allocated
    assert held == 1024
    for w in (a, b):
        w.percent = 90.5  # 16 GiB node: 0.5 % over = ~86k blocks of 1000 bytes: more than all KV
    await r.step()
    assert a.target == BPS * 2 and b.target == BPS  # cut to what is in use / the floor, in one round
    for w in (a, b):
        w.percent = 85.0  # better, but not under low_percent: no growth back yet
    await r.step()
    assert (a.target, b.target) == (BPS * 2, BPS)
    for w in (a, b):
        w.percent = 60.0
    await r.step()
    assert a.target + b.target > BPS * 3  # relieved: grows again (gradually)


async def test_workers_that_do_not_answer_are_skipped():
    ok = Worker("decode-0", Role.DECODE, 256)
    node = Node(ok)

    async def with_a_dead_one():
        return [*(await node.list()), QuotaWorker("decode-9", Role.DECODE, WorkerProbe("decode-9", 0.0, error="gone"))]

    cfg = KVQuotaConfig(enabled=True, node_kv_budget_bytes=128 * BLOCK_BYTES, min_blocks_per_worker=BPS)
    r = KVResizer(cfg, BPS, with_a_dead_one, node.get_overrides, node.resize)
    await r.step()
    assert all(wid == "decode-0" for wid, _, _ in node.calls)


def test_bad_settings_are_refused():
    with pytest.raises(ValidationError, match="budget_fraction"):
        Node().resizer(10, budget_fraction=0)
    with pytest.raises(ValidationError, match="memory_low_percent"):
        Node().resizer(10, memory_low_percent=95, memory_high_percent=90)
    with pytest.raises(ValidationError, match="memory_high_percent"):
        Node().resizer(10, memory_high_percent=101)


async def test_the_memory_thresholds_from_the_config_decide_when_the_node_is_under_pressure():
    def at_85_percent(**config):
        w = Worker("decode-0", Role.DECODE, 512, used=64)
        w.percent = 85.0
        r = Node(w).resizer(1024, **config)
        return w, r

    w, r = at_85_percent()  # defaults: 85 % is under memory_high_percent (90): no cap, no shrink
    plans = await r.step()
    assert plans["n1"].pressure_cap_blocks is None and w.target >= 512  # (it may grow into the budget)
    w, r = at_85_percent(memory_high_percent=84.0, memory_low_percent=70.0)
    plans = await r.step()
    assert plans["n1"].pressure_cap_blocks is not None and w.target < 512  # capped and shrunk at once


async def test_the_budget_fraction_from_the_config_sets_the_node_budget():
    # 16 GiB node, blocks of 1000 bytes: no node_kv_budget_bytes, so the fraction decides
    budgets = {}
    for fraction in (0.3, 0.1):
        config = {} if fraction == 0.3 else {"budget_fraction": fraction}
        plans = await Node(Worker("decode-0", Role.DECODE, 256)).resizer(None, **config).step()
        budgets[fraction] = plans["n1"].budget_blocks
    assert budgets == {0.3: int(16 * GIB * 0.3) // BLOCK_BYTES, 0.1: int(16 * GIB * 0.1) // BLOCK_BYTES}


async def test_imports_waiting_for_blocks_count_as_demand():
    """A decode worker whose KV imports wait for free blocks (its scheduler queue empty: imports
    are not in it) gets the larger share, as one with as many requests waiting would."""
    a = Worker("decode-a", Role.DECODE, 256, used=250, imports=6)
    b = Worker("decode-b", Role.DECODE, 256, used=250)
    node = Node(a, b)
    r = node.resizer(budget_blocks=640)
    for _ in range(8):
        await r.step()
    assert a.target > b.target >= b.used
