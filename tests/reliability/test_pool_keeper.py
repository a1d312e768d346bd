"""A worker whose Ray actor dies is replaced (cluster/pool_keeper.py): the pool gets back to its
size, the new worker registers in etcd and takes traffic, the dead one is gone from routing and
from the manager's list, and the output is what it was before the death."""

import openai
import pytest
import ray

from tests.reliability.faults import actor_of, assert_no_leaks, wait_for, workers_of


@pytest.fixture(scope="module")
def cluster(pdserve_cluster, tiny_checkpoint):
    c = pdserve_cluster(tiny_checkpoint("llama"), prefix="keeper", server__replace_dead_workers=True,
                        server__health_check_interval_s=0.5)
    yield c
    c.stop()


def test_a_dead_decode_worker_is_replaced_and_serving_goes_on(cluster):
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="x", max_retries=0, timeout=120)

    def complete() -> str:
        return client.completions.create(model="tiny-llama", prompt="hello pdserve, hello world", max_tokens=8,
                                         temperature=0, extra_body={"ignore_eos": True}).choices[0].text

    want = complete()
    (dead,) = workers_of(cluster.url, "decode")
    ray.kill(actor_of(cluster, dead))

    def replacement():
        decode = workers_of(cluster.url, "decode")
        if dead in decode:
            return None
        return next((wid for wid, w in decode.items() if w.get("healthy")), None)

    new = wait_for(replacement, 120, "a new decode worker in routing in place of the dead one")
    listed = {w["worker_id"]: w for w in ray.get(cluster.manager.list_workers.remote())}
    assert dead not in listed
    assert listed[new]["state"] == "ready" and listed[new]["role"] == "decode"
    assert sum(w["role"] == "decode" for w in listed.values()) == 1, listed
    assert complete() == want
    assert_no_leaks(cluster.url)


def test_a_frozen_worker_is_not_replaced(cluster):
    """Only a dead actor counts: a worker that stops answering for longer than a ping's timeout
    (SIGSTOP here; a long GC pause in life) keeps its place and rejoins routing when it runs."""
    import time

    from cluster.pool_keeper import PING_TIMEOUT_S
    from tests.reliability.faults import freeze, pid_of, thaw

    (wid,) = workers_of(cluster.url, "decode")
    pid = pid_of(actor_of(cluster, wid))
    freeze(pid)
    try:
        time.sleep(PING_TIMEOUT_S + 2)  # several keeper rounds time out on it
    finally:
        thaw(pid)
    wait_for(lambda: workers_of(cluster.url).get(wid, {}).get("healthy"), 60, "the thawed worker back in routing")
    decode = [w for w in ray.get(cluster.manager.list_workers.remote()) if w["role"] == "decode"]
    assert [(w["worker_id"], w["state"]) for w in decode] == [(wid, "ready")]
