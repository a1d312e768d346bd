"""What the OpenAI endpoint sees, for the management API's GET /cluster/traffic (and so for the live
dashboard): latency and throughput samples over time, and the router's recent routing decisions.

The manager reads every replica of the endpoint (``manager.endpoint_url``; cluster/ingress_replicas.py)
when a caller asks, at most once per ``min_interval_s`` however many dashboards poll; each read
after the first adds one sample of the interval since the previous one, all replicas together
(each replica's counts minus its own previous ones, summed; cluster/endpoint_counts.py):

    ttft/itl p50, p90   from the endpoint's histograms, interpolated in their bucket
    num_requests        finished requests (any status) in the interval; requests_per_s = / interval
    tokens_per_s        completion tokens / interval
    queue_depth         requests in flight at the endpoint at the read

Routing decisions are every replica's, merged by time. A read that fails never fails the view:
``ok`` is false and ``error`` says why, the samples already taken stay. The history is bounded
(``max_samples``).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from cluster.endpoint_counts import EndpointCounts, IntervalCounter, histogram_quantile
from cluster.ingress_replicas import IngressReplicas


class TrafficSample(BaseModel):
    at: float = Field(description="Unix time of the scrape that closed the interval")
    interval_s: float
    ttft_p50_s: float | None = Field(description="None: no first token in the interval")
    ttft_p90_s: float | None
    itl_p50_s: float | None
    itl_p90_s: float | None
    num_requests: int = Field(description="Requests finished in the interval (any status), over every replica")
    requests_per_s: float
    tokens_per_s: float
    queue_depth: float


class RoutingDecisionView(BaseModel):
    model_config = ConfigDict(extra="allow")  # the endpoint may say more; shown as given

    at: float
    decode: str
    prefill: str | None = Field(description="None: the decode worker prefilled locally")
    reason: str
    prompt_tokens: int
    uncached_tokens: int
    decode_overlap_blocks: int


class TrafficView(BaseModel):
    endpoint_url: str
    ok: bool = Field(description="The last scrape of the endpoint succeeded")
    error: str | None = None
    scraped_at: float | None = None
    samples: list[TrafficSample]
    decisions: list[RoutingDecisionView] = Field(description="The endpoint's recent routing decisions, oldest first")
    zero_overlap_alarm: bool | None = None
    inflight_requests: int | None = None
    num_replicas: int | None = Field(None, description="Replicas of the endpoint read (their counts are summed)")


class EndpointTraffic:
    def __init__(self, endpoint_url: Callable[[], str], min_interval_s: float = 0.9, max_samples: int = 300,
                 max_decisions: int = 50, timeout_s: float = 5.0):
        self._url = endpoint_url
        self.replicas = IngressReplicas(endpoint_url, timeout_s)
        self.min_interval_s, self.max_decisions = min_interval_s, max_decisions
        self.samples: collections.deque[TrafficSample] = collections.deque(maxlen=max_samples)
        self._lock = asyncio.Lock()
        self._counter = IntervalCounter()
        self._last_read: tuple[str, float] | None = None  # (url, monotonic time) of the last successful read
        self._last_at = 0.0  # monotonic time of the last attempt
        self._view: TrafficView | None = None

    async def view(self) -> TrafficView:
        async with self._lock:
            if self._view is None or time.monotonic() - self._last_at >= self.min_interval_s:
                self._view = await self._scrape()
            return self._view

    async def _scrape(self) -> TrafficView:
        url = self._url().rstrip("/")
        now, mono = time.time(), time.monotonic()
        self._last_at = mono
        try:
            snapshots = await self.replicas.snapshots()
            counts = {s.replica_id: EndpointCounts.parse(s.metrics_text) for s in snapshots}
        except Exception as e:  # the view says it, and keeps what it had
            return TrafficView(endpoint_url=url, ok=False, error=f"{type(e).__name__}: {e}", scraped_at=now,
                               samples=list(self.samples), decisions=self._view.decisions if self._view else [])
        if self._last_read is None or self._last_read[0] != url:  # the first read of an endpoint: a baseline
            self._counter = IntervalCounter()
            self._counter.advance(counts)
        else:
            interval_s = max(mono - self._last_read[1], 1e-6)  # (monotonic: never negative)
            self.samples.append(self._sample(self._counter.advance(counts), now, interval_s))
        self._last_read = (url, mono)
        decisions = sorted((d for s in snapshots for d in s.decisions), key=lambda d: d.get("at", 0.0))
        return TrafficView(
            endpoint_url=url, ok=True, scraped_at=now, samples=list(self.samples),
            decisions=[RoutingDecisionView(**d) for d in decisions[-self.max_decisions:]],
            zero_overlap_alarm=any(s.zero_overlap_alarm for s in snapshots),
            inflight_requests=sum(s.num_inflight for s in snapshots), num_replicas=len(snapshots))

    @staticmethod
    def _sample(c: EndpointCounts, at: float, interval_s: float) -> TrafficSample:
        return TrafficSample(at=at, interval_s=round(interval_s, 3), ttft_p50_s=histogram_quantile(0.5, c.ttft),
                             ttft_p90_s=histogram_quantile(0.9, c.ttft), itl_p50_s=histogram_quantile(0.5, c.itl),
                             itl_p90_s=histogram_quantile(0.9, c.itl), num_requests=round(c.num_requests),
                             requests_per_s=c.num_requests / interval_s,
                             tokens_per_s=c.num_completion_tokens / interval_s, queue_depth=c.queue_depth)
