"""What the OpenAI endpoint sees, for the management API's GET /cluster/traffic (and so for the live
dashboard): latency and throughput samples over time, and the router's recent routing decisions.

The manager scrapes the endpoint (``manager.endpoint_url``: /metrics and /v1/routing/recent)
when a caller asks, at most once per ``min_interval_s`` however many dashboards poll; each scrape
after the first adds one sample of the interval since the previous one:

    ttft/itl p50, p90   from the endpoint's histograms, bucket counts now minus last time,
                        interpolated in their bucket (cluster/autoscaler.py: histogram_quantile)
    requests_per_s      finished requests (any status) / interval
    tokens_per_s        completion tokens / interval
    queue_depth         requests in flight at the endpoint at the scrape

A scrape that fails never fails the view: ``ok`` is false and ``error`` says why, the samples
already taken stay. The history is bounded (``max_samples``).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

import httpx
from pydantic import BaseModel, ConfigDict, Field

from cluster.autoscaler import ITL_HISTOGRAM, TTFT_HISTOGRAM, bucket_delta, histogram_quantile, parse_histogram

_COUNTERS = {"requests": "pdserve_requests", "tokens": "pdserve_completion_tokens"}
_QUEUE_GAUGE = "pdserve_queue_depth"


class TrafficSample(BaseModel):
    at: float = Field(description="Unix time of the scrape that closed the interval")
    interval_s: float
    ttft_p50_s: float | None = Field(description="None: no first token in the interval")
    ttft_p90_s: float | None
    itl_p50_s: float | None
    itl_p90_s: float | None
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


def _counter_total(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name in (name, name.removesuffix("_total")):
            total += sum(s.value for s in family.samples if s.name in (name, f"{name}_total"))
    return total


class EndpointTraffic:
    def __init__(self, endpoint_url: Callable[[], str], min_interval_s: float = 0.9, max_samples: int = 300,
                 max_decisions: int = 50, timeout_s: float = 5.0):
        self._url = endpoint_url
        self.min_interval_s, self.timeout_s, self.max_decisions = min_interval_s, timeout_s, max_decisions
        self.samples: collections.deque[TrafficSample] = collections.deque(maxlen=max_samples)
        self._lock = asyncio.Lock()
        self._last: dict | None = None  # the previous scrape's cumulative values
        self._last_at = 0.0  # monotonic
        self._view: TrafficView | None = None

    async def view(self) -> TrafficView:
        async with self._lock:
            if self._view is None or time.monotonic() - self._last_at >= self.min_interval_s:
                self._view = await self._scrape()
            return self._view

    async def _scrape(self) -> TrafficView:
        url = self._url().rstrip("/")
        now, mono = time.time(), time.monotonic()
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                metrics, recent = await asyncio.gather(client.get(f"{url}/metrics"),
                                                       client.get(f"{url}/v1/routing/recent"))
            for r in (metrics, recent):
                if r.status_code != 200:
                    raise RuntimeError(f"GET {r.request.url} answered {r.status_code}")
            routing = recent.json()
            current = {"ttft": parse_histogram(metrics.text, TTFT_HISTOGRAM),
                       "itl": parse_histogram(metrics.text, ITL_HISTOGRAM),
                       **{k: _counter_total(metrics.text, name) for k, name in _COUNTERS.items()},
                       "queue": _counter_total(metrics.text, _QUEUE_GAUGE)}
        except Exception as e:  # the view says it, and keeps what it had
            self._last_at = mono
            return TrafficView(endpoint_url=url, ok=False, error=f"{type(e).__name__}: {e}", scraped_at=now,
                               samples=list(self.samples), decisions=self._view.decisions if self._view else [])
        if self._last is not None and mono > self._last["mono"]:
            self.samples.append(self._sample(current, self._last, now, mono - self._last["mono"]))
        self._last = {**current, "mono": mono}
        self._last_at = mono
        return TrafficView(
            endpoint_url=url, ok=True, scraped_at=now, samples=list(self.samples),
            decisions=[RoutingDecisionView(**d) for d in list(routing.get("decisions", ()))[-self.max_decisions:]],
            zero_overlap_alarm=routing.get("zero_overlap_alarm"), inflight_requests=routing.get("inflight_requests"))

    @staticmethod
    def _sample(now: dict, before: dict, at: float, interval_s: float) -> TrafficSample:
        ttft, itl = bucket_delta(now["ttft"], before["ttft"]), bucket_delta(now["itl"], before["itl"])

        def rate(key: str) -> float:
            delta = now[key] - before[key]
            return (delta if delta >= 0 else now[key]) / interval_s  # a reset endpoint counts from zero

        return TrafficSample(at=at, interval_s=round(interval_s, 3), ttft_p50_s=histogram_quantile(0.5, ttft),
                             ttft_p90_s=histogram_quantile(0.9, ttft), itl_p50_s=histogram_quantile(0.5, itl),
                             itl_p90_s=histogram_quantile(0.9, itl), requests_per_s=rate("requests"),
                             tokens_per_s=rate("tokens"), queue_depth=now["queue"])
