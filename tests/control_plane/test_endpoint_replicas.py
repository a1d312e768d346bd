"""An OpenAI endpoint with two Serve replicas (real Ray Serve, the package's cluster): the
autoscaler's latencies and the dashboard's traffic view count the requests that BOTH replicas
served. Serve's proxy sends each GET /metrics to one replica, so a plain scrape counts about half."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from cluster.autoscaler import LatencyScraper
from cluster.endpoint_counts import EndpointCounts
from cluster.ingress_replicas import IngressReplicas
from tests.control_plane.conftest import eventually

MAX_REQUESTS = 80  # both replicas have served some long before (4 at a time: Serve sends each to the less busy)


@pytest.fixture(scope="module")
def two_replica_url(cluster):
    """The cluster's endpoint once more, as its own Serve app with two replicas."""
    from ray import serve

    from cluster.launcher import config_as_dict
    from router.app import build_app

    app = f"{cluster.app_name}-two"
    raw = config_as_dict(cluster.config)
    raw["server"].update(ingress_replicas=2, ingress_num_cpus=0.05)  # what a user sets: server.ingress_replicas
    serve.run(build_app({"config": raw}), name=app, route_prefix=f"/{app}")
    cluster.extra_apps.append(app)  # removed with the cluster
    url = cluster.url.rsplit("/", 1)[0] + f"/{app}"
    eventually(lambda: httpx.get(f"{url}/ready", timeout=10).status_code == 200, 120, what="the two-replica app")
    # /ready answers once ONE replica does; the second may still be starting (then every request
    # lands on the first): wait for Serve to run both
    eventually(lambda: _running_replicas(app) == 2, 120, what="both replicas of the two-replica app")
    return url


def _running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


async def per_replica_requests(replicas: IngressReplicas) -> list[float]:
    return [EndpointCounts.parse(s.metrics_text).num_requests for s in await replicas.snapshots()]


async def test_both_replicas_requests_are_counted(cluster, admin, two_replica_url):
    import ray

    url, model = two_replica_url, cluster.config.model.served_model_name
    replicas = IngressReplicas(lambda: url)
    ray.get(cluster.manager.set_endpoint_url.remote(url))
    try:
        scraper = LatencyScraper(IngressReplicas(lambda: url))
        assert (await scraper.window()).num_replicas == 2  # the baseline
        before = admin.get("/cluster/traffic").json()  # the traffic view's baseline of this endpoint
        assert before["ok"] and before["endpoint_url"] == url and before["num_replicas"] == 2, before
        t0 = before["scraped_at"]
        # send until each replica has served some (then one replica's counts alone are short), 4 at a
        # time: Serve's router sends a request to the less busy of two replicas
        sent = 0

        async def one(client, i):
            r = await client.post(f"{url}/v1/completions", json={
                "model": model, "prompt": f"count me {i}", "max_tokens": 3, "ignore_eos": True})
            assert r.status_code == 200, r.text

        async with httpx.AsyncClient(timeout=120) as client:
            while sent < 4 or min(await per_replica_requests(replicas)) == 0:
                assert sent < MAX_REQUESTS, f"{sent} requests all went to one replica"
                await asyncio.gather(*(one(client, sent + i) for i in range(4)))
                sent += 4
        per_replica = await per_replica_requests(replicas)
        assert sum(per_replica) == sent and min(per_replica) > 0, per_replica

        # the autoscaler's reader: every first token of the interval, from both replicas
        window = await scraper.window()
        assert (window.num_first_tokens, window.num_replicas) == (sent, 2), window
        assert window.ttft_p90_s is not None and window.itl_p90_s is not None

        # the traffic view (served by the manager): requests counted == requests sent
        def counted():
            view = admin.get("/cluster/traffic").json()
            n = sum(s["num_requests"] for s in view["samples"] if s["at"] > t0)
            return view if view["ok"] and n >= sent else None

        view = eventually(counted, 30, what=f"the traffic view to count {sent} requests")
        after = [s for s in view["samples"] if s["at"] > t0]
        assert sum(s["num_requests"] for s in after) == sent, after
        assert sum(s["requests_per_s"] * s["interval_s"] for s in after) == pytest.approx(sent, rel=0.01)
        assert view["num_replicas"] == 2 and view["inflight_requests"] == 0
        ours = [d for d in view["decisions"] if d["at"] > t0]
        assert len(ours) == sent  # both replicas' routing decisions, merged

        # the manager's own autoscaler reads both replicas too
        status = eventually(lambda: (a := admin.get("/cluster").json()["autoscaling"])["endpoint_url"] == url
                            and a["last_window"] and a["last_window"]["num_replicas"] == 2 and a, 30,
                            what="the autoscaler to read the two-replica endpoint")
        assert status["endpoint_app"] == f"{cluster.app_name}-two" and status["last_scrape_error"] is None
    finally:
        ray.get(cluster.manager.set_endpoint_url.remote(cluster.url))


async def test_a_url_that_serves_no_pdserve_app_is_a_clear_error(cluster):
    nowhere = cluster.url.rsplit("/", 1)[0] + "/no-such-app"  # Serve's proxy, no app under that prefix
    with pytest.raises(RuntimeError, match="no-such-app/metrics answered 404"):
        await IngressReplicas(lambda: nowhere).snapshots()
