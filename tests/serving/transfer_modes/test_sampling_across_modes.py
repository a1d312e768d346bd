"""Sampling features through real workers in every transfer mode: penalties (presence,
frequency, repetition) through the endpoint with the official openai client, and the same
penalised request colocated, whole-request and layer-wise: the same tokens; so with structured
output (a JSON schema). Prompt logprobs: computed by the prefill worker, handed on in its KV
handle, equal to an engine alone's; a one-token request moves no KV. After each, no KV block is
used or pinned on any worker. The cluster and helpers: conftest.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import uuid

import openai
import pytest
import ray

from tests.reliability.faults import assert_no_leaks, counters
from tests.serving.transfer_modes.conftest import GREEDY, PROMPTS, decode_engine_requests, generate, set_layerwise
from workers.protocol import GenerateRequest, SamplingParams


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
