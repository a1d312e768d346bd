"""etcd stops for 15 s under traffic: no request fails (serving goes on with the last known
membership, /ready stays 200), every worker keeps retrying its lease with backoff, and once etcd is
back the workers' keys are there and refreshed, the router's watch reconnects and re-reads the
membership, and a worker that joins afterwards enters routing.

This module runs its own etcd (the session's is shared with other tests) and its own cluster."""

import asyncio
import threading
import time

import aetcd
import httpx
import openai
import pytest
import ray

from cluster.keys import ClusterKeys
from tests.reliability.faults import actor_of, on_worker, routing, wait_for, workers_of

OUTAGE_S = 15


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    from cluster.etcd_server import LocalEtcd

    server = LocalEtcd(tmp_path_factory.mktemp("outage-etcd")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(pdserve_cluster, model_dir, etcd):
    c = pdserve_cluster(model_dir, prefix="etcd-outage", etcd__endpoints=[etcd.endpoint])
    yield c
    c.stop()  # before its etcd goes away


class Traffic:
    """Client threads sending short requests back to back; every outcome recorded with its time."""

    def __init__(self, url: str, num_threads: int = 3):
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        self.done = threading.Event()
        self.results: list[tuple[float, float, str | None]] = []  # (start, end, error)
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(num_threads)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        n = 0
        while not self.done.is_set():
            start, error = time.time(), None
            try:
                r = self.client.completions.create(model="tiny-llama", prompt=f"client {i} request {n} says",
                                                   max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
                if r.usage.completion_tokens != 4:
                    error = f"{r.usage.completion_tokens} tokens"
            except Exception as e:
                error = repr(e)
            self.results.append((start, time.time(), error))
            n += 1

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(120)


def registration_state(actor) -> dict:
    return on_worker(actor, lambda w: {"registered": w.registration.is_registered,
                                       "reachable": w.registration.is_etcd_reachable,
                                       "last_error": w.registration.last_error,
                                       "last_refresh_at": w.registration.last_refresh_at})


async def registered_ids(endpoint: str, cluster_name: str) -> set[str]:
    host, port = endpoint.rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port), timeout=5) as client:
        prefix = ClusterKeys(cluster_name).workers_prefix.encode()
        return {kv.key.decode().rsplit("/", 1)[1] for kv in await client.get_prefix(prefix)}


def test_serving_survives_an_etcd_outage_and_everything_resyncs(cluster, etcd):
    url = cluster.url
    actors = {wid: actor_of(cluster, wid) for wid in workers_of(url)}
    assert len(actors) == 2
    resyncs_before = routing(url)["etcd_resyncs"]
    traffic = Traffic(url)
    try:
        wait_for(lambda: sum(e is None for _, _, e in traffic.results) >= 5, 120, "traffic to flow")
        etcd.stop()
        down_at = time.time()
        wait_for(lambda: not routing(url)["etcd_connected"], 30, "the router to notice the outage")
        # workers keep serving and keep retrying their leases
        wait_for(lambda: all(not registration_state(a)["reachable"] for a in actors.values()), 30,
                 "every worker to notice the outage")
        assert all(registration_state(a)["last_error"] for a in actors.values())
        assert httpx.get(url + "/ready", timeout=30).status_code == 200  # the last known membership
        time.sleep(max(0.0, down_at + OUTAGE_S - time.time()))
        etcd.start()
        up_at = time.time()
        wait_for(lambda: routing(url)["etcd_connected"], 30, "the router's watch to reconnect")

        def refreshed():
            states = [registration_state(a) for a in actors.values()]
            return all(s["registered"] and s["reachable"] and s["last_refresh_at"] > up_at for s in states)

        wait_for(refreshed, 30, "every worker to refresh its lease")
        time.sleep(2)  # a little traffic after the recovery too
    finally:
        traffic.stop()
    failures = [r for r in traffic.results if r[2] is not None]
    assert not failures, f"{len(failures)} of {len(traffic.results)} requests failed: {failures[:3]}"
    during = [r for r in traffic.results if down_at < r[0] and r[1] < up_at]
    assert len(during) >= 3, "requests should have been served while etcd was down"
    assert routing(url)["etcd_resyncs"] > resyncs_before
    assert asyncio.run(registered_ids(etcd.endpoint, cluster.config.cluster_name)) == set(actors)
    # membership changes flow again: a new worker registers and enters routing
    ray.get(cluster.manager.scale.remote("decode", 2))
    wait_for(lambda: len([w for w in workers_of(url, "decode").values() if w["healthy"]]) == 2, 180,
             "a decode worker started after the outage to enter routing")


async def revoke_leases(endpoint: str, lease_ids: list[int]) -> None:
    host, port = endpoint.rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port), timeout=5) as client:
        for lease_id in lease_ids:
            await client.revoke_lease(lease_id)


def test_lapsed_registrations_of_answering_workers_lose_no_request(cluster, etcd):
    """Every worker's lease is revoked at once under traffic (what a keepalive starved on a loaded
    machine looks like): their keys vanish until each worker's next refresh (TTL/3) registers it
    again. Workers that still answer the router's polls stay routable meanwhile: no request fails."""
    url = cluster.url
    actors = {wid: actor_of(cluster, wid) for wid in workers_of(url)}
    registrations = {wid: on_worker(a, lambda w: w.registration.num_registrations) for wid, a in actors.items()}
    leases = [on_worker(a, lambda w: w.registration.lease_id) for a in actors.values()]
    traffic = Traffic(url)
    try:
        wait_for(lambda: sum(e is None for _, _, e in traffic.results) >= 5, 120, "traffic to flow")
        revoked_at = time.time()
        asyncio.run(revoke_leases(etcd.endpoint, leases))

        def registered_again():
            return all(on_worker(a, lambda w: w.registration.num_registrations) > registrations[wid]
                       for wid, a in actors.items())

        wait_for(registered_again, 30, "every worker to register again")
        time.sleep(1)
    finally:
        traffic.stop()
    failures = [r for r in traffic.results if r[2] is not None]
    assert not failures, f"{len(failures)} of {len(traffic.results)} requests failed: {failures[:3]}"
    assert [r for r in traffic.results if r[0] > revoked_at], "no request ran after the revocation"
    assert asyncio.run(registered_ids(etcd.endpoint, cluster.config.cluster_name)) == set(actors)
