"""EndpointCounts: what the OpenAI endpoint counted, read from one replica's Prometheus text, and
IntervalCounter, which turns every replica's cumulative counts into the whole endpoint's counts
over the interval since the previous read.

Each Serve replica of the endpoint counts only the requests it served. The whole endpoint's
interval is the sum over replicas of (that replica's counts now - its own counts last time), i.e.
Prometheus' sum(increase(x)), never increase(sum(x)): a replica that leaves or restarts would make
a sum go down and read as a reset of the whole endpoint.

    replica a   cumulative  10 ---> 14        delta 4
    replica b   cumulative   7 ---> 12        delta 5     endpoint: 9 in the interval
    replica c   (new)            -> 3         delta 3     (+3: all it counted is new)

Quantiles are taken only after the sum: quantiles of parts do not add.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

TTFT_HISTOGRAM = "pdserve_ttft_seconds"
ITL_HISTOGRAM = "pdserve_itl_seconds"
REQUESTS_COUNTER = "pdserve_requests"  # finished requests by status (rejected ones included)
COMPLETION_TOKENS_COUNTER = "pdserve_completion_tokens"
QUEUE_GAUGE = "pdserve_queue_depth"


# -- Prometheus text, pure --------------------------------------------------------------------
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


def counter_total(text: str, name: str) -> float:
    """A counter's (or gauge's) value summed over its label sets; 0 if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name in (name, name.removesuffix("_total")):
            total += sum(s.value for s in family.samples if s.name in (name, f"{name}_total"))
    return total


def bucket_delta(now: Mapping[float, float], before: Mapping[float, float] | None) -> dict[float, float]:
    """Observations between two reads of one replica, per bucket. A count that went down means the
    replica restarted (counters reset): then everything counted now is new."""
    if not before or any(now.get(le, 0.0) < before.get(le, 0.0) for le in now):
        return dict(now)
    return {le: now[le] - before.get(le, 0.0) for le in now}


def histogram_quantile(q: float, cumulative: Mapping[float, float]) -> float | None:
    """The q-quantile of cumulative buckets, linearly interpolated in its bucket (lower bound of
    the first bucket: 0), as Prometheus' histogram_quantile. None without observations; the
    highest finite bound if it falls in +Inf."""
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


# -- one replica's counts, and the endpoint's --------------------------------------------------
@dataclass(frozen=True)
class EndpointCounts:
    """Cumulative counts of one replica (parse), or counts over an interval (since, total)."""

    ttft: Mapping[float, float]  # cumulative histogram buckets {upper bound: count}
    itl: Mapping[float, float]
    num_requests: float  # finished requests, any status
    num_completion_tokens: float
    queue_depth: float  # a gauge: requests in flight when read (summed, never differenced)

    @classmethod
    def parse(cls, text: str) -> "EndpointCounts":
        """From one replica's Prometheus text (its GET /metrics). Raises ValueError when the text
        has no TTFT/ITL histogram (not a pdserve endpoint)."""
        ttft, itl = parse_histogram(text, TTFT_HISTOGRAM), parse_histogram(text, ITL_HISTOGRAM)
        for name, buckets in ((TTFT_HISTOGRAM, ttft), (ITL_HISTOGRAM, itl)):
            if not buckets:
                raise ValueError(f"no histogram {name} in the endpoint's metrics")
        return cls(ttft, itl, counter_total(text, REQUESTS_COUNTER), counter_total(text, COMPLETION_TOKENS_COUNTER),
                   counter_total(text, QUEUE_GAUGE))

    def since(self, before: "EndpointCounts | None") -> "EndpointCounts":
        """This replica's counts since ``before`` (its own previous read; None: all of them)."""
        if before is None:
            return self

        def delta(now: float, then: float) -> float:
            return now if now < then else now - then  # went down: the replica restarted

        return EndpointCounts(bucket_delta(self.ttft, before.ttft), bucket_delta(self.itl, before.itl),
                              delta(self.num_requests, before.num_requests),
                              delta(self.num_completion_tokens, before.num_completion_tokens), self.queue_depth)

    @staticmethod
    def total(parts: Iterable["EndpointCounts"]) -> "EndpointCounts":
        """The sum over replicas: bucket by bucket, counter by counter, gauge by gauge."""
        ttft: dict[float, float] = collections.defaultdict(float)
        itl: dict[float, float] = collections.defaultdict(float)
        requests = tokens = queue = 0.0
        for p in parts:
            for le, n in p.ttft.items():
                ttft[le] += n
            for le, n in p.itl.items():
                itl[le] += n
            requests, tokens, queue = requests + p.num_requests, tokens + p.num_completion_tokens, queue + p.queue_depth
        return EndpointCounts(dict(ttft), dict(itl), requests, tokens, queue)

    @property
    def num_first_tokens(self) -> int:
        """TTFT observations: requests that got their first token."""
        return int(self.ttft.get(math.inf, 0.0))


class IntervalCounter:
    """advance({replica id: cumulative counts}) -> the endpoint's counts since the previous call.

    A replica seen for the first time counts whole (it started since the previous call, or this
    is the first call). A replica gone since the previous call is forgotten: what it counted after
    that call is lost with it."""

    def __init__(self) -> None:
        self._last: dict[str, EndpointCounts] = {}

    def advance(self, replicas: Mapping[str, EndpointCounts]) -> EndpointCounts:
        deltas = [counts.since(self._last.get(replica_id)) for replica_id, counts in replicas.items()]
        self._last = dict(replicas)
        return EndpointCounts.total(deltas)
