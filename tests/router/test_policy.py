"""Routing policy (pure): decode cost, prefill score, round-robin, conditional disaggregation, the alarm."""

import logging
import random
from collections import Counter

import pytest

from router.config import RouterConfig
from router.overlap_alarm import ZeroOverlapAlarm
from router.policy import (NoWorkerAvailable, RoundRobin, choose_cache_aware, choose_decode, choose_prefill,
                           num_blocks, plan_route, should_prefill_locally)
from workers.protocol import Role, WorkerLoad


def decode(wid, used=0, running=0, waiting=0, draining=False):
    return WorkerLoad(wid, Role.DECODE, running, waiting, used, 512, is_draining=draining)


def prefill(wid, running=0, waiting=0, draining=False):
    return WorkerLoad(wid, Role.PREFILL, running, waiting, 0, 512, is_draining=draining)


def test_decode_cost_is_dynamo_form():
    # 10-block request. a: overlap 8, 20 blocks busy -> 1*2 + 20 = 22; b: no overlap, idle -> 10.
    workers = [decode("a", used=20), decode("b", used=0)]
    d = choose_decode(10, workers, {"a": 8})
    assert d.worker_id == "b" and d.reason == "lowest_cost"
    assert {s.worker_id: s.score for s in d.scores} == {"a": 22.0, "b": 10.0}
    # Weighting prefill work more makes the cached worker win: 5*2 + 20 = 30 < 5*10 + 0 = 50.
    d = choose_decode(10, workers, {"a": 8}, overlap_weight=5.0)
    assert d.worker_id == "a" and d.overlap_blocks == 8 and d.num_request_blocks == 10


def test_ties_break_by_queue_then_id_and_draining_is_never_chosen():
    d = choose_decode(4, [decode("b"), decode("a", running=1), decode("c")], {})
    assert d.worker_id == "b"  # a has a longer queue; b < c by id
    d = choose_decode(4, [decode("a", used=0, draining=True), decode("b", used=100)], {"a": 4})
    assert d.worker_id == "b" and d.num_draining_skipped == 1
    assert [s.worker_id for s in d.scores] == ["b"]


def test_no_worker_available_is_typed():
    with pytest.raises(NoWorkerAvailable, match="none is registered") as e:
        choose_decode(1, [], {})
    assert e.value.role is Role.DECODE
    with pytest.raises(NoWorkerAvailable, match="all 2 are draining"):
        choose_prefill(1, [prefill("p1", draining=True), prefill("p2", draining=True)], {})
    with pytest.raises(NoWorkerAvailable):
        RoundRobin().choose(Role.DECODE, [decode("a", draining=True)])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="role prefill"):
        choose_decode(1, [prefill("p")], {})
    with pytest.raises(ValueError, match="twice"):
        choose_decode(1, [decode("a"), decode("a")], {})
    with pytest.raises(ValueError, match="outside"):
        choose_decode(2, [decode("a")], {"a": 3})
    with pytest.raises(ValueError, match="seeded rng"):
        choose_decode(2, [decode("a")], {}, temperature=1.0)


def test_softmax_sampling_is_seeded_and_prefers_low_cost():
    workers = [decode("a", used=0), decode("b", used=50), decode("c", used=100)]

    def picks(seed):
        rng = random.Random(seed)
        return [choose_decode(4, workers, {}, temperature=0.5, rng=rng).worker_id for _ in range(600)]

    assert picks(1) == picks(1)
    counts = Counter(picks(2))
    assert counts["a"] > counts["b"] > counts["c"] > 0
    d = choose_decode(4, workers, {}, temperature=0.5, rng=random.Random(0))
    assert d.reason == "softmax_sample"


def test_prefill_score_is_overlap_minus_queue():
    ws = [prefill("p1", running=1, waiting=10), prefill("p2")]
    # p1: 6 - 0.25 * 11 = 3.25 ; p2: 0
    d = choose_prefill(8, ws, {"p1": 6})
    assert d.worker_id == "p1" and d.reason == "highest_score"
    assert {s.worker_id: s.score for s in d.scores} == {"p1": 3.25, "p2": 0.0}
    d = choose_prefill(8, ws, {"p1": 6}, queue_weight=1.0)  # 6 - 11 < 0
    assert d.worker_id == "p2"
    assert choose_prefill(8, [prefill("b", waiting=1), prefill("a", waiting=1), prefill("c")], {}).worker_id == "c"


def test_round_robin_cycles_and_survives_membership_changes():
    rr = RoundRobin()
    ws = [decode("c"), decode("a"), decode("b")]
    assert [rr.choose(Role.DECODE, ws).worker_id for _ in range(4)] == ["a", "b", "c", "a"]
    # b drains, d joins: the cycle continues after the last pick (a)
    ws = [decode("a"), decode("b", draining=True), decode("c"), decode("d")]
    assert [rr.choose(Role.DECODE, ws).worker_id for _ in range(4)] == ["c", "d", "a", "c"]
    assert rr.choose(Role.PREFILL, [prefill("p2"), prefill("p1")]).worker_id == "p1"  # its own cycle


def test_should_prefill_locally():
    assert should_prefill_locally(31, 32)
    assert not should_prefill_locally(32, 32)
    assert not should_prefill_locally(0, 0)
    with pytest.raises(ValueError):
        should_prefill_locally(-1, 32)
    assert num_blocks(33, 16) == 3 and num_blocks(0, 16) == 0


def test_plan_route_uses_the_decode_workers_own_overlap():
    cfg = RouterConfig(policy="kv_aware", local_prefill_threshold_tokens=32)
    decodes = [decode("d1"), decode("d2", used=1)]
    prefills = [prefill("p1"), prefill("p2")]
    # 100-token prompt (7 blocks of 16). d2 holds 5 blocks: cost 1*2+1 = 3 < 7 -> d2; 100-80 = 20 uncached < 32
    plan = plan_route(100, 16, decodes, prefills, {"d2": 5, "p2": 6}, cfg)
    assert plan.decode.worker_id == "d2" and plan.prefill_locally
    assert plan.num_uncached_tokens == 20 and plan.reason == "uncached_below_threshold"
    # Only 1 block cached on d2: d1 costs 7, d2 costs 6 + 1 = 7; equal queues, so the smaller id wins.
    # d1 caches nothing: 100 uncached tokens -> disaggregated, prefill chosen by overlap.
    plan = plan_route(100, 16, decodes, prefills, {"d2": 1, "p2": 6}, cfg)
    assert plan.decode.worker_id == "d1" and plan.num_uncached_tokens == 100
    assert plan.reason == "disaggregated" and plan.prefill.worker_id == "p2" and plan.prefill.role is Role.PREFILL
    # Every prefill worker draining: the decode worker prefills, and the plan says why.
    plan = plan_route(100, 16, decodes, [prefill("p1", draining=True)], {}, cfg)
    assert plan.prefill is None and plan.reason == "no_prefill_worker"
    with pytest.raises(NoWorkerAvailable):
        plan_route(100, 16, [decode("d1", draining=True)], prefills, {}, cfg)


def test_plan_route_round_robin():
    cfg = RouterConfig(policy="round_robin", local_prefill_threshold_tokens=0)
    rr = RoundRobin()
    decodes, prefills = [decode("d1"), decode("d2")], [prefill("p1"), prefill("p2")]
    plans = [plan_route(64, 16, decodes, prefills, {"d2": 4}, cfg, round_robin=rr) for _ in range(2)]
    assert [(p.decode.worker_id, p.prefill.worker_id) for p in plans] == [("d1", "p1"), ("d2", "p2")]
    assert all(p.decode.reason == "round_robin" for p in plans)
    with pytest.raises(ValueError, match="RoundRobin"):
        plan_route(64, 16, decodes, prefills, {}, cfg)


def test_cache_aware_keeps_a_long_context_where_its_prefix_is():
    # A 452-block turn of a long conversation; worker a holds 440 of its blocks and runs one more
    # long conversation (its resident KV: 900 blocks) than b (450). Dynamo's cost moves the turn
    # away from its cache (a: 12 + 900 = 912 > b: 452 + 450 = 902); the cache-aware rule, which
    # counts load in requests (2 vs 1: not imbalanced), keeps it on a.
    workers = [decode("a", used=900, running=2), decode("b", used=450, running=1)]
    assert choose_decode(452, workers, {"a": 440}).worker_id == "b"
    d = choose_cache_aware(Role.DECODE, 452, workers, {"a": 440})
    assert (d.worker_id, d.reason, d.overlap_blocks) == ("a", "cache_hit", 440)
    assert {s.worker_id: round(s.score, 3) for s in d.scores} == {"a": round(440 / 452, 3), "b": 0.0}


def test_cache_aware_balances_when_loads_diverge_and_spreads_new_prefixes():
    busy = [decode("a", running=12, waiting=3), decode("b", running=2)]
    # 15 vs 2 requests: max - min = 13 > 8 and 15 > 1.5 * 2 -> balance, whatever the cache says
    d = choose_cache_aware(Role.DECODE, 10, busy, {"a": 10})
    assert (d.worker_id, d.reason) == ("b", "balance")
    # the same loads under looser thresholds: the prefix holder again
    d = choose_cache_aware(Role.DECODE, 10, busy, {"a": 10}, balance_abs_threshold=20)
    assert (d.worker_id, d.reason) == ("a", "cache_hit")
    # a match below cache_threshold is no reason to go there: least loaded, then most free blocks
    workers = [decode("a", running=1), decode("b", used=100, running=1), decode("c", used=10, running=1)]
    d = choose_cache_aware(Role.DECODE, 10, workers, {"b": 4})
    assert (d.worker_id, d.reason) == ("a", "least_loaded")
    d = choose_cache_aware(Role.DECODE, 10, workers, {"b": 5})
    assert (d.worker_id, d.reason) == ("b", "cache_hit")
    # draining workers are never chosen, even holding the whole prefix
    d = choose_cache_aware(Role.DECODE, 10, [decode("a", draining=True), decode("b")], {"a": 10})
    assert d.worker_id == "b" and d.num_draining_skipped == 1
    with pytest.raises(ValueError):
        choose_cache_aware(Role.DECODE, 10, workers, {}, cache_threshold=1.5)
    with pytest.raises(ValueError):
        choose_cache_aware(Role.DECODE, 10, workers, {}, balance_rel_threshold=0.5)


@pytest.mark.parametrize("policy", ["cache_aware", "kv_aware", "round_robin"])
def test_plan_route_prefills_locally_when_every_prefill_queue_is_full(policy):
    """prefill_queue_threshold: a long prompt stays on its decode worker only when every eligible
    prefill worker has that many requests queued; draining workers do not count; 0 turns it off."""
    decodes = [decode("d1")]
    rr = RoundRobin()

    def plan(threshold, prefills):
        cfg = RouterConfig(policy=policy, local_prefill_threshold_tokens=0, prefill_queue_threshold=threshold)
        return plan_route(160, 16, decodes, prefills, {}, cfg, round_robin=rr)

    busy = [prefill("p1", running=1, waiting=3), prefill("p2", waiting=2)]
    p = plan(2, busy)
    assert (p.prefill, p.reason, p.num_uncached_tokens) == (None, "prefill_queue_full", 160) and p.prefill_locally
    assert plan(3, busy).reason == "disaggregated"  # p2 has room
    assert plan(0, busy).reason == "disaggregated"  # off
    # a draining worker with room is no room: the others decide
    p = plan(2, [prefill("p1", waiting=2), prefill("p2", draining=True)])
    assert p.reason == "prefill_queue_full"
    with pytest.raises(ValueError):
        RouterConfig(prefill_queue_threshold=-1)


def test_plan_route_cache_aware_picks_both_roles_by_the_same_rule():
    cfg = RouterConfig(policy="cache_aware", local_prefill_threshold_tokens=0)
    decodes = [decode("d1", used=400, running=1), decode("d2")]
    prefills = [prefill("p1", running=3), prefill("p2")]
    plan = plan_route(160, 16, decodes, prefills, {"d1": 8, "p1": 9}, cfg)  # 10 blocks
    assert (plan.decode.worker_id, plan.decode.reason) == ("d1", "cache_hit")
    assert (plan.prefill.worker_id, plan.prefill.reason) == ("p1", "cache_hit")
    assert plan.num_uncached_tokens == 160 - 8 * 16 and plan.reason == "disaggregated"
    with pytest.raises(ValueError):
        RouterConfig(policy="cache_aware", cache_threshold=2)


def test_plan_route_takes_prompt_logprobs_on_load_alone():
    """A request with prompt logprobs has its whole prompt computed wherever it is prefilled (no
    cache counted): both choices ignore the overlaps, and it is disaggregated as any other (the
    prefill worker's handle carries the logprobs)."""
    cfg = RouterConfig(policy="cache_aware", local_prefill_threshold_tokens=0)
    decodes = [decode("d1", used=400, running=1), decode("d2")]
    prefills = [prefill("p1", running=1), prefill("p2")]
    overlaps = {"d1": 9, "p1": 9}  # 9 of 10 blocks cached on d1 and p1: a cache hit, were it usable
    plan = plan_route(160, 16, decodes, prefills, overlaps, cfg)
    assert (plan.decode.worker_id, plan.prefill.worker_id, plan.prefill.reason) == ("d1", "p1", "cache_hit")
    plan = plan_route(160, 16, decodes, prefills, overlaps, cfg, prompt_logprobs=True)
    assert (plan.decode.worker_id, plan.decode.reason, plan.decode.overlap_blocks) == ("d2", "least_loaded", 0)
    assert (plan.prefill.worker_id, plan.reason, plan.num_uncached_tokens) == ("p2", "disaggregated", 160)


# -- zero-overlap alarm ----------------------------------------------------------------------------
def test_alarm_fires_when_prefixes_repeat_but_overlap_stays_zero(caplog):
    alarm = ZeroOverlapAlarm(window_requests=10, min_repeats=3)
    with caplog.at_level(logging.WARNING, logger="router.overlap_alarm"):
        states = [alarm.observe(first_block_hash=i % 4, max_overlap_blocks=0) for i in range(10)]
    assert states[:9] == [False] * 9 and states[9] is True  # raised when the window closes
    assert alarm.is_alarmed and alarm.num_alarm_windows == 1
    assert len([r for r in caplog.records if "KV event stream" in r.message]) == 1
    # Still broken over the next window: one more warning, not one per request.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="router.overlap_alarm"):
        for i in range(10):
            alarm.observe(i % 4, 0)
    assert alarm.num_alarm_windows == 2 and len(caplog.records) == 1
    # One real match clears it at once.
    assert alarm.observe(1, 3) is False and not alarm.is_alarmed


def test_alarm_stays_quiet_for_unique_prefixes_or_real_matches():
    alarm = ZeroOverlapAlarm(window_requests=10, min_repeats=3)
    for i in range(30):  # all distinct prompts: zero overlap is expected
        assert alarm.observe(1000 + i, 0) is False
    for i in range(30):  # repeats, and the index matches some of them
        assert alarm.observe(i % 3, 2 if i % 5 == 0 else 0) is False
    assert alarm.num_alarm_windows == 0
    # Requests shorter than one block carry no first-block hash and are not counted.
    for _ in range(100):
        assert alarm.observe(None, 0) is False


def test_alarm_remembers_prefixes_across_windows_and_can_be_off():
    alarm = ZeroOverlapAlarm(window_requests=5, min_repeats=5)
    for i in range(5):
        alarm.observe(i, 0)  # window 1: five new prefixes
    for i in range(5):
        alarm.observe(i, 0)  # window 2: all repeats of window 1
    assert alarm.is_alarmed
    off = ZeroOverlapAlarm(window_requests=0)
    assert not any(off.observe(1, 0) for _ in range(200))
