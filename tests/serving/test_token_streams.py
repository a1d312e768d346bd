"""One token stream per (router process, decode worker) (router.token_streams: per_worker, the
default) against a stream per request (per_request, a second endpoint over the same workers):
many concurrent requests share one subscription and each gets exactly its own tokens, equal to
the per-request path's; a cancelled run() frees its KV blocks; ending a subscription aborts every
request still running under it; a killed decode worker fails its subscription and the requests on
it migrate, token for token. Real Ray actors, etcd, a tiny llama; 1 prefill + 2 decode workers."""

from __future__ import annotations

import time
import uuid

import openai
import pytest
import ray
from ray import serve
from ray.exceptions import RayTaskError, TaskCancelledError

from tests.conftest import attach_ingress
from tests.reliability.faults import (actor_of, assert_no_leaks, inflight, metric, slow_engine_steps, wait_for,
                                      workers_of)
from tests.reliability.recorder import StreamRecorder
from workers.protocol import GenerateRequest, RequestFailedError, SamplingParams

PROMPTS = [f"request {i}: KV blocks move from prefill to decode, number {i * 7}" for i in range(12)]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def cluster(pdserve_cluster, tiny_checkpoint):
    c = pdserve_cluster(tiny_checkpoint("llama"), prefix="token-streams", pools__decode__replicas=2)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def per_request_url(cluster):
    yield attach_ingress(cluster, "token-streams-per-request", router__token_streams="per_request")
    serve.delete(f"{cluster.app_name}-token-streams-per-request", _blocking=False)


@pytest.fixture(scope="module")
def decode_actors(cluster) -> dict:
    ids = wait_for(lambda: (lambda w: w if len(w) == 2 else None)(workers_of(cluster.url, "decode")), 60,
                   "2 decode workers")
    return {wid: actor_of(cluster, wid) for wid in sorted(ids)}


def streams(url: str, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[StreamRecorder]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=180)
    out = [StreamRecorder(client, "tiny-llama", p, max_tokens, temperature=0) for p in prompts]
    for s in out:
        s.start()
    return out


def subscriptions(actors: dict) -> dict[str, dict[str, int]]:
    return {wid: ray.get(a.subscriptions.remote(), timeout=30) for wid, a in actors.items()}


def test_concurrent_requests_share_one_subscription_and_get_their_own_tokens(cluster, per_request_url,
                                                                             decode_actors):
    want = [s.result() for s in streams(per_request_url, PROMPTS)]
    got = [s.result() for s in streams(cluster.url, PROMPTS)]
    for w, g in zip(want, got):
        assert w.error is None and g.error is None, (w.error, g.error)
        assert len(g.tokens) == MAX_TOKENS and g.finish_reason == "length"
        assert g.tokens == w.tokens and g.text == w.text
    assert len({tuple(g.tokens) for g in got}) > 1  # the prompts really differ: no request got another's
    subs = subscriptions(decode_actors)
    # the per_worker endpoint (one replica) holds at most one subscription per decode worker, and
    # the per_request endpoint none; every request has finished: nothing runs under them
    assert all(len(s) <= 1 for s in subs.values()), subs
    assert sum(len(s) for s in subs.values()) >= 1, subs
    assert all(n == 0 for s in subs.values() for n in s.values()), subs
    assert_no_leaks(cluster.url)


def _run_request(sid: str, prompt: list[int], prefill_ids=()) -> GenerateRequest:
    return GenerateRequest(f"ts-{uuid.uuid4().hex[:8]}", tuple(prompt),
                           SamplingParams(max_tokens=400, temperature=0, ignore_eos=True),
                           cache_salt=uuid.uuid4().hex, prefill_candidates=tuple(prefill_ids), subscriber_id=sid)


def _raises_cancelled(ref) -> bool:
    try:
        ray.get(ref, timeout=60)
    except (TaskCancelledError, RayTaskError):
        return True
    return False


def test_cancelled_run_and_ended_subscription_free_kv(cluster, decode_actors):
    wid, decode = next(iter(decode_actors.items()))
    prefill_ids = tuple(workers_of(cluster.url, "prefill"))
    sid = f"test-{uuid.uuid4().hex[:8]}"
    slow_engine_steps(decode, 0.05)  # 400 tokens take 20 s: every request is still running below
    try:
        sub = decode.subscribe.options(num_returns="streaming").remote(sid)
        reqs = [_run_request(sid, list(range(3 + i, 40 + i)), prefill_ids if i % 2 else ()) for i in range(4)]
        refs = [decode.run.remote(r) for r in reqs]
        seen: dict[str, list[int]] = {}
        while len(seen) < len(reqs):  # one item carries deltas of several requests
            for d in ray.get(next(sub), timeout=60):
                seen.setdefault(d.request_id, []).extend(d.token_ids)
        assert set(seen) == {r.request_id for r in reqs}
        assert ray.get(decode.subscriptions.remote(), timeout=30)[sid] == len(reqs)  # (the router's is there too)

        ray.cancel(refs[0])  # a request left early (client gone): aborted, its blocks freed
        assert _raises_cancelled(refs[0])
        wait_for(lambda: reqs[0].request_id not in inflight(decode), 30, "the cancelled request to end")
        assert sorted(inflight(decode)) == sorted(r.request_id for r in reqs[1:])

        ray.cancel(sub)  # the router's stream ends: every request still running under it is aborted
        assert all(_raises_cancelled(ref) for ref in refs[1:])
        wait_for(lambda: not inflight(decode), 30, "the subscription's requests to be aborted")
        assert sid not in ray.get(decode.subscriptions.remote(), timeout=30)
        with pytest.raises(RequestFailedError, match="has ended"):  # nobody reads it any more
            ray.get(decode.run.remote(_run_request(sid, [5, 6, 7, 8])), timeout=60)
    finally:
        slow_engine_steps(decode, 0)
    wait_for(lambda: ray.get(decode.stats.remote(), timeout=30).num_used_blocks == 0, 30,
             f"{wid} to free every KV block")
    assert_no_leaks(cluster.url)  # the prefill worker's pinned blocks too


def test_a_subscription_is_a_lease_its_requests_end_when_it_is_not_renewed(cluster, decode_actors):
    """Ray ends neither a streaming call nor the caller's other calls when the caller dies, so the
    worker learns that a router is gone from its missing renewals: renewed, a subscription lives
    past its TTL; not renewed, the worker ends it within the TTL and aborts its requests."""
    wid, decode = next(iter(decode_actors.items()))
    sid, ttl_s = f"lease-{uuid.uuid4().hex[:8]}", 2.0
    slow_engine_steps(decode, 0.05)  # 400 tokens take 20 s: still running when the lease runs out
    try:
        sub = decode.subscribe.options(num_returns="streaming").remote(sid, ttl_s)
        req = _run_request(sid, list(range(3, 40)))
        ref = decode.run.remote(req)
        assert ray.get(next(sub), timeout=60)[0].request_id == req.request_id  # it runs
        t_end = time.monotonic() + 2 * ttl_s
        while time.monotonic() < t_end:  # a live router renews every TTL / 4
            assert ray.get(decode.renew_subscription.remote(sid), timeout=30) is True
            time.sleep(ttl_s / 4)
        assert ray.get(decode.subscriptions.remote(), timeout=30)[sid] == 1
        # the router "dies": no more renewals
        wait_for(lambda: sid not in ray.get(decode.subscriptions.remote(), timeout=30), 30,
                 "the unrenewed subscription to end")
        assert _raises_cancelled(ref)
        assert ray.get(decode.renew_subscription.remote(sid), timeout=30) is False
        wait_for(lambda: req.request_id not in inflight(decode), 30, "its request to be aborted")
    finally:
        slow_engine_steps(decode, 0)
    wait_for(lambda: ray.get(decode.stats.remote(), timeout=30).num_used_blocks == 0, 30,
             f"{wid} to free every KV block")


def test_killed_decode_worker_fails_its_subscription_and_requests_migrate(cluster, per_request_url, decode_actors):
    prompts = PROMPTS[:6]
    want = [s.result() for s in streams(per_request_url, prompts, max_tokens=40)]
    migrations_before = metric(cluster.url, "pdserve_migrations_total")
    victim = None
    for a in decode_actors.values():
        slow_engine_steps(a, 0.1)  # ~4 s per stream: room to kill mid-stream
    try:
        running = streams(cluster.url, prompts, max_tokens=40)
        for s in running:
            s.wait_tokens(3)
        on = {wid: inflight(a) for wid, a in decode_actors.items()}
        victim = max(on, key=lambda wid: len(on[wid]))
        assert on[victim], on
        ray.kill(decode_actors[victim])
        got = [s.result() for s in running]
    finally:
        for wid, a in decode_actors.items():
            if wid != victim:
                slow_engine_steps(a, 0)
    for w, g in zip(want, got):
        assert g.error is None, f"the stream failed: {g.error!r}"
        assert g.tokens == w.tokens and g.text == w.text  # no gap, no repeat
    assert metric(cluster.url, "pdserve_migrations_total") - migrations_before == len(on[victim])
    wait_for(lambda: victim not in workers_of(cluster.url), 30, "the killed worker to leave routing")
    ray.get(cluster.manager.remove.remote(victim))
    assert_no_leaks(cluster.url)
