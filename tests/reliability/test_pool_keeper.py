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


def test_handles_pinned_for_a_dead_decode_worker_are_freed_at_once(cluster):
    """A decode worker that dies between a remote prefill and its READ leaves the prefill worker's
    blocks pinned; the pool keeper frees them when it sees the death, long before the lease ends."""
    import time

    from workers.protocol import PrefillRequest, SamplingParams

    (prefill_id,) = workers_of(cluster.url, "prefill")
    (reader,) = workers_of(cluster.url, "decode")
    prefill = actor_of(cluster, prefill_id)
    req = PrefillRequest("orphaned-1", tuple(range(10, 74)), SamplingParams(max_tokens=4, ignore_eos=True), None,
                         lease_ttl_s=120.0, reader_id=reader)
    handle = ray.get(prefill.prefill.remote(req))
    assert len(handle.block_ids) > 0

    def pinned():
        return workers_of(cluster.url, "prefill")[prefill_id]["pinned_blocks"]

    wait_for(lambda: pinned() == len(handle.block_ids), 10, "the handle's blocks pinned on the prefill worker")
    killed_at = time.monotonic()
    ray.kill(actor_of(cluster, reader))
    wait_for(lambda: pinned() == 0, 30, "the dead reader's pinned blocks freed")
    assert time.monotonic() - killed_at < 60  # the lease (120 s) did not do it
    # a prefill for the dead reader that finishes later is refused, and pins nothing
    with pytest.raises(ray.exceptions.RayTaskError, match="died before the prefill finished"):
        ray.get(prefill.prefill.remote(PrefillRequest("orphaned-2", tuple(range(80, 120)), req.sampling, None,
                                                      lease_ttl_s=120.0, reader_id=reader)))
    wait_for(lambda: workers_of(cluster.url, "decode") and reader not in workers_of(cluster.url, "decode"), 120,
             "the dead decode worker replaced")
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
