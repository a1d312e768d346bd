"""Prefill workers that die or hang while serving a request. The decode worker retries the next
ranked prefill worker (and, when none is left, prefills locally, counted as a fallback); the
request completes with the same greedy output as an undisturbed run, and no KV block stays in use
or pinned on any surviving worker.

Expected outputs come from transformers' generate (a reference run through the cluster would
leave the prompt cached on the decode worker, and there would be nothing left to transfer).

One cluster: 3 prefill + 1 decode. Each test removes the prefill worker it broke."""

import time

import openai
import pytest
import ray

from tests.reliability.faults import (actor_of, assert_no_leaks, counters, freeze, hold_kv_reads, inflight,
                                      num_held_reads, pid_of, pinned_leases, slow_engine_steps, thaw, wait_for,
                                      workers_of)

MAX_TOKENS = 8
PREFILL_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def cluster(pdserve_cluster, model_dir):
    c = pdserve_cluster(model_dir, prefix="prefill-faults", pools__prefill__replicas=3,
                        transfer__deadline_s=5, limits__prefill_timeout_s=PREFILL_TIMEOUT_S)
    yield c
    c.stop()  # frees the machine for the next module


@pytest.fixture(scope="module")
def greedy(model_dir):
    """prompt (text or token ids) -> the text transformers' greedy generate gives."""
    from transformers import AutoTokenizer

    from tests.workers.engine.helpers import hf_greedy

    tok = AutoTokenizer.from_pretrained(model_dir)

    def expected(prompt):
        ids = prompt if isinstance(prompt, list) else tok(prompt).input_ids
        return tok.decode(hf_greedy(model_dir, ids, MAX_TOKENS), skip_special_tokens=True)

    return expected


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="x", max_retries=0, timeout=180)


class Completion:
    """A non-streamed completion on its own thread."""

    def __init__(self, client, prompt):
        import threading

        self.text, self.error = None, None

        def run():
            try:
                r = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=MAX_TOKENS,
                                              temperature=0, extra_body={"ignore_eos": True})
                self.text = r.choices[0].text
            except Exception as e:
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout_s=180) -> str:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the request did not finish"
        assert self.error is None, f"the request failed: {self.error!r}"
        return self.text


def prefill_actors(cluster) -> dict:
    return {wid: actor_of(cluster, wid) for wid in workers_of(cluster.url, "prefill")}


def decode_actor(cluster):
    (wid,) = workers_of(cluster.url, "decode")
    return actor_of(cluster, wid)


def remove(cluster, worker_id):
    ray.get(cluster.manager.remove.remote(worker_id))
    wait_for(lambda: worker_id not in workers_of(cluster.url), 30, f"{worker_id} to leave routing")


def test_a_prompt_the_decode_worker_holds_whole_needs_no_read(cluster, client, greedy):
    """A prompt of whole blocks, already cached on the decode worker: the prefill worker's handle
    brings the first token and there is nothing to transfer; not a failed transfer."""
    prompt = list(range(40, 40 + 24))  # 24 token ids = 6 full blocks of 4
    decode = decode_actor(cluster)
    before = counters(decode)
    assert [Completion(client, prompt).result() for _ in range(2)] == [greedy(prompt)] * 2
    after = counters(decode)
    assert after["num_transfers"] == before["num_transfers"] + 1  # the second request read nothing
    assert (after["num_prefill_retries"], after["num_prefill_fallbacks"]) == \
        (before["num_prefill_retries"], before["num_prefill_fallbacks"])
    assert_no_leaks(cluster.url)


def test_prefill_killed_during_prefill_is_retried_on_another(cluster, client, greedy):
    prompt = "The capital of France is Paris. The capital of Germany is Berlin. " * 3
    want = greedy(prompt)
    actors = prefill_actors(cluster)
    before = counters(decode_actor(cluster))
    for a in actors.values():
        slow_engine_steps(a, 1.0)  # each prefill step takes > 1 s: the kill lands inside one
    try:
        req = Completion(client, prompt)
        victim = wait_for(lambda: next((wid for wid, a in actors.items() if inflight(a)), None), 60,
                          "a prefill worker to start the prefill")
        ray.kill(actors[victim])
        assert req.result() == want
    finally:
        for wid, a in actors.items():
            if wid != victim:
                slow_engine_steps(a, 0)
    after = counters(decode_actor(cluster))
    assert after["num_prefill_retries"] == before["num_prefill_retries"] + 1
    assert after["num_prefill_fallbacks"] == before["num_prefill_fallbacks"]
    remove(cluster, victim)
    assert_no_leaks(cluster.url)


def test_prefill_killed_during_the_kv_transfer_is_retried_on_another(cluster, client, greedy):
    prompt = "KV blocks move from the prefill worker to the decode worker without serialization. " * 2
    want = greedy(prompt)
    actors = prefill_actors(cluster)
    decode = decode_actor(cluster)
    before = counters(decode)
    hold_kv_reads(decode, 2.0)  # handle received, blocks reserved, READ not yet issued: kill now
    try:
        req = Completion(client, prompt)
        wait_for(lambda: num_held_reads(decode) >= 1, 60, "the decode worker to reach the KV READ")
        victim = next(wid for wid, a in actors.items() if pinned_leases(a))
        ray.kill(actors[victim])
        assert req.result() == want
    finally:
        hold_kv_reads(decode, 0)
    after = counters(decode)
    assert after["num_prefill_retries"] == before["num_prefill_retries"] + 1
    assert after["num_prefill_fallbacks"] == before["num_prefill_fallbacks"]
    remove(cluster, victim)
    assert_no_leaks(cluster.url)


def test_hung_prefill_times_out_and_the_decode_worker_prefills_locally(cluster, client, greedy):
    prompt = "hello world, hello pdserve! 0123456789 and a few more words to prefill. " * 2
    want = greedy(prompt)
    (last_id, last), = prefill_actors(cluster).items()
    decode = decode_actor(cluster)
    before = counters(decode)
    slow_engine_steps(last, 1.0)
    pid = pid_of(last)
    try:
        req = Completion(client, prompt)
        wait_for(lambda: inflight(last), 60, "the prefill to start")
        freeze(pid)  # hung mid-prefill: the decode worker's wait ends at limits.prefill_timeout_s
        t0 = time.monotonic()
        assert req.result() == want
        assert time.monotonic() - t0 >= PREFILL_TIMEOUT_S - 1
    finally:
        thaw(pid)
    after = counters(decode)
    assert after["num_prefill_fallbacks"] == before["num_prefill_fallbacks"] + 1
    slow_engine_steps(last, 0)
    # running again, it rejoins routing, and the prefill the decode side cancelled holds nothing
    wait_for(lambda: workers_of(cluster.url).get(last_id, {}).get("healthy"), 60, "the thawed worker to rejoin")
    assert_no_leaks(cluster.url)
