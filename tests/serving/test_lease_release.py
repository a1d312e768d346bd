"""The decode worker's release of a prefill handle, on each of its paths:

    READ done inside half the lease TTL (counted from the prefill call)  -> release sent, not awaited
    READ done later but inside the TTL   -> release awaited; it succeeds, the import is committed
    READ done after the lease expired    -> release raises LeaseExpiredError: what was read is
                                            discarded and the request prefills elsewhere (locally)

Every path gives the greedy output of transformers' generate, and afterwards no KV block is used
or pinned on any worker. The READ is delayed by wrapping the real transceiver's read
(tests/reliability/faults.py); nothing is mocked. One cluster: 1 prefill + 1 decode, lease 6 s."""

import openai
import pytest

from tests.reliability.faults import actor_of, assert_no_leaks, counters, hold_kv_reads, workers_of

MAX_TOKENS = 6
LEASE_TTL_S = 6.0  # the fast path needs prefill + READ inside 3 s: true by far, even on a loaded box


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def cluster(pdserve_cluster, model_dir):
    c = pdserve_cluster(model_dir, prefix="lease-release", transfer__lease_ttl_s=LEASE_TTL_S, transfer__deadline_s=10)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def actors(cluster):
    (decode,) = workers_of(cluster.url, "decode")
    (prefill,) = workers_of(cluster.url, "prefill")
    return actor_of(cluster, decode), actor_of(cluster, prefill)


def complete(client, model_dir, prompt: list[int]) -> tuple[str, str]:
    """(the cluster's text, transformers' greedy text) for a token-id prompt."""
    from transformers import AutoTokenizer

    from tests.workers.engine.helpers import hf_greedy

    r = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"ignore_eos": True})
    want = AutoTokenizer.from_pretrained(model_dir).decode(hf_greedy(model_dir, prompt, MAX_TOKENS),
                                                           skip_special_tokens=True)
    return r.choices[0].text, want


def hops(actor) -> dict:
    import ray

    return ray.get(actor.hop_times.remote(True))


@pytest.mark.parametrize("hold_s, awaited", [(0.0, False), (3.5, True)], ids=["fast", "past-half-ttl"])
def test_release_awaited_only_past_half_the_lease(cluster, client, model_dir, actors, hold_s, awaited):
    decode, _ = actors
    before = counters(decode)
    hops(decode)  # clear
    hold_kv_reads(decode, hold_s)
    try:
        got, want = complete(client, model_dir, [20 + int(hold_s * 4) + i for i in range(24)])
    finally:
        hold_kv_reads(decode, 0)
    assert got == want
    timed = hops(decode)
    assert len(timed.get("read", ())) == 1, f"expected one remote prefill with a READ, hops: {sorted(timed)}"
    assert ("release" in timed) == awaited, f"release awaited: {'release' in timed}, expected {awaited}"
    after = counters(decode)
    assert after["num_prefill_fallbacks"] == before["num_prefill_fallbacks"]
    assert_no_leaks(cluster.url)


def test_read_after_the_lease_expired_is_discarded(cluster, client, model_dir, actors):
    decode, _ = actors
    before = counters(decode)
    hold_kv_reads(decode, LEASE_TTL_S + 1.0)
    try:
        got, want = complete(client, model_dir, [200 + i for i in range(24)])
    finally:
        hold_kv_reads(decode, 0)
    assert got == want
    after = counters(decode)
    # the only prefill worker's lease expired: the decode worker prefilled locally instead
    assert after["num_prefill_fallbacks"] == before["num_prefill_fallbacks"] + 1
    assert after["num_local_prefills"] == before["num_local_prefills"] + 1
    assert_no_leaks(cluster.url)
