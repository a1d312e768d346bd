"""KV quota through the management API on a live decode worker: shrink it while requests run
(none lost, outputs token-identical to an undisturbed run, blocks in use kept until their
requests free them, then the memory is returned), the override sticks (etcd, the resizer leaves
it alone), grow it back, hand it back to the resizer."""

import asyncio
import json
import random
import threading
import time

import aetcd
import pytest

from cluster.keys import ClusterKeys
from tests.control_plane.conftest import error_of, eventually, workers_of

NUM_REQUESTS = 6
PROMPT_TOKENS = 48  # 12 blocks of 4: six imported prompts alone hold 72 blocks > the 64 we shrink to
MAX_TOKENS = 200  # a request peaks at (48 + 200) / 4 = 62 blocks: each fits the shrunk quota alone
SHRUNK = 64


def prompts():
    rng = random.Random(5)
    return [[rng.randrange(3, 380) for _ in range(PROMPT_TOKENS)] for _ in range(NUM_REQUESTS)]


def run_all(oai, model, stream=False):
    """All prompts at once (greedy), each in its own thread; returns the threads, the texts they
    fill in and their errors."""
    texts, errors = [None] * NUM_REQUESTS, []

    def one(i, prompt):
        try:
            kwargs = dict(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                          extra_body={"ignore_eos": True})
            if not stream:
                r = oai.completions.create(**kwargs)
                assert r.choices[0].finish_reason == "length"
                texts[i] = r.choices[0].text
                return
            parts, finish = [], None
            for chunk in oai.completions.create(stream=True, **kwargs):
                if chunk.choices:
                    parts.append(chunk.choices[0].text)
                    finish = chunk.choices[0].finish_reason or finish
            assert finish == "length"
            texts[i] = "".join(parts)
        except Exception as e:  # reported by the caller
            errors.append(f"request {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts())]
    for t in threads:
        t.start()
    return threads, texts, errors


def streams_holding_more_than(blocks, oai, model, admin, wid, want, attempts=3):
    """Start the streams and poll the worker until it holds more than ``blocks`` KV blocks (so a
    shrink to ``blocks`` must keep some in use): (threads, texts, errors, the worker's view then).
    Polled, not assumed from "every stream has started": on a fast box the first requests finish
    before the last starts, and on a loaded one they may not overlap enough. Streams that all end
    without it are checked (no errors, the undisturbed run's texts) and started again."""
    peaks = []
    for _ in range(attempts):
        threads, got, errors = run_all(oai, model, stream=True)
        peak = 0
        while any(t.is_alive() for t in threads):
            w = admin.get(f"/cluster/workers/{wid}").json()
            peak = max(peak, w["kv"]["used_blocks"])
            if peak > blocks:
                return threads, got, errors, w
            time.sleep(0.01)
        for t in threads:
            t.join()
        assert not errors and got == want, errors
        peaks.append(peak)
    pytest.fail(f"{attempts} rounds of streams never held more than {blocks} blocks at once (peaks {peaks})")


def etcd_override(cluster, worker_id):
    async def read():
        host, port = cluster.config.etcd.endpoints[0].rsplit(":", 1)
        async with aetcd.Client(host=host, port=int(port), timeout=5) as client:
            got = await client.get(ClusterKeys(cluster.config.cluster_name).kv_quota(worker_id).encode())
            return None if got is None else json.loads(got.value)

    return asyncio.run(read())


def test_shrink_under_load_loses_nothing_then_returns_memory_and_grows_back(cluster, admin, oai):
    model = cluster.config.model.served_model_name
    wid = workers_of(admin, "decode")[0]["worker_id"]
    threads, want, errors = run_all(oai, model)
    [t.join() for t in threads]
    assert not errors and all(want), errors

    threads, got, errors, before = streams_holding_more_than(SHRUNK, oai, model, admin, wid, want)
    r = admin.put(f"/cluster/kv-quota/{wid}", json={"num_blocks": SHRUNK})
    assert r.status_code == 200, r.text
    result = r.json()
    assert (result["override_blocks"], result["target_blocks"], result["num_usable_blocks"]) == (SHRUNK, SHRUNK, SHRUNK)
    assert result["num_pending_blocks"] > 0 and not result["done"]  # in-use blocks were not taken
    assert result["num_blocks"] == SHRUNK + result["num_pending_blocks"]
    during = admin.get(f"/cluster/workers/{wid}").json()["kv"]
    assert during["target_blocks"] == SHRUNK and during["override_blocks"] == SHRUNK

    for t in threads:
        t.join(300)
    assert not errors, errors
    assert got == want  # greedy: token-identical to the undisturbed run, none lost

    after = eventually(lambda: (w := admin.get(f"/cluster/workers/{wid}").json())["kv"]["num_blocks"] == SHRUNK and w,
                       60, what="the retiring segments to be returned once their requests finished")
    kv = after["kv"]
    assert kv["kv_bytes"] == SHRUNK * kv["block_bytes"] < before["kv"]["kv_bytes"]
    assert kv["used_blocks"] == 0
    print(json.dumps({"measure": "kv quota shrink through the API", "worker": wid,
                      "kv_bytes_before": before["kv"]["kv_bytes"], "kv_bytes_after": kv["kv_bytes"],
                      "rss_before": before["process"]["rss_bytes"], "rss_after": after["process"]["rss_bytes"]}))

    # the override sticks: in etcd, and the resizer plans around it for a couple of rounds
    assert etcd_override(cluster, wid) == {"num_blocks": SHRUNK}
    rounds = admin.get("/cluster").json()["kv_quota"]["num_rounds"]
    eventually(lambda: admin.get("/cluster").json()["kv_quota"]["num_rounds"] >= rounds + 2, 30, what="2 rounds")
    quota = admin.get("/cluster/kv-quota").json()
    assert all(wid not in n["targets"] for n in quota["resizer"]["nodes"])
    assert {w["worker_id"]: w["kv"]["target_blocks"] for w in quota["workers"] if w["kv"]}[wid] == SHRUNK

    r = admin.put(f"/cluster/kv-quota/{wid}", json={"num_blocks": 256})
    assert r.status_code == 200 and r.json()["num_blocks"] == 256 and r.json()["done"], r.text
    ok = oai.completions.create(model=model, prompt=prompts()[0], max_tokens=MAX_TOKENS, temperature=0,
                                extra_body={"ignore_eos": True})
    assert ok.choices[0].text == want[0]

    r = admin.delete(f"/cluster/kv-quota/{wid}")
    assert r.status_code == 200 and r.json() == {"worker_id": wid, "had_override": True}
    assert etcd_override(cluster, wid) is None
    eventually(lambda: admin.get(f"/cluster/workers/{wid}").json()["kv"]["planned_blocks"] is not None, 30,
               what="the resizer to plan the worker again")
    assert admin.delete(f"/cluster/kv-quota/{wid}").json()["had_override"] is False


def test_a_quota_cannot_be_set_on_a_worker_that_is_not_ready(admin):
    r = admin.put("/cluster/kv-quota/prefill-99", json={"num_blocks": 64})
    assert r.status_code == 404 and error_of(r)["code"] == "worker_not_found"
