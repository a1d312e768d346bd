"""Decode workers that die or hang mid-stream. The endpoint migrates the request (prompt + the
tokens already streamed, to another decode worker) and the client's stream goes on with no gap and
no repeat: token-identical to an undisturbed run, greedy and seeded alike. With max_migrations
reached the stream ends with a clear error. A hung worker (frozen: its etcd lease expires) leaves
routing, its request fails over, and once it runs again the blocks it held are freed.

One cluster: 1 prefill + 3 decode workers. A high overlap weight makes every request for the same
long prompt go to the decode worker that caches it, so one kill hits three streams at once."""

import time

import openai
import pytest
import ray
from ray import serve

from tests.conftest import attach_ingress
from tests.reliability.faults import (actor_of, assert_no_leaks, freeze, inflight, metric, pid_of, routing,
                                      slow_engine_steps, thaw, wait_for, workers_of)
from tests.reliability.recorder import StreamRecorder

PROMPT = ("Disaggregated serving splits prefill and decode into separate worker pools, and KV blocks "
          "move from the prefill worker to the decode worker without serialization. ") * 3
PROMPT_2 = "A quick brown fox jumps over the lazy dog while the router picks a worker. " * 3
MAX_TOKENS = 40
SEEDED = dict(temperature=1.0, seed=1234)
GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def cluster(pdserve_cluster, model_dir):
    c = pdserve_cluster(model_dir, prefix="migration", pools__decode__replicas=3, router__overlap_weight=100)
    yield c
    c.stop()  # frees the machine for the next module


@pytest.fixture(scope="module")
def no_migration_url(cluster):
    """A second endpoint over the same workers that allows no migration."""
    yield attach_ingress(cluster, "migration-none", limits__max_migrations=0, router__overlap_weight=100)
    serve.delete(f"{cluster.app_name}-migration-none", _blocking=False)  # cluster.stop() follows


def client_for(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=180)


def stream(url, prompt, **params) -> StreamRecorder:
    r = StreamRecorder(client_for(url), "tiny-llama", prompt, MAX_TOKENS, **params)
    r.start()
    return r


def decode_actors(cluster) -> dict:
    return {wid: actor_of(cluster, wid) for wid in workers_of(cluster.url, "decode")}


def set_decode_delay(cluster, delay_s):
    for actor in decode_actors(cluster).values():
        slow_engine_steps(actor, delay_s)


def assert_same_stream(got: StreamRecorder, want: StreamRecorder):
    assert got.error is None, f"the stream failed: {got.error!r}"
    assert got.tokens == want.tokens, "tokens differ from the undisturbed run (gap, repeat or divergence)"
    assert got.text == want.text
    assert len(got.tokens) == MAX_TOKENS and got.usage.completion_tokens == MAX_TOKENS
    assert got.finish_reason == "length"


def test_killed_decode_worker_migrates_streams_token_identically(cluster, no_migration_url):
    ref_greedy = stream(cluster.url, PROMPT, **GREEDY).result()
    ref_seeded = stream(cluster.url, PROMPT, **SEEDED).result()
    assert ref_greedy.error is None and ref_seeded.error is None
    assert ref_greedy.tokens != ref_seeded.tokens  # the seeded run really samples
    owner = routing(cluster.url)["decisions"][-1]["decode"]  # caches PROMPT: the next requests go there
    migrations_before = metric(cluster.url, "pdserve_migrations_total")
    set_decode_delay(cluster, 0.1)  # ~4 s per stream: room to kill mid-stream
    try:
        streams = [stream(cluster.url, PROMPT, **GREEDY), stream(cluster.url, PROMPT, **SEEDED),
                   stream(no_migration_url, PROMPT, **GREEDY)]
        for s in streams:
            s.wait_tokens(3)
        owner_actor = actor_of(cluster, owner)
        assert len(inflight(owner_actor)) == 3, "all three streams should run on the decode worker caching PROMPT"
        ray.kill(owner_actor)
        at_kill = [len(s.tokens) for s in streams]
        greedy, seeded, unmigrated = (s.result() for s in streams)
    finally:
        set_decode_delay(cluster, 0)
    assert max(at_kill) < MAX_TOKENS, f"the kill came after a stream had finished ({at_kill} tokens)"
    assert_same_stream(greedy, ref_greedy)
    assert_same_stream(seeded, ref_seeded)
    # no migration allowed there: a clear error in the stream, after the tokens it had
    assert isinstance(unmigrated.error, openai.APIError), unmigrated.error
    assert "max_migrations" in str(unmigrated.error)
    assert unmigrated.tokens == ref_greedy.tokens[: len(unmigrated.tokens)]
    assert metric(cluster.url, "pdserve_migrations_total") - migrations_before == 2
    wait_for(lambda: owner not in workers_of(cluster.url), 30, "the killed worker to leave routing")
    ray.get(cluster.manager.remove.remote(owner))
    assert_no_leaks(cluster.url)


def test_hung_decode_worker_leaves_routing_and_its_stream_fails_over(cluster):
    ref = stream(cluster.url, PROMPT_2, **GREEDY).result()
    assert ref.error is None
    actors = decode_actors(cluster)
    set_decode_delay(cluster, 0.1)
    frozen = None
    try:
        s = stream(cluster.url, PROMPT_2, **GREEDY)
        s.wait_tokens(3)
        owner = next(wid for wid, a in actors.items() if inflight(a))
        frozen = pid_of(actors[owner])
        freeze(frozen)  # hung: no tokens, no poll answers, no etcd keepalive (lease TTL 3 s)
        t0 = time.monotonic()
        s.result()
        assert_same_stream(s, ref)
        # it failed over because the worker left routing when its lease expired, not by a deadline
        assert owner not in workers_of(cluster.url)
        assert time.monotonic() - t0 < 60
    finally:
        if frozen is not None:
            thaw(frozen)
        for actor in actors.values():
            slow_engine_steps(actor, 0)
    # running again: it re-registers, rejoins routing, and the cancelled request's blocks are free
    wait_for(lambda: workers_of(cluster.url).get(owner, {}).get("healthy"), 60, "the thawed worker to rejoin")
    assert_no_leaks(cluster.url)
