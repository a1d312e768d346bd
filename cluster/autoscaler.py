"""Autoscaler: the loop that applies the autoscaling policy (cluster/autoscale_policy.decide).

Every interval_s:
    sample   queue depths and KV use per pool  (the workers, probed by the manager)
             TTFT and ITL p90 over the interval (the endpoint's Prometheus histograms, read from
                                                 every Serve replica of the endpoint: each
                                                 replica's bucket counts now minus its own last
                                                 time, summed; cluster/endpoint_counts.py)
    decide   over a window of recent samples, with cooldown and hysteresis (the pure policy)
    apply    through the manager's scale(), the same path as POST /cluster/pools/{role}/scale

The latency p90 is interpolated inside the histogram bucket where it falls, as Prometheus'
histogram_quantile does; with no request finishing a first token in the interval it is None
(the policy then judges by queues and KV use only). A failed read is never silent: it leaves
the latencies None, and the error shows in the status (GET /cluster) and in the log.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

from cluster.autoscale_policy import AutoscalingConfig, MetricsSample, ReplicaBounds, ScaleDecision, decide
from cluster.endpoint_counts import EndpointCounts, IntervalCounter, histogram_quantile
from cluster.ingress_replicas import IngressReplicas
from cluster.periodic import PeriodicLoop
from workers.protocol import Role

log = logging.getLogger(__name__)


# -- pure parts ---------------------------------------------------------------------------------
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
@dataclass(frozen=True)
class LatencyWindow:
    """The endpoint's latencies over the time since the previous read, all replicas together."""

    ttft_p90_s: float | None  # None: no first token in the window
    itl_p90_s: float | None
    num_first_tokens: int  # requests whose first token came in the window
    num_replicas: int  # replicas of the endpoint that answered


class LatencyScraper:
    """p90 of TTFT and ITL over the time since the previous read, over every replica."""

    def __init__(self, replicas: IngressReplicas):
        self.replicas = replicas
        self._counter = IntervalCounter()

    async def window(self) -> LatencyWindow:
        snapshots = await self.replicas.snapshots()
        counts = self._counter.advance({s.replica_id: EndpointCounts.parse(s.metrics_text) for s in snapshots})
        return LatencyWindow(histogram_quantile(0.9, counts.ttft), histogram_quantile(0.9, counts.itl),
                             counts.num_first_tokens, len(snapshots))


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
        self.last_window: LatencyWindow | None = None
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
                self.last_window = await self.scraper.window()
                ttft, itl = self.last_window.ttft_p90_s, self.last_window.itl_p90_s
                self.last_scrape_error = None
            except Exception as e:
                self.last_window = None
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
                "endpoint_url": self.scraper.replicas.endpoint_url() if self.scraper else None,
                "endpoint_app": self.scraper.replicas.app_name if self.scraper else None,
                "last_window": asdict(self.last_window) if self.last_window else None,
                "last_scrape_error": self.last_scrape_error}
