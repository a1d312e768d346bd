"""Decode workers that die or hang mid-stream. The endpoint migrates the request (prompt + the
tokens already streamed, to another decode worker) and the client's stream goes on with no gap and
no repeat: token-identical to an undisturbed run, greedy, seeded, penalised and grammar-constrained
(structured output: the new worker's grammar matcher replays the tokens so far) alike. With max_migrations
reached the stream ends with a clear error. An echo stream (prompt logprobs first) keeps them once. A hung worker (frozen: its etcd lease expires) leaves
routing, its request fails over, and once it runs again the blocks it held are freed. A worker
whose engine alone is stuck (its actor answers polls) leaves routing after
router.engine_stall_timeout_s (3 s here) and comes back once the engine moves again.

One cluster: 1 prefill + 3 decode workers. A high overlap weight makes every request for the same
long prompt go to the decode worker that caches it, so one kill hits three streams at once."""

import re
import time

import httpx
import openai
import pytest
import ray
from ray import serve

from tests.conftest import attach_ingress
from tests.reliability.faults import (actor_of, assert_no_leaks, freeze, hold_engine_steps, inflight, metric, pid_of,
                                      routing, slow_engine_steps, thaw, wait_for, workers_of)
from tests.reliability.recorder import StreamRecorder

PROMPT = ("Disaggregated serving splits prefill and decode into separate worker pools, and KV blocks "
          "move from the prefill worker to the decode worker without serialization. ") * 3
PROMPT_2 = "A quick brown fox jumps over the lazy dog while the router picks a worker. " * 3
PROMPT_3 = "Every decode step streams one token per request back through the router to its client. " * 3
ENGINE_STALL_TIMEOUT_S = 3
MAX_TOKENS = 40
SEEDED = dict(temperature=1.0, seed=1234)
GREEDY = dict(temperature=0.0)
# negative: the model repeats its own tokens, so tokens generated before a migration that stopped
# counting as output after it (counted as prompt) would change the stream at any kill point
PENALISED = dict(temperature=0.0, frequency_penalty=-1.0, presence_penalty=-1.0)
# a regex whose state depends on where the output is (3 digits, then "-"), longer than MAX_TOKENS
# tokens so that it never ends first
DIGITS = r"([0-9]{3}-){100}[0-9]+"
STRUCTURED = dict(temperature=1.0, seed=99, extra_body={"structured_outputs": {"regex": DIGITS}})


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def cluster(pdserve_cluster, model_dir):
    c = pdserve_cluster(model_dir, prefix="migration", pools__decode__replicas=3, router__overlap_weight=100,
                        router__engine_stall_timeout_s=ENGINE_STALL_TIMEOUT_S)
    yield c
    c.stop()  # frees the machine for the next module


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


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
    ref_penalised = stream(cluster.url, PROMPT, **PENALISED).result()
    ref_structured = stream(cluster.url, PROMPT, **STRUCTURED).result()
    assert ref_greedy.error is None and ref_seeded.error is None and ref_penalised.error is None
    assert ref_structured.error is None and re.fullmatch(r"([0-9]{3}-)*[0-9]{0,3}", ref_structured.text)
    assert ref_greedy.tokens != ref_seeded.tokens  # the seeded run really samples
    assert ref_greedy.tokens != ref_penalised.tokens  # the penalties matter
    owner = routing(cluster.url)["decisions"][-1]["decode"]  # caches PROMPT: the next requests go there
    migrations_before = metric(cluster.url, "pdserve_migrations_total")
    set_decode_delay(cluster, 0.1)  # ~4 s per stream: room to kill mid-stream
    try:
        streams = [stream(cluster.url, PROMPT, **GREEDY), stream(cluster.url, PROMPT, **SEEDED),
                   stream(cluster.url, PROMPT, **PENALISED), stream(cluster.url, PROMPT, **STRUCTURED),
                   stream(no_migration_url, PROMPT, **GREEDY)]
        for s in streams:
            s.wait_tokens(3)
        owner_actor = actor_of(cluster, owner)
        assert len(inflight(owner_actor)) == 5, "all five streams should run on the decode worker caching PROMPT"
        ray.kill(owner_actor)
        at_kill = [len(s.tokens) for s in streams]
        greedy, seeded, penalised, structured, unmigrated = (s.result() for s in streams)
    finally:
        set_decode_delay(cluster, 0)
    assert max(at_kill) < MAX_TOKENS, f"the kill came after a stream had finished ({at_kill} tokens)"
    assert_same_stream(greedy, ref_greedy)
    assert_same_stream(seeded, ref_seeded)
    assert_same_stream(penalised, ref_penalised)
    assert_same_stream(structured, ref_structured)
    # no migration allowed there: a clear error in the stream, after the tokens it had
    assert isinstance(unmigrated.error, openai.APIError), unmigrated.error
    assert "max_migrations" in str(unmigrated.error)
    assert unmigrated.tokens == ref_greedy.tokens[: len(unmigrated.tokens)]
    assert metric(cluster.url, "pdserve_migrations_total") - migrations_before == 4
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


def test_a_stuck_engine_leaves_routing_and_comes_back_when_it_moves(cluster):
    """Only the engine thread is stuck, inside a step; the actor answers every poll at once, from
    what the engine last published, with the age of its heartbeat."""
    ref = stream(cluster.url, PROMPT_3, **GREEDY).result()
    assert ref.error is None
    owner = routing(cluster.url)["decisions"][-1]["decode"]  # caches PROMPT_3: the next request goes there
    actor = actor_of(cluster, owner)
    migrations_before = metric(cluster.url, "pdserve_migrations_total")
    hold_engine_steps(actor)
    try:
        held = stream(cluster.url, PROMPT_3, **GREEDY)
        wait_for(lambda: inflight(actor), 30, "the request on the worker caching its prompt")
        wait_for(lambda: not workers_of(cluster.url)[owner]["healthy"], 30, "the stuck engine to leave routing")
        assert workers_of(cluster.url)[owner]["engine_stalled_s"] >= ENGINE_STALL_TIMEOUT_S
        assert metric(cluster.url, "pdserve_worker_engine_stalled_seconds") >= ENGINE_STALL_TIMEOUT_S
        # the management API's probe answers too (it reads what the engine last published)
        listed = httpx.get(f"{cluster.admin_url}/cluster/workers/{owner}", timeout=30,
                           headers={"Authorization": "Bearer test-token"}).json()
        assert listed["load"]["engine_stalled_s"] >= ENGINE_STALL_TIMEOUT_S and listed["load"]["engine_has_work"]
        other = stream(cluster.url, PROMPT_3, **GREEDY).result()  # would go to owner, which caches it
        assert other.error is None and routing(cluster.url)["decisions"][-1]["decode"] != owner
    finally:
        hold_engine_steps(actor, hold=False)
    wait_for(lambda: workers_of(cluster.url)[owner]["healthy"], 30, "the engine that moves again to rejoin")
    # under limits.worker_stall_timeout_s: the held request finished where it was, intact
    assert_same_stream(held.result(), ref)
    assert_same_stream(other, ref)
    assert metric(cluster.url, "pdserve_migrations_total") == migrations_before
    assert_no_leaks(cluster.url)


def test_killed_decode_worker_keeps_an_echo_streams_prompt_logprobs(cluster, tokenizer):
    """lm-eval's kind of request (echo + logprobs), streamed; its decode worker (the prompt logprobs
    came to it from the prefill worker's handle) is killed mid-stream: the prompt and its logprobs came once,
    in the first chunk, and the rest continues on another worker, token for token the undisturbed
    run (logprobs within fp32 noise: the new worker recomputes the prompt and the tokens so far)."""
    echo = dict(temperature=0.0, echo=True)
    n_prompt = len(tokenizer(PROMPT_2).input_ids)
    ref = stream(cluster.url, PROMPT_2, **echo).result()
    assert ref.error is None and len(ref.tokens) == n_prompt + MAX_TOKENS and ref.text.startswith(PROMPT_2)
    assert ref.logprobs[0] is None and all(lp is not None for lp in ref.logprobs[1:])
    migrations_before = metric(cluster.url, "pdserve_migrations_total")
    set_decode_delay(cluster, 0.1)
    try:
        s = stream(cluster.url, PROMPT_2, **echo)
        s.wait_tokens(n_prompt + 3)
        decision = routing(cluster.url)["decisions"][-1]
        assert decision["prefill"] is not None, decision  # the prefill worker computed the prompt logprobs
        owner = decision["decode"]
        ray.kill(actor_of(cluster, owner))
        at_kill = len(s.tokens)
        s.result()
    finally:
        set_decode_delay(cluster, 0)
    assert at_kill < n_prompt + MAX_TOKENS, "the kill came after the stream had finished"
    assert s.error is None, s.error
    assert s.tokens == ref.tokens and s.text == ref.text and s.usage.completion_tokens == MAX_TOKENS
    assert s.logprobs[0] is None and s.logprobs[1:n_prompt] == ref.logprobs[1:n_prompt]  # sent once, before the kill
    assert max(abs(a - b) for a, b in zip(s.logprobs[n_prompt:], ref.logprobs[n_prompt:])) < 1e-3
    assert metric(cluster.url, "pdserve_migrations_total") - migrations_before == 1
    wait_for(lambda: owner not in workers_of(cluster.url), 30, "the killed worker to leave routing")
    ray.get(cluster.manager.remove.remote(owner))
    assert_no_leaks(cluster.url)
