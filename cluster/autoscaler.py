"""Autoscaler: the loop that applies the autoscaling policy (cluster/autoscale_policy.decide).

Every interval_s:
    sample   queue depths and KV use per pool  (the workers, probed by the manager)
             TTFT and ITL p90 over the interval (the endpoint's Prometheus histograms, scraped
                                                 over HTTP: bucket counts now minus last time)
    decide   over a window of recent samples, with cooldown and hysteresis (the pure policy)
    apply    through the manager's scale(), the same path as POST /cluster/pools/{role}/scale

The latency p90 is interpolated inside the histogram bucket where it falls, as Prometheus'
histogram_quantile does; with no request finishing a first token in the interval it is None
(the policy then judges by queues and KV use only). A failed scrape is never silent: it leaves
the latencies None, and the error shows in the status (GET /cluster) and in the log.
The endpoint's histograms are per Serve replica; one replica (the default) is assumed.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import httpx

from cluster.periodic import PeriodicLoop
from cluster.autoscale_policy import AutoscalingConfig, MetricsSample, ReplicaBounds, ScaleDecision, decide
from workers.protocol import Role

log = logging.getLogger(__name__)

TTFT_HISTOGRAM = "pdserve_ttft_seconds"
ITL_HISTOGRAM = "pdserve_itl_seconds"


# -- pure parts ---------------------------------------------------------------------------------
def parse_histogram(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts {upper bound: count} of histogram ``name`` in Prometheus text
    (summed over label sets). Empty if the histogram is absent."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for s in family.samples:
            if s.name == f"{name}_bucket":
                buckets[float(s.labels["le"])] += s.value
    return dict(buckets)


def bucket_delta(now: Mapping[float, float], before: Mapping[float, float] | None) -> dict[float, float]:
    """Observations between two scrapes, per bucket. A count that went down means the endpoint
    restarted (counters reset): then everything counted now is new."""
    if not before or any(now.get(le, 0.0) < before.get(le, 0.0) for le in now):
        return dict(now)
    return {le: now[le] - before.get(le, 0.0) for le in now}


def histogram_quantile(q: float, cumulative: Mapping[float, float]) -> float | None:
    """The q-quantile of cumulative buckets, linearly interpolated in its bucket (lower bound of
    the first bucket: 0). None without observations; the highest finite bound if it falls in +Inf."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    total = cumulative[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = cumulative[le]
        if count >= rank and count > below:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = (le if not math.isinf(le) else lower), count
    return lower


def pool_sample(at: float, loads: Sequence, ttft_p90_s: float | None, itl_p90_s: float | None) -> MetricsSample:
    """A MetricsSample from the workers' WorkerLoads (draining workers included: they still hold
    KV and run requests)."""
    waiting = {r: 0 for r in Role}
    used = {r: 0 for r in Role}
    total = {r: 0 for r in Role}
    for load in loads:
        waiting[load.role] += load.num_waiting
        used[load.role] += load.num_used_blocks
        total[load.role] += load.num_total_blocks
    usage = {r: used[r] / total[r] if total[r] else 0.0 for r in Role}
    return MetricsSample(at=at, prefill_waiting=waiting[Role.PREFILL], decode_waiting=waiting[Role.DECODE],
                         ttft_p90_s=ttft_p90_s, itl_p90_s=itl_p90_s, prefill_kv_usage=usage[Role.PREFILL],
                         decode_kv_usage=usage[Role.DECODE])


# -- the endpoint's latency histograms ----------------------------------------------------------
class LatencyScraper:
    """p90 of TTFT and ITL over the time since the previous scrape."""

    def __init__(self, metrics_url: str, timeout_s: float = 5.0):
        self.metrics_url = metrics_url
        self.timeout_s = timeout_s
        self._last: dict[str, dict[float, float]] = {}

    async def p90(self) -> tuple[float | None, float | None]:
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            r = await client.get(self.metrics_url)
        if r.status_code != 200:
            raise RuntimeError(f"GET {self.metrics_url} answered {r.status_code}")
        out = []
        for name in (TTFT_HISTOGRAM, ITL_HISTOGRAM):
            now = parse_histogram(r.text, name)
            if not now:
                raise RuntimeError(f"{self.metrics_url} has no histogram {name}")
            out.append(histogram_quantile(0.9, bucket_delta(now, self._last.get(name))))
            self._last[name] = now
        return out[0], out[1]


# -- the loop -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AppliedDecision:
    at: float
    prefill: int
    decode: int
    reason: str
    changed: bool


class Autoscaler(PeriodicLoop):
    """loads() -> the live workers' WorkerLoads; scraper: the endpoint's latencies (None: judge by
    queues and KV use only); current() -> replicas per role; apply(role, replicas) scales."""
    loop_name = "pdserve-autoscaler"


    def __init__(self, config: AutoscalingConfig, bounds: Mapping[Role, ReplicaBounds],
                 loads: Callable[[], Awaitable[Sequence]], scraper: LatencyScraper | None,
                 current: Callable[[], Mapping[Role, int]], apply: Callable[[Role, int], Awaitable[object]],
                 clock: Callable[[], float] = time.time):
        super().__init__(config.interval_s)
        self.config = config
        self.clock = clock
        self.bounds = bounds
        self.scraper = scraper
        self._loads, self._current, self._apply = loads, current, apply
        self.last_scrape_error: str | None = None
        # long enough for the longer of the two windows, plus slack for irregular sampling
        keep_s = max(config.scale_up_window_s, config.scale_down_window_s) + 2 * config.interval_s
        self._keep_s = keep_s
        self.window: collections.deque[MetricsSample] = collections.deque()
        self.last_change_at: float | None = None
        self.last_decision: AppliedDecision | None = None
        self.num_changes = 0

    async def collect(self, now: float) -> MetricsSample:
        ttft, itl = None, None
        if self.scraper is not None:
            try:
                ttft, itl = await self.scraper.p90()
                self.last_scrape_error = None
            except Exception as e:
                if self.last_scrape_error is None:
                    log.warning("autoscaler: no latencies from the endpoint (%s: %s); judging by queues and KV use",
                                type(e).__name__, e)
                self.last_scrape_error = f"{type(e).__name__}: {e}"
        return pool_sample(now, await self._loads(), ttft, itl)

    async def step(self) -> ScaleDecision:
        """One round: sample, decide, apply. Returns the decision."""
        now = self.clock()
        self.window.append(await self.collect(now))
        while self.window and self.window[0].at < now - self._keep_s:
            self.window.popleft()
        current = dict(self._current())
        decision = decide(list(self.window), current, self.config, self.last_change_at, now, self.bounds)
        if decision.changed:
            for role in Role:
                if decision.replicas(role) != current[role]:
                    log.info("autoscaler: %s %d -> %d (%s)", role.value, current[role], decision.replicas(role),
                             decision.reason)
                    await self._apply(role, decision.replicas(role))
            self.last_change_at = now
            self.num_changes += 1
        self.last_decision = AppliedDecision(now, decision.prefill, decision.decode, decision.reason, decision.changed)
        return decision

    def status(self) -> dict:
        last = self.window[-1] if self.window else None
        return {"enabled": True, "interval_s": self.config.interval_s, "num_samples": len(self.window),
                "last_sample": asdict(last) if last else None,
                "last_decision": asdict(self.last_decision) if self.last_decision else None,
                "last_change_at": self.last_change_at, "num_changes": self.num_changes, "last_error": self.last_error,
                "metrics_url": self.scraper.metrics_url if self.scraper else None,
                "last_scrape_error": self.last_scrape_error}
