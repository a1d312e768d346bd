"""Cluster lifecycle seen from the endpoint: scaling to 2 + 2 keeps outputs exact, workers that
join or leave etcd join or leave routing within the lease TTL, and a client that disconnects
mid-stream leaves no KV block in use on any worker."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray

from tests.workers.engine.helpers import hf_greedy


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("qwen3")


@pytest.fixture(scope="module")
def cluster(pdserve_cluster, model_dir):
    c = pdserve_cluster(model_dir, prefix="lifecycle")
    yield c
    c.stop()


def routed_workers(cluster) -> dict:
    return httpx.get(cluster.url + "/v1/routing/recent", timeout=30).json()["workers"]


def wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def used_blocks(cluster) -> dict[str, int]:
    return {wid: w["used_blocks"] for wid, w in routed_workers(cluster).items()}


def test_scale_to_two_plus_two_keeps_greedy_exact(cluster, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ray.get(cluster.manager.scale.remote("prefill", 2))
    ray.get(cluster.manager.scale.remote("decode", 2))
    wait_for(lambda: sum(w["healthy"] for w in routed_workers(cluster).values()) == 4, 120, "4 routed workers")
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="x", max_retries=0, timeout=120)
    prompts = [f"request number {i} about KV blocks" for i in range(8)]

    def complete(p):
        return client.completions.create(model="tiny-qwen3", prompt=p, max_tokens=10, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(8) as pool:  # concurrent: the router must spread them by load
        got = list(pool.map(complete, prompts))
    for p, text in zip(prompts, got):
        assert text == tok.decode(hf_greedy(model_dir, tok(p).input_ids, 10), skip_special_tokens=True)
    decisions = httpx.get(cluster.url + "/v1/routing/recent", timeout=30).json()["decisions"][-8:]
    assert {d["decode"] for d in decisions} == {"decode-0", "decode-1"}, decisions
    assert {d["prefill"] for d in decisions} == {"prefill-0", "prefill-1"}, decisions


def test_membership_follows_etcd_within_ttl(cluster):
    before = set(routed_workers(cluster))
    ray.get(cluster.manager.scale.remote("decode", 3))
    wait_for(lambda: len(set(routed_workers(cluster)) - before) == 1, 120, "the new worker in routing")
    new = (set(routed_workers(cluster)) - before).pop()
    # a hung worker: killed without deregistering -> its etcd lease (TTL 3 s) expires -> it leaves routing
    actor = ray.get(cluster.manager.actor_of.remote(new))
    ray.kill(actor)
    t0 = time.monotonic()
    wait_for(lambda: new not in routed_workers(cluster), 3 + 10, "the killed worker to leave routing")
    assert time.monotonic() - t0 < 3 + 10
    ray.get(cluster.manager.remove.remote(new))


def test_client_disconnect_frees_kv_on_both_workers(cluster):
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="x", max_retries=0, timeout=120)
    stream = client.completions.create(model="tiny-qwen3", prompt="a long story " * 20, max_tokens=400,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the client goes away mid-stream
    wait_for(lambda: all(v == 0 for v in used_blocks(cluster).values()), 30, "every worker to free its KV blocks")
