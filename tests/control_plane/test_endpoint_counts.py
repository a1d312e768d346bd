"""The endpoint's counts over an interval, summed over its Serve replicas (pure): each replica's
counts minus its own previous ones, so that replicas that come, go or restart never read as a
reset of the whole endpoint; quantiles only after the sum."""

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from cluster.endpoint_counts import EndpointCounts, IntervalCounter, histogram_quantile
from cluster.ingress_replicas import endpoint_app

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Replica:
    """One replica's registry, with router/metrics.py's names and buckets."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("pdserve_ttft_seconds", "ttft", buckets=BUCKETS, registry=r)
        self.itl = Histogram("pdserve_itl_seconds", "itl", buckets=BUCKETS, registry=r)
        self.requests = Counter("pdserve_requests", "requests", ["status"], registry=r)
        self.tokens = Counter("pdserve_completion_tokens", "tokens", registry=r)
        self.queue = Gauge("pdserve_queue_depth", "in flight", registry=r)

    def serve(self, n, ttft_s, status="ok", tokens=4):
        for _ in range(n):
            self.ttft.observe(ttft_s)
            self.requests.labels(status).inc()
            self.tokens.inc(tokens)

    def counts(self) -> EndpointCounts:
        return EndpointCounts.parse(generate_latest(self.registry).decode())


def test_parse_reads_histograms_counters_over_labels_and_the_gauge():
    r = Replica()
    r.serve(3, 0.2)
    r.serve(1, 0.2, status="error")
    r.queue.set(2)
    c = r.counts()
    assert (c.num_requests, c.num_completion_tokens, c.queue_depth, c.num_first_tokens) == (4, 16, 2, 4)
    assert c.ttft[0.25] == 4 and c.itl[math.inf] == 0
    with pytest.raises(ValueError, match="pdserve_ttft_seconds"):
        EndpointCounts.parse("# nothing here\n")


def test_the_interval_sums_every_replicas_own_delta():
    a, b = Replica(), Replica()
    a.serve(10, 0.01)  # before the first read
    counter = IntervalCounter()
    first = counter.advance({"a": a.counts(), "b": b.counts()})
    assert first.num_requests == 10  # the first read counts everything
    a.serve(3, 0.01)
    b.serve(7, 2.0)
    c = counter.advance({"a": a.counts(), "b": b.counts()})
    assert (c.num_requests, c.num_first_tokens, c.num_completion_tokens) == (10, 10, 40)
    # p90 of the sum, not of either part: 7 of 10 are slow, so the p90 sits in the slow bucket
    assert 1 < histogram_quantile(0.9, c.ttft) <= 2.5
    assert histogram_quantile(0.9, a.counts().since(None).ttft) < 0.025  # one replica alone says "fast"


def test_replicas_that_come_go_or_restart_do_not_read_as_an_endpoint_reset():
    a, b = Replica(), Replica()
    a.serve(50, 0.01)
    b.serve(50, 0.01)
    counter = IntervalCounter()
    counter.advance({"a": a.counts(), "b": b.counts()})
    a.serve(2, 0.01)
    new = Replica()
    new.serve(3, 0.01)
    # b left (the summed cumulative count fell from 100 to 55): only the 2 + 3 new requests count
    c = counter.advance({"a": a.counts(), "c": new.counts()})
    assert c.num_requests == 5 and c.num_first_tokens == 5
    restarted = Replica()  # same id, counters from zero
    restarted.serve(4, 0.01)
    c = counter.advance({"a": restarted.counts(), "c": new.counts()})
    assert c.num_requests == 4 and c.num_first_tokens == 4


def test_queue_depth_is_summed_not_differenced():
    a, b = Replica(), Replica()
    a.queue.set(3)
    b.queue.set(4)
    counter = IntervalCounter()
    counter.advance({"a": a.counts(), "b": b.counts()})
    assert counter.advance({"a": a.counts(), "b": b.counts()}).queue_depth == 7


def test_the_endpoint_names_its_serve_app_in_its_metrics():
    r = Replica()
    assert endpoint_app(generate_latest(r.registry).decode()) is None
    Info("pdserve_endpoint", "app", registry=r.registry).info({"app": "t1234-control", "replica": "abc"})
    assert endpoint_app(generate_latest(r.registry).decode()) == "t1234-control"
