"""One live pdserve cluster for the whole control-plane package (real Ray, etcd, tiny llama), the
management API client with its token, and helpers that read etcd and the endpoint directly (the
ground truth the API's answers are checked against)."""

from __future__ import annotations

import asyncio
import secrets
import time

import aetcd
import httpx
import openai
import pytest

from cluster.keys import ClusterKeys

TOKEN = f"tok-{secrets.token_urlsafe(24)}"  # unique: the log test greps for it
BLOCK_BUDGET = 512  # blocks per node for the KV resizer (1 prefill + 1 decode start with 256 each)


@pytest.fixture(scope="package")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="package")
def cluster(pdserve_cluster, model_dir):
    import ray

    block_bytes = 2 * 3 * 4 * 2 * 16 * 4  # K+V x layers x block_size x kv heads x head dim x fp32 (tiny llama)
    c = pdserve_cluster(
        model_dir, prefix="control", server__admin_token=TOKEN, server__drain_timeout_s=60,
        pools__decode__max_replicas=3, pools__prefill__max_replicas=2,
        # prefill workers tuned on their own (the cluster's engine section has 128 / 16)
        pools__prefill__engine={"max_num_batched_tokens": 64, "max_num_seqs": 8},
        # the autoscaler runs (samples, decides) but is set never to act: the tests scale by hand
        autoscaling__enabled=True, autoscaling__interval_s=0.5, autoscaling__ttft_p90_target_s=1000,
        autoscaling__itl_p90_target_s=1000, autoscaling__queue_per_replica_high=10000,
        autoscaling__kv_usage_high=1.0, autoscaling__kv_usage_low=0.0,
        kv_quota__enabled=True, kv_quota__interval_s=1.0, kv_quota__node_kv_budget_bytes=BLOCK_BUDGET * block_bytes,
        kv_quota__min_blocks_per_worker=32,
    )
    # the endpoint is served under a route prefix here: tell the autoscaler where its metrics are
    ray.get(c.manager.set_endpoint_url.remote(c.url))
    yield c
    c.stop()


@pytest.fixture(scope="package")
def admin(cluster):
    with httpx.Client(base_url=cluster.admin_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def clear_kv_quota_overrides(request):
    """After each test on the shared cluster, hands every worker's KV quota back to the resizer: an
    override left by a test that failed midway would make the next module's resizer plan one worker
    fewer. Tests that do not use the cluster do not start it."""
    if "cluster" not in request.fixturenames:
        yield
        return
    import ray

    cluster, admin = request.getfixturevalue("cluster"), request.getfixturevalue("admin")
    yield
    for worker_id in ray.get(cluster.manager.kv_overrides.remote()):  # etcd, as the resizer reads them
        admin.delete(f"/cluster/kv-quota/{worker_id}")  # a worker already gone had its override dropped


@pytest.fixture(scope="package")
def oai(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def eventually(predicate, timeout_s: float = 60.0, interval_s: float = 0.2, what: str = "condition"):
    """Polls predicate() until it returns something truthy (returned); a liveness bound, not a speed check."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for: {what}")
        time.sleep(interval_s)


def etcd_workers(cluster, role: str) -> set[str]:
    """Worker ids registered in etcd (read directly, not through the API)."""
    async def read():
        host, port = cluster.config.etcd.endpoints[0].rsplit(":", 1)
        async with aetcd.Client(host=host, port=int(port), timeout=5) as client:
            prefix = ClusterKeys(cluster.config.cluster_name).role_prefix(role)
            return {kv.key.decode()[len(prefix):] for kv in await client.get_prefix(prefix.encode())}

    return asyncio.run(read())


def router_workers(cluster) -> set[str]:
    """Workers the endpoint's router currently knows and polls (its Prometheus gauges)."""
    text = httpx.get(cluster.url + "/metrics", timeout=30).text
    return {line.split('worker="', 1)[1].split('"', 1)[0] for line in text.splitlines()
            if line.startswith("pdserve_kv_total_blocks{")}


def recent_decisions(cluster) -> list[dict]:
    return httpx.get(cluster.url + "/v1/routing/recent", timeout=30).json()["decisions"]


def workers_of(admin, role: str, state: str = "ready") -> list[dict]:
    return [w for w in admin.get("/cluster/workers").json()["workers"] if w["role"] == role and w["state"] == state]


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    assert body["error"]["message"], body
    return body["error"]
