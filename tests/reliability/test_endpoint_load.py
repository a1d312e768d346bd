"""The OpenAI endpoint at its limits and under load.

- Input limits from config (a second endpoint with tiny limits over the same workers): prompt
  tokens and max_tokens (400), body size (413, with and without Content-Length), concurrent
  requests (429 with Retry-After), the request deadline (504, or an error event once streaming,
  response.failed on the Responses API; the blocks it held are freed); every error body
  OpenAI-shaped.
- A decode worker whose engine steps each outlast three of that endpoint's (short) polls stays
  healthy and routable throughout: polls answer from what the engine last published.
- 1,000 requests at concurrency 64, mixed streaming / not, completions / chat, prompt lengths and
  max_tokens, some cancelled by the client: none lost, every other one complete, and afterwards no
  KV block in use or pinned on any worker (the endpoint's and the management API's view), and no
  request left in flight.
- schemathesis from the endpoint's own OpenAPI spec: no 5xx, every response as the spec says.
"""

import asyncio
import json
import random
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from ray import serve
from schemathesis.generation import GenerationMode
from schemathesis.config import SchemathesisConfig

from tests.conftest import attach_ingress
from tests.reliability.faults import actor_of, assert_no_leaks, routing, slow_engine_steps, wait_for, workers_of

MODEL = "tiny-llama"
POLL_TIMEOUT_S = 0.3
LIMITS = dict(limits__max_prompt_tokens=48, limits__max_tokens=8, limits__max_body_bytes=4096,
              limits__max_concurrent_requests=2, limits__retry_after_s=2, limits__request_timeout_s=6,
              router__poll_timeout_s=POLL_TIMEOUT_S)
# structured-output and tool fields of the generation routes (router/openai_models.py)
STRUCTURED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar", "tools", "tool_choice")
WORDS = "the router picks a worker while KV blocks move from prefill to decode without serialization".split()


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def cluster(pdserve_cluster, model_dir):
    c = pdserve_cluster(model_dir, prefix="endpoint-load", engine__max_num_seqs=64, engine__max_num_batched_tokens=256,
                        engine__num_kv_blocks=512)
    yield c
    c.stop()  # frees the machine for the next module


@pytest.fixture(scope="module")
def limited_url(cluster):
    yield attach_ingress(cluster, "endpoint-limited", **LIMITS)
    serve.delete(f"{cluster.app_name}-endpoint-limited", _blocking=False)  # cluster.stop() follows


def completion(prompt, **extra):
    return {"model": MODEL, "prompt": prompt, "temperature": 0, **extra}


def assert_openai_error(r: httpx.Response, status: int, type_: str, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == type_, err
    if param is not None:
        assert err["param"] == param, err


def test_prompt_and_max_tokens_limits_are_400(limited_url):
    with httpx.Client(base_url=limited_url, timeout=60) as http:
        assert http.post("/v1/completions", json=completion("hi", max_tokens=8)).status_code == 200
        assert_openai_error(http.post("/v1/completions", json=completion(" ".join(WORDS * 5), max_tokens=4)),
                            400, "invalid_request_error", "prompt")
        assert_openai_error(http.post("/v1/completions", json=completion("hi", max_tokens=9)),
                            400, "invalid_request_error", "max_tokens")
        assert_openai_error(http.post("/v1/completions", json=completion([1, 2, 10**6], max_tokens=2)),
                            400, "invalid_request_error", "prompt")
        json_type = {"content-type": "application/json"}
        assert_openai_error(http.post("/v1/completions", content=b"{not json", headers=json_type),
                            400, "invalid_request_error")


def test_body_over_the_limit_is_413_with_or_without_content_length(limited_url):
    big = json.dumps(completion("x" * 5000)).encode()
    with httpx.Client(base_url=limited_url, timeout=60) as http:
        json_type = {"content-type": "application/json"}
        assert_openai_error(http.post("/v1/completions", content=big, headers=json_type), 413, "invalid_request_error")

        def chunked():  # no Content-Length: counted as it arrives
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]

        assert_openai_error(http.post("/v1/completions", content=chunked(), headers=json_type),
                            413, "invalid_request_error")
        small = json.dumps(completion("hi", max_tokens=2)).encode()
        assert http.post("/v1/completions", content=iter([small[:10], small[10:]]),
                         headers=json_type).status_code == 200


async def test_over_max_concurrent_requests_is_429_with_retry_after(cluster, limited_url):
    decode = actor_of(cluster, next(iter(workers_of(cluster.url, "decode"))))
    slow_engine_steps(decode, 0.3)  # two streams stay open for a few seconds
    try:
        async with httpx.AsyncClient(base_url=limited_url, timeout=60) as http:
            body = completion("hello", max_tokens=8, stream=True, ignore_eos=True)
            async with http.stream("POST", "/v1/completions", json=body) as s1, \
                    http.stream("POST", "/v1/completions", json=body) as s2:
                assert (s1.status_code, s2.status_code) == (200, 200)
                r = await http.post("/v1/completions", json=completion("hello", max_tokens=2))
                assert_openai_error(r, 429, "rate_limit_exceeded")
                assert r.headers["retry-after"] == "2"
                for s in (s1, s2):
                    assert "[DONE]" in "".join([line async for line in s.aiter_lines()])
            assert (await http.post("/v1/completions", json=completion("hello", max_tokens=2))).status_code == 200
    finally:
        slow_engine_steps(decode, 0)


async def test_a_request_past_its_deadline_ends_with_504_and_frees_its_blocks(cluster, limited_url):
    decode = actor_of(cluster, next(iter(workers_of(cluster.url, "decode"))))
    slow_engine_steps(decode, 1.0)  # 8 tokens take > 8 s; the deadline is 6 s
    try:
        async with httpx.AsyncClient(base_url=limited_url, timeout=60) as http:
            body = completion("past the deadline", max_tokens=8, ignore_eos=True)

            async def streamed(path, payload):
                async with http.stream("POST", path, json={**payload, "stream": True}) as r:
                    return r.status_code, [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]

            response = {"model": MODEL, "input": "past the deadline", "max_output_tokens": 8, "ignore_eos": True}
            plain, (status, events) = await asyncio.gather(http.post("/v1/completions", json=body),
                                                           streamed("/v1/completions", body))
            r_status, r_events = await streamed("/v1/responses", response)  # (the limit: 2 requests at once)
    finally:
        slow_engine_steps(decode, 0)
        # the next test's load must not start while the router counts a worker out (its first
        # requests would get 503 no_worker)
        wait_for(lambda: all(w["healthy"] for w in workers_of(cluster.url).values()), 60,
                 "the router to see every worker healthy")
    assert_openai_error(plain, 504, "timeout_error")
    assert status == 200 and events[-1] == "[DONE]", events
    assert json.loads(events[-2])["error"]["code"] == "request_timeout", events
    failed = json.loads(r_events[-1])  # the Responses stream ends with response.failed
    assert r_status == 200 and failed["type"] == "response.failed", r_events
    assert failed["response"]["status"] == "failed" and failed["response"]["error"]["code"] == "request_timeout"
    assert_no_leaks(cluster.url)


async def test_a_worker_in_engine_steps_longer_than_three_poll_timeouts_stays_routable(cluster, limited_url):
    """A poll that waited for the step in progress would go unanswered three times in a row at this
    step length (router.poll_timeout_s = 0.3 s on the limited endpoint) and take the only decode
    worker out of routing (503 no_worker); it answers from what the engine last published."""
    step_s = 5 * POLL_TIMEOUT_S
    decode_id = next(iter(workers_of(cluster.url, "decode")))
    decode = actor_of(cluster, decode_id)
    slow_engine_steps(decode, step_s)
    seen = []
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            # keeps the engine stepping for ~4 steps (the main endpoint: no 6 s deadline)
            busy = asyncio.ensure_future(http.post(cluster.url + "/v1/completions", json=completion(
                "keep the decode engine stepping", max_tokens=4, ignore_eos=True)))

            async def watch():
                while not busy.done():
                    seen.append((await http.get(limited_url + "/v1/routing/recent")).json()["workers"][decode_id])
                    await asyncio.sleep(0.1)

            watching = asyncio.ensure_future(watch())
            await asyncio.sleep(step_s)  # into the busy request's steps
            t0 = time.monotonic()
            r = await http.post(limited_url + "/v1/completions", json=completion("sent mid-step", max_tokens=2,
                                                                                 ignore_eos=True))
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 2
            assert time.monotonic() - t0 > step_s  # it did wait for the slow steps
            assert (await busy).status_code == 200
            await watching
    finally:
        slow_engine_steps(decode, 0)
    assert seen and all(w["healthy"] for w in seen), [w for w in seen if not w["healthy"]][:3]
    # polls were answered deep inside steps, not only between them
    assert max(w["engine_stalled_s"] for w in seen) > 3 * POLL_TIMEOUT_S, seen
    assert_no_leaks(limited_url)


# -- load ------------------------------------------------------------------------------------------
async def one_request(http: httpx.AsyncClient, i: int, rng: random.Random) -> str:
    """Returns "ok" or "cancelled"; raises AssertionError for anything else."""
    max_tokens = rng.randint(1, 8)
    text = " ".join(rng.choice(WORDS) for _ in range(rng.choice((2, 8, 30, 60))))
    chat = rng.random() < 0.3
    stream = rng.random() < 0.5
    cancel = rng.random() < 0.1
    if chat:
        path, body = "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    else:
        path, body = "/v1/completions", {"model": MODEL, "prompt": text}
    body.update(max_tokens=max_tokens, temperature=rng.choice((0, 0.8)), ignore_eos=True, stream=stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
        async with http.stream("POST", path, json=body) as r:
            assert r.status_code == 200, (i, r.status_code, await r.aread())
            events = []
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if cancel and len(events) == 2:
                        return "cancelled"  # leaves the stream open mid-way, then closes the connection
        assert events[-1] == "[DONE]", (i, events[-3:])
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks), (i, chunks)
        usage = chunks[-1]["usage"]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    else:
        call = http.post(path, json=body)
        if cancel:
            try:
                await asyncio.wait_for(call, timeout=rng.uniform(0.01, 0.5))
            except asyncio.TimeoutError:
                return "cancelled"
            return "ok"  # it finished before the client gave up
        r = await call
        assert r.status_code == 200, (i, r.status_code, r.text)
        usage, finish = r.json()["usage"], [r.json()["choices"][0]["finish_reason"]]
    assert usage["completion_tokens"] == max_tokens and finish == ["length"], (i, usage, finish)
    return "ok"


async def test_a_thousand_requests_at_concurrency_64_lose_nothing_and_leak_nothing(cluster):
    rng = random.Random(7)
    seeds = [rng.random() for _ in range(1000)]
    gate = asyncio.Semaphore(64)
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=64)

    async def bounded(http, i):
        async with gate:
            return await one_request(http, i, random.Random(seeds[i]))

    async with httpx.AsyncClient(base_url=cluster.url, timeout=180, limits=limits) as http:
        outcomes = await asyncio.gather(*(bounded(http, i) for i in range(1000)), return_exceptions=True)
    failures = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
    assert not failures, f"{len(failures)} requests failed, e.g. {failures[:3]}"
    assert outcomes.count("ok") + outcomes.count("cancelled") == 1000
    assert outcomes.count("cancelled") >= 20  # the client really cancelled some
    assert_no_leaks(cluster.url, timeout_s=60)
    assert routing(cluster.url)["inflight_requests"] == 0
    admin = httpx.get(cluster.admin_url + "/cluster/workers", headers={"Authorization": "Bearer test-token"},
                      timeout=60)
    assert admin.status_code == 200, admin.text
    for w in admin.json()["workers"]:
        assert (w["kv"]["used_blocks"], w["kv"]["pinned_blocks"], w["load"]["num_inflight"]) == (0, 0, 0), w


# -- schemathesis ----------------------------------------------------------------------------------
# schemathesis' defaults, plus the configured limits' answers (400, 413) as acceptable ones
FUZZ_CONFIG = SchemathesisConfig.from_dict({"checks": {
    "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "413", "5xx"]},
    "negative_data_rejection": {"expected-statuses": ["400", "401", "403", "404", "405", "406", "409", "413", "415",
                                                      "422", "428", "429", "5xx"]},
}})


def valid_prompt(prompt):
    """A drawn completions prompt made servable: one prompt (the limit allows 2 requests at once),
    non-empty, token ids within the tiny vocabulary."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)):
        prompt = prompt[0]  # one of a batch
    if isinstance(prompt, list):
        return [t % 384 for t in prompt if isinstance(t, int)][:16] or [5]
    return prompt or "hi"


def test_the_endpoint_holds_its_openapi_spec_under_fuzzing(limited_url):
    """Against the endpoint with small limits (every generation is short). Well-formed bodies (and
    /v1/models/{model}) get the served model name, a max_tokens, min_tokens and n within the limits and logit_bias keys within the
    vocabulary (the spec cannot say those) so that most reach the workers; malformed ones keep
    what was drawn.
    A well-formed body may still exceed a configured limit: 400 (prompt tokens, max_tokens) and 413
    (body size) are accepted answers to it, and 413 is also a fine rejection of a malformed body
    (FUZZ_CONFIG); some well-formed bodies of each generation route must be served."""
    spec = httpx.get(limited_url + "/openapi.json", timeout=30).json()
    ops = [r.ok() for r in schemathesis.openapi.from_dict(spec, config=FUZZ_CONFIG).get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready"}
    failures, statuses = [], {}
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
                continue  # no parameters to get wrong
            seen = statuses.setdefault((op.path, mode.value), [])

            # no shrinking: a failure is reported as found (shrinking one costs hundreds of requests)
            @settings(max_examples=25 if op.method.upper() == "POST" else 3, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), derandomize=True,
                      phases=[Phase.explicit, Phase.generate])
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                if mode is GenerationMode.POSITIVE and (case.path_parameters or {}).get("model") is not None:
                    case.path_parameters["model"] = MODEL  # GET /v1/models/{model}: another name is a 404
                if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = MODEL
                    for key in ("max_tokens", "max_completion_tokens"):  # within the limit, mostly
                        if isinstance(case.body.get(key), int) and case.body[key] > 0:
                            case.body[key] = 1 + case.body[key] % 8
                    if isinstance(case.body.get("min_tokens"), int) and case.body["min_tokens"] > 0:  # <= max_tokens
                        case.body["min_tokens"] = 1
                    if isinstance(case.body.get("n"), int) and case.body["n"] > 0:  # within the concurrency limit
                        case.body["n"] = 1 + case.body["n"] % 2
                    if isinstance(case.body.get("logit_bias"), dict):  # token ids within the vocabulary
                        case.body["logit_bias"] = {str(i % 100): b for i, b in enumerate(case.body["logit_bias"].values())}
                    if len(seen) % 2:  # random regexes, grammars, schemas and tools are rarely servable (a 400):
                        for key in STRUCTURED_FIELDS:  # every other body goes without them
                            case.body.pop(key, None)
                        if "prompt" in case.body:
                            case.body["prompt"] = valid_prompt(case.body["prompt"])
                seen.append(case.call_and_validate(base_url=limited_url).status_code)

            try:
                run()
            except Exception as e:  # every operation's failures, reported together
                failures.append(f"{op.method.upper()} {op.path} ({mode.value}): {type(e).__name__}: {str(e)[:800]}")
    assert not failures, "\n\n".join(failures)
    for path in ("/v1/completions", "/v1/chat/completions"):
        served = statuses[(path, "positive")]
        assert served.count(200) >= 3, (path, served)  # the fuzz reached the workers
