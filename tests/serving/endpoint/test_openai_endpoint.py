"""The serving path end to end: real etcd, Ray, NIXL, a tiny transformers model; the official
openai client against 1 prefill + 1 decode: greedy output token-identical to transformers'
generate, the endpoint's options, routes and errors (n choices: test_choices.py; logit_bias,
min_tokens, min_p: test_sampling_options.py)."""

import httpx
import openai
import pytest

from tests.serving.endpoint.conftest import N, PROMPTS, expected, model_name
from tests.workers.engine.helpers import hf_greedy


def test_models(client, cluster):
    ids = [m.id for m in client.models.list().data]
    assert ids == [model_name(cluster)] == ["tiny-llama"]
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("org/other-model")
    assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("stream", [False, True])
def test_completions_match_generate(client, cluster, model_dir, tokenizer, stream):
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        want = tokenizer.decode(expected(model_dir, tokenizer, ids), skip_special_tokens=True)
        kwargs = dict(model=model_name(cluster), prompt=prompt, max_tokens=N, temperature=0,
                      extra_body={"ignore_eos": True})
        if stream:
            chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            assert chunks[-1].usage.completion_tokens == N and chunks[-1].usage.prompt_tokens == len(ids)
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        else:
            r = client.completions.create(**kwargs)
            text = r.choices[0].text
            assert r.usage.completion_tokens == N and r.choices[0].finish_reason == "length"
        assert text == want


def test_completions_logprobs_are_the_greedy_tokens(client, cluster, model_dir, tokenizer):
    ids = tokenizer(PROMPTS[0]).input_ids
    want = expected(model_dir, tokenizer, ids)
    r = client.completions.create(model=model_name(cluster), prompt=ids, max_tokens=N, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in want]
    assert all(v <= 0 for v in lp.token_logprobs) and len(lp.top_logprobs) == N


@pytest.mark.parametrize("stream", [False, True])
def test_chat_matches_generate(client, cluster, model_dir, tokenizer, stream):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    want = tokenizer.decode(expected(model_dir, tokenizer, ids), skip_special_tokens=True)
    kwargs = dict(model=model_name(cluster), messages=messages, max_tokens=N, temperature=0,
                  extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        assert chunks[0].choices[0].delta.role == "assistant"
        got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        r = client.chat.completions.create(**kwargs)
        got = r.choices[0].message.content
        assert r.usage.prompt_tokens == len(ids)
    assert got == want


def test_errors_are_openai_shaped(client, cluster):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    for bad in [dict(max_tokens=0), dict(temperature=-1), dict(top_p=2), dict(n=0), dict(n=10_000), dict(prompt="")]:
        args = dict(model=model_name(cluster), prompt="hi", max_tokens=2) | bad
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**args)
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    # what pdserve cannot honour is refused, not ignored: tool_choice auto without a parser, suffix,
    # best_of; and a structured
    # output whose schema, regex or grammar does not compile is the client's mistake
    chat = dict(model=model_name(cluster), messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:  # auto (the default) needs server.tool_call_parser
        client.chat.completions.create(**chat, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert e.value.body["param"] == "tool_choice" and "server.tool_call_parser" in e.value.body["message"], e.value.body
    for bad, param, says in [
            (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
             "response_format", 'Unsupported type "nope"'),
            (dict(extra_body={"structured_outputs": {"regex": "[0-9"}}), "structured_outputs", "Unclosed '['"),
            (dict(extra_body={"guided_grammar": "x ::= \"a\""}), "guided_grammar", "root rule"),
            (dict(extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}}), "structured_outputs",
             "one structured output constraint"),
            (dict(response_format={"type": "json_object"}, extra_body={"guided_regex": "a"}), "guided_regex",
             "one structured output constraint"),
            (dict(extra_body={"structured_outputs": {"json_object": True}, "min_tokens": 1}), "min_tokens",
             "min_tokens cannot be combined")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**chat, **bad)
        assert e.value.body["param"] == param and says in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError) as e:  # a constraint it would not enforce is not dropped
        client.chat.completions.create(**chat, extra_body={"structured_outputs": {"whitespace_pattern": " "}})
    assert "whitespace_pattern" in e.value.body["message"], e.value.body
    for bad in (dict(suffix="tail"), dict(best_of=2)):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=model_name(cluster), prompt="hi", max_tokens=2, **bad)
    ok = client.chat.completions.create(**chat, response_format={"type": "text"}, tool_choice="none")
    assert ok.choices[0].message.content is not None
    r = httpx.post(cluster.url + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_chat_continues_the_final_message(client, cluster, model_dir, tokenizer):
    """continue_final_message (vLLM's): the model goes on with a partial assistant message, greedy
    == generate on exactly that prompt; with add_generation_prompt left on it is a 400."""
    messages = [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": "It is"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                        tokenize=True, return_dict=False)
    r = client.chat.completions.create(model=model_name(cluster), messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True, "add_generation_prompt": False,
                                                   "continue_final_message": True})
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == tokenizer.decode(hf_greedy(model_dir, ids, 6), skip_special_tokens=True)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name(cluster), messages=messages, max_tokens=2,
                                       extra_body={"continue_final_message": True})
    assert "continue_final_message" in e.value.body["message"]


def test_tokenizer_routes(cluster, tokenizer):
    """vLLM's /tokenize (text, or messages through the chat template), /detokenize and
    /tokenizer_info, as lm-eval-harness's remote tokenizer calls them."""
    url = cluster.url
    r = httpx.post(url + "/tokenize", json={"prompt": PROMPTS[2], "add_special_tokens": False,
                                            "return_token_strs": True}, timeout=30).json()
    assert r["tokens"] == tokenizer(PROMPTS[2], add_special_tokens=False).input_ids and r["count"] == len(r["tokens"])
    assert r["token_strs"] == tokenizer.convert_ids_to_tokens(r["tokens"]) and r["max_model_len"] > 0
    messages = [{"role": "user", "content": PROMPTS[0]}]
    chat = httpx.post(url + "/tokenize", json={"model": model_name(cluster), "messages": messages}, timeout=30).json()
    assert chat["tokens"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False)
    back = httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}, timeout=30).json()
    assert back == {"prompt": PROMPTS[2]}
    info = httpx.get(url + "/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == tokenizer.chat_template
    for path, body, param in (("/detokenize", {"tokens": [10**7]}, "tokens"),
                              ("/tokenize", {"prompt": "a", "messages": messages}, None),
                              ("/tokenize", {"prompt": "a", "model": "other"}, "model")):
        bad = httpx.post(url + path, json=body, timeout=30)
        assert bad.status_code in (400, 404) and bad.json()["error"]["param"] == param, bad.text


def test_echo_with_logprobs_is_lm_eval_loglikelihood(client, cluster, model_dir, tokenizer):
    """lm-eval-harness's loglikelihood request (token-id prompts, echo, logprobs 1, max_tokens 1) on
    the disaggregated cluster: each choice's text is its prompt then the greedy token; its
    logprobs cover the prompt (the first None, the others equal to a transformers forward, the
    top-1 that forward's argmax) then the token; max_tokens 0 gives the prompt alone (no completion
    tokens); streamed, the prompt comes first; such requests are routed as others, their whole
    prompt counted uncached."""
    import torch

    from tests.workers.engine.test_prompt_logprobs import ATOL, reference

    ids = [tokenizer(p).input_ids for p in PROMPTS[:2]]
    r = client.completions.create(model=model_name(cluster), prompt=ids, echo=True, logprobs=1, max_tokens=1,
                                  temperature=0, seed=1234)
    for c, prompt in zip(r.choices, ids):
        want, (top_vals, top_ids) = reference(model_dir, prompt, 1)
        gen = hf_greedy(model_dir, prompt, 1)
        assert c.text == tokenizer.decode(prompt) + tokenizer.decode(gen)
        lp = c.logprobs
        assert lp.tokens == [tokenizer.decode([t]) for t in prompt + gen]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(prompt) + 1
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(prompt)]), want, atol=ATOL, rtol=0)
        assert [list(t) for t in lp.top_logprobs[1:len(prompt)]] == [[tokenizer.decode([i])] for i in top_ids[:, 0]]
        torch.testing.assert_close(torch.tensor([max(t.values()) for t in lp.top_logprobs[1:len(prompt)]]),
                                   top_vals[:, 0], atol=ATOL, rtol=0)
    assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == 2
    decisions = httpx.get(cluster.url + "/v1/routing/recent", timeout=30).json()["decisions"][-2:]
    threshold = cluster.config.router.local_prefill_threshold_tokens  # the whole prompt counts as uncached
    assert [d["prefill"] is not None for d in decisions] == [len(i) >= threshold for i in ids], decisions
    only = client.completions.create(model=model_name(cluster), prompt=PROMPTS[0], echo=True, logprobs=0, max_tokens=0,
                                     temperature=0)
    assert only.choices[0].text == PROMPTS[0] and only.usage.completion_tokens == 0
    assert len(only.choices[0].logprobs.tokens) == len(ids[0]) and only.choices[0].logprobs.top_logprobs is None
    plain = client.completions.create(model=model_name(cluster), prompt=PROMPTS[1], max_tokens=4, temperature=0)
    echo = client.completions.create(model=model_name(cluster), prompt=PROMPTS[1], max_tokens=4, temperature=0,
                                     echo=True)
    assert echo.choices[0].text == PROMPTS[1] + plain.choices[0].text and echo.choices[0].logprobs is None
    chunks = list(client.completions.create(model=model_name(cluster), prompt=PROMPTS[1], max_tokens=4,
                                            temperature=0, echo=True, logprobs=1, stream=True))
    assert chunks[0].choices[0].text.startswith(PROMPTS[1])
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echo.choices[0].text
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and len(streamed) == len(ids[1]) + 4
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name(cluster), prompt=PROMPTS[0], max_tokens=0)
    assert "echo" in e.value.body["message"]


def test_priority(client, cluster, model_dir, tokenizer):
    """vLLM's priority extra: a request with one is served as without (greedy, token-identical to
    generate; chat too); a value that is not an int32 is a 400 naming priority."""
    ids = tokenizer(PROMPTS[0]).input_ids
    r = client.completions.create(model=model_name(cluster), prompt=ids, max_tokens=N, temperature=0,
                                  extra_body={"ignore_eos": True, "priority": -5})
    assert r.choices[0].text == tokenizer.decode(expected(model_dir, tokenizer, ids), skip_special_tokens=True)
    c = client.chat.completions.create(model=model_name(cluster), messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, extra_body={"ignore_eos": True, "priority": 10})
    assert c.usage.completion_tokens == 3
    for bad in (2**31, 1.5, "high", True):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model_name(cluster), prompt="hi", max_tokens=2, extra_body={"priority": bad})
        assert e.value.body["param"] == "priority", e.value.body


def test_non_streaming_client_gone_cancels_its_request(client, cluster):
    """A client that goes away while its non-streaming request runs (its socket closed once the
    endpoint counts the request in flight; decode steps slowed so that it is mid-way): the request
    stops in the cluster (counted as cancelled, none in flight) and frees its KV blocks."""
    import json
    import socket
    import time
    from urllib.parse import urlsplit

    from tests.reliability.faults import actor_of, assert_no_leaks, slow_engine_steps, wait_for, workers_of

    def cancelled():
        lines = httpx.get(cluster.url + "/metrics", timeout=30).text.splitlines()
        return sum(float(l.split()[-1]) for l in lines if l.startswith('pdserve_requests_total{status="cancelled"}'))

    def inflight():
        return httpx.get(cluster.url + "/v1/routing/recent", timeout=30).json()["inflight_requests"]

    decode = [actor_of(cluster, w) for w in workers_of(cluster.url, "decode")]
    before, url = cancelled(), urlsplit(cluster.url)
    body = json.dumps({"model": model_name(cluster), "prompt": PROMPTS[2], "max_tokens": 400, "temperature": 0,
                       "ignore_eos": True}).encode()
    for actor in decode:
        slow_engine_steps(actor, 0.1)  # 400 tokens: ~40 s, far more than a cancel takes even on a loaded box
    try:
        with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
            sock.sendall(f"POST {url.path}/v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: "
                         f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_for(lambda: inflight() == 1, 30, "the request to run")
            time.sleep(0.3)  # a few tokens in; then the socket closes: the client is gone
        wait_for(lambda: cancelled() == before + 1, 35, "the request to end as cancelled")
    finally:
        for actor in decode:
            slow_engine_steps(actor, 0)
    wait_for(lambda: inflight() == 0, 10, "the endpoint to count no request in flight")
    assert_no_leaks(cluster.url, timeout_s=10)


def test_probes_and_metrics(cluster):
    assert httpx.get(cluster.url + "/health", timeout=30).status_code == 200
    assert httpx.get(cluster.url + "/ready", timeout=30).status_code == 200
    text = httpx.get(cluster.url + "/metrics", timeout=30).text
    for name in ["pdserve_ttft_seconds", "pdserve_itl_seconds", "pdserve_e2e_seconds", "pdserve_queue_depth",
                 "pdserve_kv_used_blocks", "pdserve_transfer_bytes_total", "pdserve_prefix_hit_rate",
                 "pdserve_requests_total"]:
        assert name in text, name
    # every worker's compiles since it started serving: none on the CPU (no compile_prefill, no Triton)
    compiles = [line for line in text.splitlines() if line.startswith("pdserve_compiles_while_serving_total{")]
    assert compiles and all(float(line.rsplit(" ", 1)[1]) == 0 for line in compiles), compiles


def test_remote_prefill_really_transferred(cluster):
    """With threshold 0 every request is disaggregated: bytes crossed the transceiver."""
    text = httpx.get(cluster.url + "/metrics", timeout=30).text
    transferred = sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith("pdserve_transfer_bytes_total"))
    assert transferred > 0


@pytest.fixture(scope="module")
def second_endpoint(cluster):
    """A second endpoint over the same workers: stream interval 4, and two API keys."""
    from tests.conftest import attach_ingress

    return attach_ingress(cluster, "openai-second", router__stream_interval_tokens=4, server__api_keys=KEYS)


KEYS = ["sk-first-key", "sk-second"]


def test_api_keys(second_endpoint, cluster):
    """server.api_keys: /v1/* needs one of them as a bearer token (the openai client's api_key);
    a missing or wrong key is a 401 with OpenAI's body (code invalid_api_key) before the body is
    read; probes and metrics stay open."""
    kwargs = dict(model=model_name(cluster), prompt=PROMPTS[0], max_tokens=2, temperature=0)
    for key in KEYS:
        ok = openai.OpenAI(base_url=second_endpoint + "/v1", api_key=key, max_retries=0, timeout=120)
        assert ok.completions.create(**kwargs).choices[0].text
        assert [m.id for m in ok.models.list().data] == [model_name(cluster)]
    for key in ("unused", KEYS[0] + "x", KEYS[0][:-1]):
        bad = openai.OpenAI(base_url=second_endpoint + "/v1", api_key=key, max_retries=0, timeout=120)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(**kwargs)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key", e.value.body
    r = httpx.post(second_endpoint + "/v1/chat/completions", json={"model": model_name(cluster)}, timeout=30)
    assert r.status_code == 401 and "provide an API key" in r.json()["error"]["message"]
    r = httpx.get(second_endpoint + "/v1/models", headers={"Authorization": f"Basic {KEYS[0]}"}, timeout=30)
    assert r.status_code == 401
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert httpx.get(second_endpoint + path, timeout=30).status_code == 200, path
    assert httpx.post(second_endpoint + "/tokenize", json={"prompt": "a"}, timeout=30).status_code == 401
    assert httpx.post(second_endpoint + "/tokenize", json={"prompt": "a"}, timeout=30,
                      headers={"Authorization": f"Bearer {KEYS[1]}"}).json()["count"] >= 1
    assert httpx.get(cluster.url + "/v1/models", timeout=30).status_code == 200  # no keys: open


def test_stream_interval_sends_tokens_in_chunks(second_endpoint, cluster, model_dir, tokenizer):
    """router.stream_interval_tokens: 4 on a second endpoint over the same workers: the stream's
    first message carries the first token alone (TTFT unchanged), every later message at least 4
    tokens except the last, and the text is still generate's."""
    client = openai.OpenAI(base_url=second_endpoint + "/v1", api_key=KEYS[1], max_retries=0, timeout=120)
    n = 14  # 1 + 4 + 4 + 4 + 1: the last message is short
    ids = tokenizer(PROMPTS[0]).input_ids
    chunks = list(client.completions.create(model=model_name(cluster), prompt=PROMPTS[0], max_tokens=n, temperature=0,
                                            logprobs=1, stream=True, extra_body={"ignore_eos": True}))
    per_chunk = [len(c.choices[0].logprobs.tokens) for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum(per_chunk) == n and per_chunk[0] == 1, per_chunk
    assert all(k >= 4 for k in per_chunk[1:-1]), per_chunk
    assert len(per_chunk) <= 1 + -(-(n - 1) // 4), per_chunk  # fewer messages than tokens
    want = tokenizer.decode(hf_greedy(model_dir, ids, n), skip_special_tokens=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want


def test_vllm_text_and_prompt_options(client, cluster, tokenizer):
    """vLLM's include_stop_str_in_output, truncate_prompt_tokens and allowed_token_ids through the
    endpoint; its extras pdserve does not do are a 400, not ignored."""
    model = model_name(cluster)
    base = dict(model=model, prompt=PROMPTS[2], max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**base).choices[0].text
    stop = full[2:5]
    cut = client.completions.create(**(base | {"stop": [stop]})).choices[0].text
    kept = client.completions.create(**(base | {"stop": [stop], "extra_body": {"ignore_eos": True,
                                                                             "include_stop_str_in_output": True}}))
    assert cut + stop == kept.choices[0].text and full.startswith(kept.choices[0].text)
    ids = tokenizer(PROMPTS[2]).input_ids
    short = client.completions.create(**(base | {"extra_body": {"ignore_eos": True, "truncate_prompt_tokens": 5}}))
    assert short.usage.prompt_tokens == 5
    assert short.choices[0].text == client.completions.create(**(base | {"prompt": ids[-5:]})).choices[0].text
    allowed = list(range(100, 140))
    r = client.completions.create(**(base | {"logprobs": 0, "extra_body": {"ignore_eos": True,
                                                                          "allowed_token_ids": allowed}}))
    assert r.usage.completion_tokens == 12
    assert set(tokenizer.decode([i]) for i in allowed) >= set(r.choices[0].logprobs.tokens)
    for bad, param in [({"allowed_token_ids": [5, 10**6]}, "allowed_token_ids"), ({"bad_words": ["x"]}, "bad_words"),
                       ({"use_beam_search": True}, "use_beam_search"), ({"logits_processors": ["m"]}, "logits_processors")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**(base | {"extra_body": bad}))
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={"chat_template": "{{ messages }}"})
    assert e.value.body["param"] == "chat_template" and "own template" in e.value.body["message"]
