"""KV transfer modes through real workers (Ray actors, real NIXL, etcd): layer-wise streaming
(transfer.layerwise: the decode worker reserves its blocks, the prefill worker WRITEs each layer
as its forward pass finishes it) against whole-request READs and against colocated prefill, token
for token; a stale handshake renewed once inside a READ; a prefill worker killed mid-stream.
After each, no KV block is used or pinned on any worker. Penalties (presence, frequency,
repetition) through the endpoint with the official openai client, and the same penalised request
colocated, whole-request and layer-wise: the same tokens; so with structured output (a JSON
schema). Prompt logprobs: computed by the prefill worker, handed on in its KV handle, equal to an
engine alone's; a one-token request moves no KV.

Requests go straight to the decode worker's generate (a GenerateRequest naming the prefill
worker, or none for colocated), each with its own cache salt so no run reuses another's blocks.
The decode worker's mode is switched by replacing its spec's transfer section in place."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
import uuid

import openai
import pytest
import ray

from tests.reliability.faults import actor_of, assert_no_leaks, counters, on_worker, wait_for, workers_of
from workers.protocol import GenerateRequest, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = [list(range(3, 40)), [5, 6, 7, 8, 9, 10, 11], [(i * 7) % 300 + 3 for i in range(300)]]  # 300 > 128: chunked


@pytest.fixture(scope="module")
def cluster(pdserve_cluster, tiny_checkpoint):
    c = pdserve_cluster(tiny_checkpoint("llama"), prefix="transfer-modes", pools__prefill__replicas=2,
                        transfer__layerwise=True, transfer__deadline_s=5)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def workers(cluster):
    ids = wait_for(lambda: (lambda w: w if len(w) == 3 else None)(workers_of(cluster.url)), 60, "3 workers")
    prefill = sorted(wid for wid, w in ids.items() if w["role"] == "prefill")
    (decode,) = [wid for wid, w in ids.items() if w["role"] == "decode"]
    return {"decode": actor_of(cluster, decode), "decode_id": decode, "prefill_ids": prefill,
            **{wid: actor_of(cluster, wid) for wid in prefill}}


def generate(decode, prompt, prefill_ids=(), salt=None, sampling=GREEDY) -> list[int]:
    req = GenerateRequest(f"t-{uuid.uuid4().hex[:8]}", tuple(prompt), sampling, cache_salt=salt or uuid.uuid4().hex,
                          prefill_candidates=tuple(prefill_ids))
    tokens = []
    for ref in decode.generate.options(num_returns="streaming").remote(req):
        delta = ray.get(ref, timeout=120)
        assert delta.error is None, delta.error
        tokens += delta.token_ids
    return tokens


def _set_transfer(worker, **update) -> None:
    worker.spec = dataclasses.replace(worker.spec, transfer=worker.spec.transfer.model_copy(update=update))


def set_transfer(decode, **update) -> None:
    """Replace fields of the decode worker's transfer settings in place."""
    on_worker(decode, lambda w: _set_transfer(w, **update))


def set_layerwise(decode, on: bool) -> None:
    set_transfer(decode, layerwise=on)


def decode_engine_requests(decode) -> list[str]:
    return on_worker(decode, lambda w: list(w.engine.requests))


def test_layerwise_equals_whole_request_and_colocated(cluster, workers):
    decode, pf = workers["decode"], workers["prefill_ids"][0]
    before_d, before_p = counters(decode), counters(workers[pf])
    colocated = [generate(decode, p) for p in PROMPTS]
    layerwise = [generate(decode, p, [pf], salt=f"lw{i}") for i, p in enumerate(PROMPTS)]
    # again with the same salt: the decode worker holds the prompt's full blocks, only the tail
    # (first_block_index > 0) is streamed
    layerwise_tail = [generate(decode, p, [pf], salt=f"lw{i}") for i, p in enumerate(PROMPTS[:2])]
    set_layerwise(decode, False)
    try:
        whole = [generate(decode, p, [pf]) for p in PROMPTS]
    finally:
        set_layerwise(decode, True)
    assert layerwise == colocated
    assert layerwise_tail == colocated[:2]
    assert whole == colocated
    after_d, after_p = counters(decode), counters(workers[pf])
    n = len(PROMPTS)
    assert after_d["num_local_prefills"] - before_d["num_local_prefills"] == n  # the colocated runs only
    assert after_d["num_prefill_fallbacks"] == before_d["num_prefill_fallbacks"]
    assert after_d["num_transfer_failures"] == before_d["num_transfer_failures"]
    assert after_p["num_transfers"] - before_p["num_transfers"] == n + 2  # one layer-wise send each
    assert after_d["num_transfers"] - before_d["num_transfers"] == 2 * n + 2  # receives + READs
    assert decode_engine_requests(decode) == []
    assert_no_leaks(cluster.url)


def assert_remote_prefills_give(decode, pf, prompt, sampling, want) -> None:
    """Prefilled on pf, layer-wise and then whole-request READ: the tokens ``want``."""
    assert generate(decode, prompt, [pf], sampling=sampling) == want  # layer-wise
    set_layerwise(decode, False)
    try:
        assert generate(decode, prompt, [pf], sampling=sampling) == want  # whole-request READ
    finally:
        set_layerwise(decode, True)


PENALTIES = dict(frequency_penalty=1.0, presence_penalty=1.0, repetition_penalty=1.5)


def test_penalties_through_the_api_and_every_transfer_mode(cluster, workers):
    """The endpoint accepts the penalties and maps them into the engines (the output changes);
    colocated, whole-request READ, layer-wise and through the router: the same tokens (the prefill
    worker samples the first token, the decode worker the rest); out of range: OpenAI's 400."""
    from transformers import AutoTokenizer

    decode, pf = workers["decode"], workers["prefill_ids"][0]
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = cluster.config.model.served_model_name
    tokenizer = AutoTokenizer.from_pretrained(cluster.config.model.path)
    penalised = dataclasses.replace(GREEDY, **PENALTIES)
    extra = {"ignore_eos": True}
    for prompt in PROMPTS[:2]:
        colocated = generate(decode, prompt, sampling=penalised)
        assert colocated != generate(decode, prompt), "the penalties should change this prompt's greedy output"
        assert_remote_prefills_give(decode, pf, prompt, penalised, colocated)
        before = counters(decode)
        r = client.completions.create(model=model, prompt=prompt, max_tokens=GREEDY.max_tokens, temperature=0,
                                      frequency_penalty=PENALTIES["frequency_penalty"],
                                      presence_penalty=PENALTIES["presence_penalty"],
                                      extra_body=extra | {"repetition_penalty": PENALTIES["repetition_penalty"]})
        assert r.choices[0].text == tokenizer.decode(colocated, skip_special_tokens=True)
        assert r.usage.completion_tokens == len(colocated)
        after = counters(decode)  # the router sent it to the prefill worker
        assert after["num_local_prefills"] == before["num_local_prefills"]
        assert after["num_transfers"] > before["num_transfers"]
        plain = client.completions.create(model=model, prompt=prompt, max_tokens=GREEDY.max_tokens, temperature=0,
                                          extra_body=extra)
        assert plain.choices[0].text != r.choices[0].text
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4,
                                          temperature=0, presence_penalty=-2, frequency_penalty=2,
                                          extra_body={"repetition_penalty": 0.5})
    assert chat.usage.completion_tokens >= 1
    for bad in (dict(presence_penalty=3), dict(frequency_penalty=-2.5), dict(extra_body={"repetition_penalty": 0})):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, prompt="hi", max_tokens=2, **bad)
        param = next(iter(bad if "extra_body" not in bad else bad["extra_body"]))
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
        assert e.value.body["param"] == param and param in e.value.body["message"]
    assert decode_engine_requests(decode) == []
    assert_no_leaks(cluster.url)


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tag": {"enum": ["red", "green"]}}, "required": ["n", "tag"],
          "additionalProperties": False}


def test_structured_output_through_the_api_and_every_transfer_mode(cluster, workers):
    """A JSON schema holds from the first token (sampled by the prefill worker) to the last:
    colocated, whole-request READ and layer-wise give the same tokens (seeded), and through the
    endpoint (chat response_format json_schema, streamed and not; completions with vLLM's
    structured_outputs regex and guided_choice) the output parses and follows the schema and ends
    with "stop", prefilled on the prefill worker."""
    import jsonschema
    from transformers import AutoTokenizer

    from workers.protocol import StructuredOutput

    decode, pf = workers["decode"], workers["prefill_ids"][0]
    tokenizer = AutoTokenizer.from_pretrained(cluster.config.model.path)
    sampling = SamplingParams(max_tokens=120, temperature=0.8, seed=7,
                              structured=StructuredOutput("json_schema", json.dumps(SCHEMA)))
    prompt = PROMPTS[0]
    colocated = generate(decode, prompt, sampling=sampling)
    jsonschema.validate(json.loads(tokenizer.decode(colocated, skip_special_tokens=True)), SCHEMA)
    assert_remote_prefills_give(decode, pf, prompt, sampling, colocated)

    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = cluster.config.model.served_model_name
    before = counters(decode)
    chat = dict(model=model, messages=[{"role": "user", "content": "a number and a colour, as JSON"}], max_tokens=120,
                temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA}})
    r = client.chat.completions.create(**chat)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**chat, stream=True)
                       if c.choices)
    assert streamed == r.choices[0].message.content
    after = counters(decode)
    assert after["num_local_prefills"] == before["num_local_prefills"]  # the prefill worker sampled the first token
    assert after["num_transfers"] > before["num_transfers"]
    digits = client.completions.create(model=model, prompt="digits:", max_tokens=40, temperature=1.0, seed=1,
                                       extra_body={"structured_outputs": {"regex": r"[0-9]{4}-[0-9]{2}"}})
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}", digits.choices[0].text) and digits.choices[0].finish_reason == "stop"
    pick = client.completions.create(model=model, prompt="yes or no?", max_tokens=10, temperature=0,
                                     extra_body={"guided_choice": ["yes", "no"]})
    assert pick.choices[0].text in ("yes", "no") and pick.choices[0].finish_reason == "stop"
    assert decode_engine_requests(decode) == []
    assert_no_leaks(cluster.url)


ECHO = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3)  # lm-eval's loglikelihood request


def all_deltas(decode, prompt, prefill_ids, sampling):
    req = GenerateRequest(f"t-{uuid.uuid4().hex[:8]}", tuple(prompt), sampling, cache_salt=uuid.uuid4().hex,
                          prefill_candidates=tuple(prefill_ids))
    deltas = [ray.get(ref, timeout=120) for ref in decode.generate.options(num_returns="streaming").remote(req)]
    assert all(d.error is None for d in deltas) and deltas[0].token_ids
    return deltas



def assert_same_prompt_logprobs(got, want) -> None:
    assert got.prompt_logprobs[0] is None and len(got.prompt_logprobs) == len(want.prompt_logprobs)
    assert max(abs(a - b) for a, b in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:])) < 1e-4
    assert [[i for i, _ in t] for t in got.prompt_top_logprobs[1:]] == \
        [[i for i, _ in t] for t in want.prompt_top_logprobs[1:]]


async def test_prompt_logprobs_are_computed_by_the_prefill_worker(cluster, workers, tiny_checkpoint):
    """Prompt logprobs in a disaggregated cluster (local_prefill_threshold_tokens 0): the prefill
    worker computes them (300 tokens: chunked) and its handle carries them to the decode worker's
    first delta, equal to an engine alone's. lm-eval's one-token request ends at the prefill's
    first token: no KV is read (the handle is final). With more tokens: layer-wise and whole-READ
    imports, the rest token-identical to colocated. Through the router's own path (ClusterView.plan
    + serve_request, run here over the cluster's workers): routed to a prefill worker as any other."""
    from router.cluster_view import ClusterView
    from router.request_flow import serve_request
    from router.token_streams import token_streams
    from tests.workers.engine.helpers import make_engine
    from tests.workers.engine.test_prompt_logprobs import run

    decode, pf, prompt = workers["decode"], workers["prefill_ids"][0], PROMPTS[2]
    alone = run(make_engine(tiny_checkpoint("llama")), {"r": (prompt, ECHO)})["r"][1]
    before = counters(decode)
    assert_same_prompt_logprobs(all_deltas(decode, prompt, [pf], ECHO)[0], alone)
    after = counters(decode)
    assert after["num_final_first_tokens"] - before["num_final_first_tokens"] == 1
    assert (after["num_transfers"], after["num_local_prefills"]) == (before["num_transfers"],
                                                                     before["num_local_prefills"])
    longer = dataclasses.replace(ECHO, max_tokens=4)
    colocated = generate(decode, prompt, sampling=longer)
    for layerwise in (True, False):
        set_layerwise(decode, layerwise)
        try:
            deltas = all_deltas(decode, prompt, [pf], longer)
        finally:
            set_layerwise(decode, True)
        assert_same_prompt_logprobs(deltas[0], alone)
        assert [t for d in deltas for t in d.token_ids] == colocated
    cfg = cluster.config
    view = ClusterView(cfg.cluster_name, cfg.etcd, cfg.router, cfg.engine.block_size)
    await view.start()
    try:
        for _ in range(100):
            if view.is_ready()[0]:
                break
            await asyncio.sleep(0.1)
        deltas = [d async for d in serve_request(view, "plp", prompt, ECHO, "plp-salt", cfg.limits)]
        assert view.decisions[-1]["reason"] == "disaggregated" and view.decisions[-1]["prefill"] is not None
    finally:
        for stream in token_streams(view).streams.values():
            stream.close("test over")
        await view.stop()
    assert_same_prompt_logprobs(deltas[0], alone)
    assert [d.prompt_logprobs for d in deltas[1:]] == [None] * (len(deltas) - 1)
    assert counters(decode)["num_local_prefills"] == before["num_local_prefills"] + 1  # the colocated run only
    assert decode_engine_requests(decode) == []
    assert_no_leaks(cluster.url)


def _pretend_newer_handshake(worker, info, kv_epoch: int) -> None:
    worker.transceiver.add_peer(dataclasses.replace(info, kv_epoch=kv_epoch))


def test_stale_handshake_is_renewed_once_inside_the_read(cluster, workers):
    """The prefill worker shrinks to one segment, the decode worker handshakes with it, then it
    grows back (new segments, new epoch). The decode worker holds a handshake that claims the new
    epoch but lacks the new segments, so the READ of blocks there raises StalePeerError: the
    decode worker re-handshakes once, READs again, and the request succeeds on that prefill
    worker (no retry elsewhere, no fallback)."""
    decode, pf = workers["decode"], workers["prefill_ids"][1]
    prefill = workers[pf]
    set_layerwise(decode, False)
    try:
        ray.get(prefill.resize.remote(32), timeout=60)  # 1 segment of 32 blocks
        shrunk = ray.get(prefill.peer_info.remote(), timeout=60)
        assert len(shrunk.segments) == 1
        assert generate(decode, PROMPTS[0], [pf]) == generate(decode, PROMPTS[0])  # handshake at that epoch
        ray.get(prefill.resize.remote(256), timeout=60)  # segments 1.. come back at new addresses
        grown = ray.get(prefill.peer_info.remote(), timeout=60)
        assert grown.kv_epoch > shrunk.kv_epoch and len(grown.segments) == 8
        on_worker(decode, _pretend_newer_handshake, shrunk, grown.kv_epoch)
        before = counters(decode)
        prompt = [(i * 11) % 300 + 3 for i in range(120)]  # 30 blocks: past segment 0's free blocks
        assert generate(decode, prompt, [pf]) == generate(decode, prompt)
    finally:
        set_layerwise(decode, True)
    after = counters(decode)
    assert after["num_transfer_failures"] - before["num_transfer_failures"] == 1  # the stale READ
    assert after["num_transfers"] - before["num_transfers"] == 1  # the READ after the re-handshake
    assert (after["num_prefill_retries"], after["num_prefill_fallbacks"]) == \
        (before["num_prefill_retries"], before["num_prefill_fallbacks"])
    known = on_worker(decode, lambda w, p: w.transceiver.known_epoch(p), pf)
    assert known == grown.kv_epoch
    assert_no_leaks(cluster.url)


def _hold_free_blocks(worker, hold_s: float) -> None:
    """Take every free KV block of the decode worker for hold_s (on its engine thread)."""
    import asyncio

    def grab(engine):
        worker.held_blocks = engine.pool.allocate(engine.pool.num_free)

    def free(engine):
        engine.pool.free(worker.held_blocks)
        worker.held_blocks = []

    async def hold():
        await worker.loop.call(grab)
        await asyncio.sleep(hold_s)
        await worker.loop.call(free)

    worker.held_blocks = None
    asyncio.run_coroutine_threadsafe(hold(), worker.loop._loop)  # __ray_call__ runs fn off the actor's loop


def hold_free_blocks(decode, hold_s: float) -> None:
    on_worker(decode, _hold_free_blocks, hold_s)
    wait_for(lambda: on_worker(decode, lambda w: w.held_blocks is not None), 30, "the blocks to be taken")


def test_import_waits_for_blocks_past_its_lease_ttl(cluster, workers):
    """With no free KV block on the decode worker for longer than the handle's lease (TTL 2 s,
    blocks held 4 s), the import waits, renewing the lease, and READs within the renewed lease:
    no transfer failure, no fallback, tokens as colocated. A request whose deadline passes while it
    waits ends with the deadline error and is not prefilled locally afterwards."""
    decode, pf = workers["decode"], workers["prefill_ids"][1]
    prompt = [(i * 13) % 300 + 3 for i in range(40)]
    want = generate(decode, prompt)
    ttl_s = on_worker(decode, lambda w: w.spec.transfer.lease_ttl_s)
    set_layerwise(decode, False)
    set_transfer(decode, lease_ttl_s=2.0)
    try:
        before, before_p = counters(decode), counters(workers[pf])
        hold_free_blocks(decode, 4.0)
        assert generate(decode, prompt, [pf]) == want
        after, after_p = counters(decode), counters(workers[pf])
        assert after["num_transfers"] - before["num_transfers"] == 1
        assert (after["num_transfer_failures"], after["num_prefill_retries"], after["num_prefill_fallbacks"],
                after["num_local_prefills"]) == (before["num_transfer_failures"], before["num_prefill_retries"],
                                                 before["num_prefill_fallbacks"], before["num_local_prefills"])
        assert after_p["num_leases_expired"] == before_p["num_leases_expired"]

        hold_free_blocks(decode, 4.0)
        req = GenerateRequest(f"t-{uuid.uuid4().hex[:8]}", tuple(prompt), GREEDY, cache_salt=uuid.uuid4().hex,
                              prefill_candidates=(pf,), deadline_s=2.0)
        deltas = [ray.get(ref, timeout=60) for ref in decode.generate.options(num_returns="streaming").remote(req)]
        assert [d.error for d in deltas] == ["request deadline of 2 s exceeded"]
        final = counters(decode)
        assert final["num_prefill_fallbacks"] == after["num_prefill_fallbacks"]
        assert final["num_local_prefills"] == after["num_local_prefills"]
    finally:
        set_transfer(decode, lease_ttl_s=ttl_s)
        set_layerwise(decode, True)
    wait_for(lambda: on_worker(decode, lambda w: w.held_blocks == []), 30, "the held blocks to be given back")
    assert decode_engine_requests(decode) == []
    assert_no_leaks(cluster.url)


def _hold_after_layer_0(worker, hold_s: float) -> None:
    tx = worker.transceiver
    make_sender = type(tx).layerwise_sender
    worker.num_layers_sent = 0

    def layerwise_sender(target, src_block_ids, deadline_s):
        sender = make_sender(tx, target, src_block_ids, deadline_s)
        send = sender.layer_done

        def layer_done(layer, wait_written=None):
            send(layer, wait_written)
            worker.num_layers_sent += 1
            if layer == 0:
                time.sleep(hold_s)  # on the engine thread, inside the forward pass: mid-stream

        sender.layer_done = layer_done
        return sender

    tx.layerwise_sender = layerwise_sender


def _peer_gone_failures(worker) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("pdserve_kv_transfer_failures_total", {
        "worker_id": worker.worker_id, "backend": "nixl", "error": "peer_gone"}) or 0.0


def test_prefill_killed_mid_stream(cluster, workers):
    """The prefill worker dies after WRITing layer 0 of 3: the decode worker's attempt fails with
    PeerGoneError (counted under error="peer_gone"), its reserved blocks are freed once the
    prefill worker is known dead, and the request completes by the counted local fallback."""
    decode, pf = workers["decode"], workers["prefill_ids"][0]
    victim = workers[pf]
    on_worker(victim, _hold_after_layer_0, 30.0)
    before, gone_before = counters(decode), on_worker(decode, _peer_gone_failures)
    want = generate(decode, PROMPTS[2])
    result = {}
    import threading

    t = threading.Thread(target=lambda: result.setdefault("tokens", generate(decode, PROMPTS[2], [pf])), daemon=True)
    t.start()
    wait_for(lambda: on_worker(victim, lambda w: w.num_layers_sent) >= 1, 60, "layer 0 to be sent")
    ray.kill(victim)
    t.join(120)
    assert result.get("tokens") == want
    after = counters(decode)
    assert after["num_prefill_fallbacks"] == before["num_prefill_fallbacks"] + 1
    assert on_worker(decode, _peer_gone_failures) == gone_before + 1
    wait_for(lambda: decode_engine_requests(decode) == [], 30, "the decode worker to free the reservation")
    ray.get(cluster.manager.remove.remote(pf), timeout=60)
    wait_for(lambda: pf not in workers_of(cluster.url), 30, f"{pf} to leave routing")
    assert_no_leaks(cluster.url)
