"""KV quota policy (pure): demand split, floors, gradual moves, memory pressure, and invariants."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cluster.quota_policy import KVQuotaConfig, WorkerKVState, budget_blocks_from_bytes, plan_quotas
from workers.protocol import Role

CFG = KVQuotaConfig(enabled=True)  # min 16 blocks, step max(16, 25%)


def prefill(wid, quota, used=0, **kw):
    return WorkerKVState(wid, Role.PREFILL, quota, used, **kw)


def decode(wid, quota, used=0, **kw):
    return WorkerKVState(wid, Role.DECODE, quota, used, **kw)


def rounds(workers, budget, n, config=CFG, pressure=0.0, granularity=1):
    """Apply plans as the resizer would (every change succeeds); return the quota history."""
    history = [{w.worker_id: w.quota_blocks for w in workers}]
    for _ in range(n):
        plan = plan_quotas(budget, workers, config, pressure, block_granularity=granularity)
        workers = [WorkerKVState(**{**w.__dict__, "quota_blocks": plan[w.worker_id]}) for w in workers]
        history.append(plan)
    return history


def test_busy_decode_gets_more_and_idle_prefill_gives_back_gradually():
    workers = [prefill("p", 512, used=0), decode("d", 512, used=500, num_waiting=6, num_preemptions=2)]
    history = rounds(workers, 1024, 30)
    first = history[1]
    assert first == {"p": 384, "d": 640}  # one step of 25% each way
    final = history[-1]
    assert final["d"] > 900 and final["p"] >= CFG.min_blocks_per_worker
    assert sum(final.values()) == 1024
    # Monotone approach, no oscillation, then a fixed point.
    for wid in ("p", "d"):
        seq = [h[wid] for h in history]
        diffs = [b - a for a, b in zip(seq, seq[1:])]
        assert all(x <= 0 for x in diffs) or all(x >= 0 for x in diffs), (wid, seq)
        assert all(abs(b - a) <= max(CFG.min_step_blocks, CFG.max_step_fraction * a) for a, b in zip(seq, seq[1:]))
    assert history[-1] == history[-2]


def test_idle_workers_drift_to_an_equal_share():
    history = rounds([decode("a", 900), decode("b", 100), decode("c", 24)], 1024, 40)
    final = history[-1]
    assert max(final.values()) - min(final.values()) <= 1 and sum(final.values()) == 1024


def test_never_below_used_and_min_respected():
    workers = [prefill("p", 512, used=400, pinned_blocks=300), decode("d", 512, used=512, num_preemptions=10),
               prefill("idle", 0)]
    plan = plan_quotas(1024, workers, CFG)
    assert plan["p"] >= 400 and plan["d"] >= 512 and plan["idle"] >= 16
    assert sum(plan.values()) <= 1024


def test_memory_pressure_shrinks_everyone_proportionally_but_not_below_used():
    workers = [decode("a", 600, used=100), decode("b", 300, used=100), prefill("c", 100)]
    plan = plan_quotas(1000, workers, CFG, memory_pressure=0.5)
    assert sum(plan.values()) <= 500
    assert plan["a"] >= 100 and plan["b"] >= 100 and plan["c"] >= 16
    # the part above each floor keeps its proportions (a's headroom 500 > b's 200 > c's 84)
    assert plan["a"] - 100 > plan["b"] - 100 > plan["c"] - 16
    # Pressure beyond what is in use: everyone at used, nothing freed that is in use.
    plan = plan_quotas(1000, workers, CFG, memory_pressure=0.9)
    assert plan == {"a": 100, "b": 100, "c": 0}


def test_budget_cut_is_immediate_but_growth_is_gradual():
    workers = [decode("a", 512, used=64), decode("b", 512, used=64)]
    plan = plan_quotas(512, workers, CFG)  # budget halved: fits at once, not by 25% steps
    assert plan == {"a": 256, "b": 256}
    plan = plan_quotas(4096, workers, CFG)  # budget grown: 25% per round
    assert plan == {"a": 640, "b": 640}


def test_min_given_up_before_used_when_budget_is_tight():
    workers = [decode("a", 100, used=90), decode("b", 100, used=0), decode("c", 100, used=0)]
    plan = plan_quotas(100, workers, CFG)  # floors 90 + 16 + 16 = 122 > 100
    assert plan["a"] >= 90 and sum(plan.values()) == 100 and plan["b"] + plan["c"] == 10


def test_granularity_rounds_to_whole_segments():
    workers = [decode("a", 512, used=65, num_waiting=3), prefill("b", 512, used=1)]
    plan = plan_quotas(1000, workers, CFG, block_granularity=64)
    assert all(v % 64 == 0 for v in plan.values())
    assert plan["a"] >= 128 and plan["b"] >= 64 and sum(plan.values()) <= 1000


def test_bad_inputs():
    with pytest.raises(ValueError, match="pinned_blocks"):
        decode("a", 10, used=1, pinned_blocks=2)
    with pytest.raises(ValueError, match="used_blocks"):
        decode("a", 10, used=-1)
    with pytest.raises(ValueError, match="unique"):
        plan_quotas(100, [decode("a", 10), decode("a", 10)], CFG)
    with pytest.raises(ValueError, match="memory_pressure"):
        plan_quotas(100, [decode("a", 10)], CFG, memory_pressure=1.5)
    with pytest.raises(ValueError, match="granularity"):
        plan_quotas(100, [decode("a", 10)], CFG, block_granularity=0)
    with pytest.raises(ValidationError, match="max_step"):
        KVQuotaConfig(max_step=0.5)
    assert plan_quotas(100, [], CFG) == {}
    assert budget_blocks_from_bytes(10_000, 3_000) == 3


workers_st = st.lists(
    st.builds(
        lambda q, u_frac, pin_frac, wait, pre, role: (q, u_frac, pin_frac, wait, pre, role),
        st.integers(0, 4096), st.floats(0, 1), st.floats(0, 1), st.integers(0, 50), st.integers(0, 10),
        st.sampled_from(list(Role))),
    min_size=1, max_size=8)


@settings(max_examples=400, deadline=None, database=None)
@given(raw=workers_st, budget=st.integers(0, 20000), pressure=st.floats(0, 1),
       granularity=st.sampled_from([1, 16, 64]), min_blocks=st.integers(0, 256),
       step=st.floats(0.01, 1.0))
def test_plan_invariants(raw, budget, pressure, granularity, min_blocks, step):
    config = KVQuotaConfig(min_blocks_per_worker=min_blocks, max_step_fraction=step)
    workers = []
    for i, (quota, u_frac, pin_frac, wait, pre, role) in enumerate(raw):
        used = int(quota * u_frac)
        workers.append(WorkerKVState(f"w{i}", role, quota, used, int(used * pin_frac), 0, wait, pre))
    plan = plan_quotas(budget, workers, config, pressure, block_granularity=granularity)

    def up(n):
        return -(-n // granularity) * granularity

    assert set(plan) == {w.worker_id for w in workers}
    assert all(v % granularity == 0 for v in plan.values())
    assert all(plan[w.worker_id] >= w.used_blocks for w in workers)  # never below used
    effective = int(budget * (1 - pressure)) // granularity * granularity
    floors_used = sum(up(w.used_blocks) for w in workers)
    if floors_used <= effective:
        assert sum(plan.values()) <= effective  # within the budget whenever that is possible
    else:
        assert plan == {w.worker_id: up(w.used_blocks) for w in workers}  # tightest safe plan
    if sum(max(up(w.used_blocks), up(min_blocks)) for w in workers) <= effective:
        assert all(v >= min_blocks for v in plan.values())  # min respected when it fits
