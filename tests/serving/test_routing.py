"""KV-aware routing across a real cluster: multi-turn chat returns to the worker holding the
prefix (and reuses its cache), round-robin does not; cache salts keep tenants apart; the router
follows etcd membership."""

import time

import httpx
import openai
import pytest

from tests.conftest import attach_ingress

SYSTEM = "You are a helpful assistant. " * 12  # a long shared prefix: many full blocks


@pytest.fixture(scope="module")
def cluster(pdserve_cluster, tiny_checkpoint):
    c = pdserve_cluster(tiny_checkpoint("qwen2"), prefix="routing", pools__decode__replicas=2,
                           router__local_prefill_threshold_tokens=16)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def rr_url(cluster):
    return attach_ingress(cluster, "routing-rr", router__policy="round_robin")


def chat(url, model, messages, salt=None):
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    extra = {"ignore_eos": True} | ({"cache_salt": salt} if salt else {})
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, extra_body=extra)
    last = httpx.get(url + "/v1/routing/recent", timeout=30).json()["decisions"][-1]
    return r, last


def conversation(url, model, topic, salt=None):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Tell me about {topic}."}]
    r1, d1 = chat(url, model, msgs, salt)
    time.sleep(0.5)  # let the router see the KV events of turn 1 (polled every 0.1 s)
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": "More."}]
    r2, d2 = chat(url, model, msgs, salt)
    return (r1, d1), (r2, d2)


def test_second_turn_goes_to_the_prefix_holder(cluster):
    """The default policy (cache_aware) sends turn 2 where turn 1's KV is."""
    model = cluster.config.model.served_model_name
    (r1, d1), (r2, d2) = conversation(cluster.url, model, "Paris")
    assert d2["decode"] == d1["decode"] and d2["decode_reason"] == "cache_hit"
    assert d2["decode_overlap_blocks"] > 0
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens - 8


def test_round_robin_does_not_follow_the_prefix(cluster, rr_url):
    model = cluster.config.model.served_model_name
    (r1, d1), (r2, d2) = conversation(rr_url, model, "Berlin")
    assert d2["decode"] != d1["decode"]  # two decode workers, strict alternation
    # the decode worker of turn 2 never saw turn 1: at most the shared system prompt is cached
    assert r2.usage.prompt_tokens_details.cached_tokens < r1.usage.prompt_tokens


def test_kv_aware_policy_follows_the_prefix(cluster):
    url = attach_ingress(cluster, "routing-kv", router__policy="kv_aware")
    model = cluster.config.model.served_model_name
    (r1, d1), (r2, d2) = conversation(url, model, "Rome")
    assert d2["decode"] == d1["decode"] and d2["decode_reason"] == "lowest_cost"
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens - 8


def test_cache_salt_keeps_tenants_apart(cluster):
    model = cluster.config.model.served_model_name
    msgs = [{"role": "system", "content": "Tenant secret preamble. " * 10}, {"role": "user", "content": "hi"}]
    chat(cluster.url, model, msgs, salt="tenant-a")
    time.sleep(0.5)
    r_b, d_b = chat(cluster.url, model, msgs, salt="tenant-b")
    assert r_b.usage.prompt_tokens_details.cached_tokens == 0
    assert d_b["decode_overlap_blocks"] == 0
    r_a, d_a = chat(cluster.url, model, msgs, salt="tenant-a")
    assert r_a.usage.prompt_tokens_details.cached_tokens > 0


def test_readiness_gate_503_until_min_workers(cluster):
    url = attach_ingress_unready(cluster)
    r = httpx.get(url + "/ready", timeout=30)
    assert r.status_code == 503 and "prefill" in r.json()["error"]["message"]
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=cluster.config.model.served_model_name, prompt="hi", max_tokens=2)
    assert e.value.status_code == 503 and "not ready" in e.value.message


def attach_ingress_unready(cluster):
    """An endpoint that needs 3 prefill workers where the cluster has 1: it never becomes ready."""
    from ray import serve

    from cluster.launcher import config_as_dict
    from router.app import build_app

    raw = config_as_dict(cluster.config)
    raw["router"]["min_prefill_workers"] = 3
    serve.run(build_app({"config": raw}), name=f"{cluster.app_name}-unready", route_prefix="/routing-unready")
    cluster.extra_apps.append(f"{cluster.app_name}-unready")
    return cluster.url.rsplit("/", 1)[0] + "/routing-unready"


def test_full_prefill_queues_keep_prompts_on_their_decode_worker(cluster):
    """router.prefill_queue_threshold: 1 on a second endpoint. A burst of long prompts: the first is
    sent to the one prefill worker; while the router counts it queued there, the next ones are
    prefilled by their decode workers (reason prefill_queue_full); every request completes, and the
    decode workers' local prefills grow by at least as many."""
    import concurrent.futures

    from tests.reliability.faults import actor_of, assert_no_leaks, counters, workers_of

    url = attach_ingress(cluster, "routing-pq", router__prefill_queue_threshold=1)
    model = cluster.config.model.served_model_name
    decodes = [actor_of(cluster, wid) for wid in workers_of(url, "decode")]
    before = sum(counters(a)["num_local_prefills"] for a in decodes)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)

    def one(i):
        prompt = f"Request {i} of a burst. " + "Tell me a long story about the sea. " * 8
        return client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0,
                                         extra_body={"ignore_eos": True, "cache_salt": f"burst-{i}"})

    n = 8
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    assert all(r.usage.completion_tokens == 4 for r in results)
    reasons = [d["reason"] for d in httpx.get(url + "/v1/routing/recent", timeout=30).json()["decisions"][-n:]]
    assert "disaggregated" in reasons and "prefill_queue_full" in reasons, reasons
    after = sum(counters(a)["num_local_prefills"] for a in decodes)
    assert after - before >= reasons.count("prefill_queue_full"), (before, after, reasons)
    assert_no_leaks(url)


STORY = "Tell me a long story about the sea and its ships. " * 7  # a long prompt of the tiny model


def complete(args) -> tuple[list[str], str]:
    """(base url, model, cache salt, prompt) -> one greedy 4-token completion's tokens and text."""
    base, model, salt, prompt = args
    c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
    r = c.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, logprobs=0,
                             extra_body={"ignore_eos": True, "cache_salt": salt})
    return r.choices[0].logprobs.tokens, r.choices[0].text


@pytest.fixture(scope="module")
def ttft_url(cluster):
    # priors: an idle prefill worker wins (~100 tokens: 0.06 s vs 0.1 s locally); two queued prompts
    # there (router-side count, before any poll) already make a decode worker's own prefill faster
    return attach_ingress(cluster, "routing-ttft", router__conditional_disaggregation="ttft",
                          router__prefill_rate_prior_tokens_per_s=2000,
                          router__local_prefill_rate_prior_tokens_per_s=1000, router__ttft_transfer_allowance_s=0.01,
                          router__local_prefill_max_pending_tokens=4096)


def test_ttft_rule_prefills_on_decode_workers_while_the_prefill_worker_is_busy(cluster, ttft_url):
    """router.conditional_disaggregation: ttft on a third endpoint. The prefill worker's steps are
    slowed (a busy prefill GPU); a burst of long prompts: the router weighs both paths per prompt,
    sends some to the prefill worker and keeps others on their decode workers (reason ttft_local,
    both estimates in the decision). The prefill worker reports its pending prompt tokens; every
    output equals the disaggregated path's token for token; no KV block stays in use."""
    import collections
    import concurrent.futures

    import ray

    from tests.reliability.faults import (actor_of, assert_no_leaks, counters, metric_samples, slow_engine_steps,
                                          workers_of)

    url = ttft_url
    model, block_size = cluster.config.model.served_model_name, cluster.config.engine.block_size
    decodes = [actor_of(cluster, wid) for wid in workers_of(url, "decode")]
    (prefill_id,) = workers_of(url, "prefill")
    prefill_actor = actor_of(cluster, prefill_id)
    before = sum(counters(a)["num_local_prefills"] for a in decodes)
    counted_before = metric_samples(url, "pdserve_ttft_remote_prefills_total", "why")
    prompts = [f"Burst prompt {i}. " + STORY for i in range(8)]
    slow_engine_steps(prefill_actor, 0.3)
    try:
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            burst = pool.map(complete, [(url, model, f"ttft-{i}", p) for i, p in enumerate(prompts)])
            pending = 0
            deadline = time.monotonic() + 20
            while pending == 0 and time.monotonic() < deadline:  # its own report, while the burst runs
                pending = ray.get(prefill_actor.state.remote(-1), timeout=30).load.num_pending_prefill_tokens
                time.sleep(0.05)
            texts = list(burst)
    finally:
        slow_engine_steps(prefill_actor, 0)
    assert pending > 0, "the busy prefill worker never reported pending prefill tokens"
    decisions = httpx.get(url + "/v1/routing/recent", timeout=30).json()["decisions"][-len(prompts):]
    reasons = [d["reason"] for d in decisions]
    assert "disaggregated" in reasons and "ttft_local" in reasons, reasons
    for d in decisions:
        assert d["ttft_local_s"] > 0 and d["ttft_remote_s"] > 0, d
        fits = -(-d["local_pending_tokens"] // block_size) <= d["local_free_blocks"]
        local_allowed = d["local_pending_tokens"] <= 4096 and fits
        assert (d["reason"] == "ttft_local") == (local_allowed and d["ttft_local_s"] < d["ttft_remote_s"]), d
        assert d["remote_because"] == (None if d["reason"] == "ttft_local" else
                                       "slower" if local_allowed else
                                       "over_cap" if d["local_pending_tokens"] > 4096 else "short_of_blocks"), d
    # /metrics counts each prompt the rule sent away under its cause
    sent_away = collections.Counter(d["remote_because"] for d in decisions if d["remote_because"])
    counted = metric_samples(url, "pdserve_ttft_remote_prefills_total", "why")
    assert all(counted.get(why, 0) - counted_before.get(why, 0) >= n for why, n in sent_away.items()), (
        sent_away, counted, counted_before)
    after = sum(counters(a)["num_local_prefills"] for a in decodes)
    assert after - before >= reasons.count("ttft_local"), (before, after, reasons)
    # the same prompts, disaggregated (the default endpoint, idle prefill worker, fresh salts)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        reference = list(pool.map(complete, [(cluster.url, model, f"ref-{i}", p) for i, p in enumerate(prompts)]))
    assert texts == reference
    assert_no_leaks(url)


def test_ttft_rule_with_decode_workers_short_of_kv_loses_nothing(cluster, ttft_url):
    """The same endpoint, both decode workers cut to 64 KV blocks (two of these prompts each) and
    slowed: a burst of 10 long prompts makes imports wait for free blocks (beside any prompt the
    rule keeps local: first come, first served in the decode engines). Every request completes
    with the disaggregated path's tokens; no transfer fails, no prefill falls back, no block leaks;
    the waits are counted (pdserve_import_waits_total)."""
    import concurrent.futures

    import ray

    from tests.reliability.faults import actor_of, assert_no_leaks, counters, slow_engine_steps, workers_of

    model = cluster.config.model.served_model_name
    decode_ids = workers_of(ttft_url, "decode")
    decodes = [actor_of(cluster, wid) for wid in decode_ids]
    prompts = [f"Short of KV {i}. " + STORY for i in range(10)]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # the default endpoint, full KV, idle workers
        reference = list(pool.map(complete, [(cluster.url, model, f"kvref-{i}", p) for i, p in enumerate(prompts)]))
    sizes = {wid: ray.get(a.stats.remote(), timeout=30).num_total_blocks for wid, a in zip(decode_ids, decodes)}
    before = [counters(a) for a in decodes]
    for a in decodes:
        ray.get(a.resize.remote(64), timeout=60)
    for a in decodes:
        slow_engine_steps(a, 0.05)
    try:
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            tokens = list(pool.map(complete, [(ttft_url, model, f"kv-{i}", p) for i, p in enumerate(prompts)]))
    finally:
        for wid, a in zip(decode_ids, decodes):
            slow_engine_steps(a, 0)
            ray.get(a.resize.remote(sizes[wid]), timeout=60)
    assert tokens == reference
    after = [counters(a) for a in decodes]
    for b, a in zip(before, after):
        assert (a["num_transfer_failures"], a["num_prefill_fallbacks"]) == \
            (b["num_transfer_failures"], b["num_prefill_fallbacks"]), (b, a)
    moved = sum(a["num_transfers"] - b["num_transfers"] + a["num_local_prefills"] - b["num_local_prefills"]
                for b, a in zip(before, after))
    assert moved >= len(prompts), (before, after)
    # the pressure was real: some imports found too few free blocks and waited (and the cluster says so)
    assert sum(a["num_import_waits"] - b["num_import_waits"] for b, a in zip(before, after)) > 0, (before, after)
    metrics = httpx.get(ttft_url + "/metrics", timeout=30).text
    assert any(line.startswith("pdserve_import_waits_total{") and float(line.rsplit(" ", 1)[1]) > 0
               for line in metrics.splitlines()), metrics[-2000:]
    assert_no_leaks(ttft_url)
