"""The autoscaler loop's pure parts: the endpoint's histograms -> p90 over an interval, worker
loads -> MetricsSample, and the loop applying decide() (simulated clock, in-process scale double)."""

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from cluster.autoscale_policy import AutoscalingConfig, PoolBounds
from cluster.autoscaler import Autoscaler, pool_sample
from cluster.endpoint_counts import ITL_HISTOGRAM, TTFT_HISTOGRAM, bucket_delta, histogram_quantile, parse_histogram
from workers.protocol import Role, WorkerLoad

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def endpoint_metrics(ttft_values, itl_values=()):
    """Prometheus text as router/metrics.py writes it (same names and buckets)."""
    r = CollectorRegistry()
    ttft = Histogram("pdserve_ttft_seconds", "ttft", buckets=BUCKETS, registry=r)
    itl = Histogram("pdserve_itl_seconds", "itl", buckets=BUCKETS, registry=r)
    for v in ttft_values:
        ttft.observe(v)
    for v in itl_values:
        itl.observe(v)
    return generate_latest(r).decode(), ttft, itl, r


def test_parse_histogram_reads_cumulative_buckets():
    text, *_ = endpoint_metrics([0.003, 0.2, 0.2, 7.0])
    b = parse_histogram(text, TTFT_HISTOGRAM)
    assert b[0.005] == 1 and b[0.25] == 3 and b[10] == 4 and b[math.inf] == 4
    assert parse_histogram(text, ITL_HISTOGRAM)[math.inf] == 0
    assert parse_histogram(text, "no_such_histogram") == {}


def test_quantile_interpolates_inside_its_bucket_like_prometheus():
    # 10 observations: 9 in (0.1, 0.25], 1 in (1, 2.5]: rank 9 of 10 is the top of (0.1, 0.25]
    cum = {0.1: 0, 0.25: 9, 1: 9, 2.5: 10, math.inf: 10}
    assert histogram_quantile(0.9, cum) == pytest.approx(0.25)
    assert histogram_quantile(0.5, cum) == pytest.approx(0.1 + 0.15 * 5 / 9)
    assert histogram_quantile(0.95, cum) == pytest.approx(1 + 1.5 * 0.5)
    assert histogram_quantile(0.9, {0.1: 0, math.inf: 0}) is None  # no observations
    assert histogram_quantile(0.9, {1.0: 0, math.inf: 5}) == 1.0  # in +Inf: the highest finite bound
    with pytest.raises(ValueError):
        histogram_quantile(1.5, cum)


def test_p90_counts_only_the_interval_and_survives_a_restart():
    text1, ttft, _, r = endpoint_metrics([0.01] * 100)  # a fast past
    first = parse_histogram(text1, TTFT_HISTOGRAM)
    for _ in range(10):
        ttft.observe(3.0)  # a slow last interval
    second = parse_histogram(generate_latest(r).decode(), TTFT_HISTOGRAM)
    p90 = histogram_quantile(0.9, bucket_delta(second, first))
    assert 2.5 < p90 <= 5  # the old fast requests do not dilute it
    assert histogram_quantile(0.9, second) < 0.025  # over all time they would
    # counters went down: the endpoint restarted, everything counted now is new
    restarted = parse_histogram(endpoint_metrics([0.3])[0], TTFT_HISTOGRAM)
    assert bucket_delta(restarted, second) == restarted


def test_pool_sample_sums_queues_and_kv_use_per_role():
    loads = [WorkerLoad("p0", Role.PREFILL, 1, 3, 10, 100), WorkerLoad("p1", Role.PREFILL, 0, 2, 30, 100),
             WorkerLoad("d0", Role.DECODE, 4, 1, 90, 100, is_draining=True)]
    s = pool_sample(5.0, loads, 1.5, 0.1)
    assert (s.at, s.prefill_waiting, s.decode_waiting) == (5.0, 5, 1)
    assert s.prefill_kv_usage == pytest.approx(0.2) and s.decode_kv_usage == pytest.approx(0.9)
    assert (s.ttft_p90_s, s.itl_p90_s) == (1.5, 0.1)
    assert pool_sample(0.0, [], None, None).decode_kv_usage == 0.0


class Pools:
    """In-process double of the manager's pools for the loop: scale() records and applies."""

    def __init__(self, prefill, decode):
        self.replicas = {Role.PREFILL: prefill, Role.DECODE: decode}
        self.calls = []
        self.waiting = 0

    async def loads(self):
        n = self.replicas[Role.DECODE]
        per = [self.waiting // n + (1 if i < self.waiting % n else 0) for i in range(n)]
        return [WorkerLoad(f"d{i}", Role.DECODE, 1, per[i], 10, 100) for i in range(n)] + \
               [WorkerLoad(f"p{i}", Role.PREFILL, 0, 0, 0, 100) for i in range(self.replicas[Role.PREFILL])]

    async def scale(self, role, n):
        self.calls.append((role, n))
        self.replicas[role] = n


async def test_loop_scales_decode_up_on_queue_breach_then_holds_through_cooldown():
    cfg = AutoscalingConfig(enabled=True, interval_s=10, cooldown_s=60, scale_down_window_s=600)
    pools, now = Pools(1, 1), [0.0]
    a = Autoscaler(cfg, {r: PoolBounds(1, 3) for r in Role}, pools.loads, None, lambda: dict(pools.replicas),
                   pools.scale, clock=lambda: now[0])
    pools.waiting = 20  # 20 waiting > 4 per replica
    decisions = []
    for i in range(12):
        now[0] = i * 10.0
        decisions.append(await a.step())
    assert pools.calls[0] == (Role.DECODE, 2)  # one step at a time
    times = [d.reason for d in decisions]
    assert "cooldown" in times[2]
    assert pools.calls == [(Role.DECODE, 2), (Role.DECODE, 3)]  # the second only after cooldown, then at max
    assert a.num_changes == 2 and a.last_decision.decode == 3
    status = a.status()
    assert status["last_sample"]["decode_waiting"] == 20 and status["last_scrape_error"] is None
    assert len(a.window) <= (max(cfg.scale_up_window_s, cfg.scale_down_window_s) + 2 * cfg.interval_s) / 10 + 1


async def test_loop_never_acts_on_an_idle_cluster_before_the_down_window():
    cfg = AutoscalingConfig(enabled=True, interval_s=10, cooldown_s=0, scale_down_window_s=100)
    pools, now = Pools(2, 2), [0.0]
    a = Autoscaler(cfg, {r: PoolBounds(1, 3) for r in Role}, pools.loads, None, lambda: dict(pools.replicas),
                   pools.scale, clock=lambda: now[0])
    for i in range(10):  # 0..90 s: the idle window (100 s) is not covered yet
        now[0] = i * 10.0
        await a.step()
    assert pools.calls == []
    now[0] = 100.0
    await a.step()
    assert set(pools.calls) == {(Role.PREFILL, 1), (Role.DECODE, 1)}
