"""GET /cluster/traffic, the dashboard's view of the endpoint: latency samples from the endpoint's
own histograms, its recent routing decisions, and a clear error (not a failed view) when the
endpoint does not answer."""

from __future__ import annotations

import time

import httpx

from cluster.endpoint_traffic import EndpointTraffic
from tests.dashboard.conftest import TOKEN


def test_traffic_shows_the_endpoints_latencies_and_decisions(cluster, admin):
    first = admin.get("/cluster/traffic")
    assert first.status_code == 200 and first.json()["ok"], first.text
    assert first.json()["endpoint_url"] == cluster.url
    model = cluster.config.model.served_model_name
    for i in range(2):
        r = httpx.post(f"{cluster.url}/v1/completions", timeout=120, json={
            "model": model, "prompt": f"hello world {i}", "max_tokens": 5, "ignore_eos": True})
        assert r.status_code == 200, r.text
    time.sleep(1.0)  # the next scrape closes an interval that holds these requests (min 0.9 s apart)
    view = admin.get("/cluster/traffic").json()
    assert view["ok"] and view["error"] is None
    with_tokens = [s for s in view["samples"] if s["tokens_per_s"] > 0]
    assert with_tokens, view["samples"]
    s = with_tokens[-1]
    assert s["ttft_p50_s"] is not None and 0 < s["ttft_p50_s"] <= s["ttft_p90_s"]
    assert s["itl_p50_s"] is not None and s["requests_per_s"] > 0 and s["interval_s"] > 0
    ours = [d for d in view["decisions"] if d["prompt_tokens"] > 0]
    assert len(ours) >= 2 and {d["decode"] for d in ours} == {"decode-0"}
    assert view["inflight_requests"] == 0


def test_an_unreachable_endpoint_is_an_error_in_the_view_not_a_failure():
    import asyncio
    import socket
    from concurrent.futures import ThreadPoolExecutor

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    traffic = EndpointTraffic(lambda: f"http://127.0.0.1:{port}", min_interval_s=0.0, timeout_s=2)
    # its own thread: the package's Playwright (sync API) keeps an event loop running in this one
    with ThreadPoolExecutor(1) as pool:
        view = pool.submit(asyncio.run, traffic.view()).result(timeout=60)
    assert not view.ok and "ConnectError" in view.error and view.samples == [] and view.decisions == []
    assert TOKEN not in view.error
