"""The management API against a live cluster (real Ray, etcd, tiny llama, HTTP): views, auth on
every route, clear 4xx bodies, scaling up and down (etcd + routing are the ground truth), draining
a worker with a stream running through it, removal, the `pdserve cluster` CLI, and the token
never reaching a log."""

import json
import threading
import uuid

import httpx
import pytest

from cluster.cli import main as cli
from tests.control_plane.conftest import (BLOCK_BUDGET, TOKEN, error_of, etcd_workers, eventually, recent_decisions,
                                          router_workers, workers_of)

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
MARKER = f"no-such-worker-{uuid.uuid4().hex[:8]}"


def model(cluster):
    return cluster.config.model.served_model_name


def test_views_show_pools_workers_and_kv(cluster, admin):
    s = admin.get("/cluster").json()
    assert s["cluster_name"] == cluster.config.cluster_name and s["ready"] and s["etcd_connected"]
    pools = {p["role"]: p for p in s["pools"]}
    assert {r: (p["desired"], p["ready"], p["registered"]) for r, p in pools.items()} == {"prefill": (1, 1, 1),
                                                                                           "decode": (1, 1, 1)}
    assert pools["decode"]["max_replicas"] == 3 and s["totals"]["kv_total_blocks"] > 0
    assert s["autoscaling"]["enabled"] and s["kv_quota"]["enabled"]
    workers = admin.get("/cluster/workers").json()["workers"]
    assert sorted(w["worker_id"] for w in workers) == ["decode-0", "prefill-0"]
    w = admin.get("/cluster/workers/decode-0").json()
    assert (w["role"], w["state"], w["registered"], w["model"]) == ("decode", "ready", True, "tiny-llama")
    assert 0 <= w["lease"]["remaining_ttl_s"] <= w["lease"]["granted_ttl_s"] == cluster.config.etcd.lease_ttl_s
    assert w["lease"]["registered_for_s"] >= 0 and w["process"]["rss_bytes"] > 0 and w["load"]["is_draining"] is False
    kv = w["kv"]
    assert kv["kv_bytes"] == kv["num_blocks"] * kv["block_bytes"] and kv["used_blocks"] <= kv["num_blocks"]
    assert w["probe_error"] is None and w["etcd_error"] is None
    # each worker reports the engine settings it runs with: the prefill pool's own over engine.*
    engines = {r: admin.get(f"/cluster/workers/{r}-0").json()["process"]["engine"] for r in ("prefill", "decode")}
    assert {r: (e["max_num_batched_tokens"], e["max_num_seqs"], e["block_size"]) for r, e in engines.items()} == {
        "prefill": (64, 8, 4), "decode": (128, 16, 4)}


def test_every_route_is_401_without_the_token(cluster, admin):
    spec = admin.get("/openapi.json").json()
    routes = [(method.upper(), path.format(worker_id="decode-0", role="decode"))
              for path, ops in spec["paths"].items() for method in ops]
    assert len(routes) >= 12
    routes += [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/nope")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = httpx.request(method, cluster.admin_url + path, headers=headers, json={"replicas": 1}, timeout=30)
            assert r.status_code == 401, (method, path, r.text)
            assert error_of(r)["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
    assert admin.get("/cluster/workers/decode-0").json()["state"] == "ready"  # nothing was drained or removed


@pytest.mark.parametrize("method,path,body,status,code,words", [
    ("POST", "/cluster/pools/decode/scale", {"replicas": -1}, 400, "invalid_value", "replicas"),
    ("POST", "/cluster/pools/decode/scale", {"replicas": 99}, 400, "replicas_out_of_range", "[1, 3]"),
    ("POST", "/cluster/pools/decode/scale", {"replicas": "two"}, 400, "invalid_value", "replicas"),
    ("POST", "/cluster/pools/decode/scale", {}, 400, "invalid_value", "replicas"),
    ("POST", "/cluster/pools/decode/scale", {"replicas": 1, "extra": 1}, 400, "invalid_value", "extra"),
    ("POST", "/cluster/pools/gpu/scale", {"replicas": 1}, 404, "pool_not_found", "gpu"),
    ("GET", f"/cluster/workers/{MARKER}", None, 404, "worker_not_found", MARKER),
    ("DELETE", "/cluster/workers/decode-77", None, 404, "worker_not_found", "decode-77"),
    ("POST", "/cluster/workers/decode-77/drain", {}, 404, "worker_not_found", "decode-77"),
    ("POST", "/cluster/workers/decode-0/drain", {"timeout_s": -5}, 400, "invalid_value", "timeout_s"),
    ("GET", "/cluster/drains/decode-77", None, 404, "drain_not_found", "decode-77"),
    ("PUT", "/cluster/kv-quota/decode-77", {"num_blocks": 64}, 404, "worker_not_found", "decode-77"),
    ("PUT", "/cluster/kv-quota/decode-0", {"num_blocks": 0}, 400, "invalid_value", "num_blocks"),
    ("PUT", "/cluster/kv-quota/decode-0", {"num_blocks": -64}, 400, "invalid_value", "num_blocks"),
    ("DELETE", "/cluster/kv-quota/decode-77", None, 404, "worker_not_found", "decode-77"),
    ("PATCH", "/cluster", None, 405, "method_not_allowed", "PATCH"),
])
def test_bad_values_get_a_clear_4xx(admin, method, path, body, status, code, words):
    r = admin.request(method, path, json=body)
    assert r.status_code == status, r.text
    err = error_of(r)
    assert err["code"] == code and words in err["message"], err


def test_a_body_that_is_not_json_is_a_400(admin):
    r = admin.post("/cluster/pools/decode/scale", content=b"{replicas", headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_of(r)["param"] == "body"


def test_scale_up_workers_register_and_take_traffic(cluster, admin, oai):
    r = admin.post("/cluster/pools/decode/scale", json={"replicas": 3})
    assert r.status_code == 202 and r.json()["started"] == ["decode-1", "decode-2"], r.text
    pool = lambda: {p["role"]: p for p in admin.get("/cluster").json()["pools"]}["decode"]  # noqa: E731
    eventually(lambda: pool()["ready"] == 3 and pool()["registered"] == 3, 120, what="3 ready decode workers")
    assert pool()["desired"] == 3
    assert etcd_workers(cluster, "decode") == {"decode-0", "decode-1", "decode-2"}
    eventually(lambda: {"decode-1", "decode-2"} <= router_workers(cluster), 30, what="the router polls the new workers")
    # traffic: concurrent distinct prompts until the new workers have been routed to
    seen = set()

    def one(i):
        oai.completions.create(model=model(cluster), prompt=f"request {i} goes somewhere", max_tokens=24, **GREEDY)

    for round_ in range(6):
        threads = [threading.Thread(target=one, args=(round_ * 8 + i,)) for i in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        seen |= {d["decode"] for d in recent_decisions(cluster)}
        if {"decode-1", "decode-2"} & seen:
            break
    assert {"decode-1", "decode-2"} & seen, seen
    # the KV resizer keeps the node in its budget now that 4 workers share it
    def in_budget():  # the workers' allocations and a resizer round that planned all four
        kv = [w["kv"] for w in admin.get("/cluster/workers").json()["workers"] if w["kv"]]
        nodes = admin.get("/cluster/kv-quota").json()["resizer"]["nodes"]
        return (len(kv) == 4 and sum(k["num_blocks"] for k in kv) <= BLOCK_BUDGET and nodes
                and len(nodes[0]["targets"]) == 4 and nodes[0])
    node = eventually(in_budget, 60, what=f"the node's KV allocation within {BLOCK_BUDGET} blocks, planned for 4")
    assert node["budget_blocks"] == BLOCK_BUDGET


def test_drain_lets_the_stream_through_it_finish_then_the_worker_leaves(cluster, admin, oai):
    prompt = "Draining a worker must not cut a stream short:"
    want = oai.completions.create(model=model(cluster), prompt=prompt, max_tokens=320, **GREEDY).choices[0].text
    stream = oai.completions.create(model=model(cluster), prompt=prompt, max_tokens=320, stream=True, **GREEDY)
    chunks = [next(stream)]
    target = recent_decisions(cluster)[-1]["decode"]
    r = admin.post(f"/cluster/workers/{target}/drain", json={"timeout_s": 60})
    assert r.status_code == 202 and r.headers["location"] == f"/cluster/drains/{target}", r.text
    assert r.json()["state"] == "draining"
    draining = admin.get(f"/cluster/workers/{target}").json()
    assert draining["state"] == "draining" and draining["load"]["num_inflight"] == 1  # our stream, still running
    with pytest.raises(httpx.HTTPStatusError) as again:
        admin.post(f"/cluster/workers/{target}/drain").raise_for_status()
    assert again.value.response.status_code == 409
    chunks += list(stream)  # the stream goes on through the draining worker
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # new work goes elsewhere while it drains, and nothing fails
    r = oai.completions.create(model=model(cluster), prompt="after the drain", max_tokens=8, **GREEDY)
    assert r.choices[0].finish_reason == "length" and recent_decisions(cluster)[-1]["decode"] != target
    drain = eventually(lambda: (d := admin.get(f"/cluster/drains/{target}").json())["state"] != "draining" and d,
                       90, what=f"the drain of {target} to end")
    assert drain["state"] == "drained" and drain["finished_at"] >= drain["started_at"]
    assert admin.get(f"/cluster/workers/{target}").status_code == 404
    assert target not in etcd_workers(cluster, "decode")
    eventually(lambda: target not in router_workers(cluster), 30, what="the router to drop the drained worker")


def test_scale_down_drains_the_newest_and_they_leave(cluster, admin):
    before = {w["worker_id"] for w in workers_of(admin, "decode")}
    assert len(before) == 2
    r = admin.post("/cluster/pools/decode/scale", json={"replicas": 1})
    assert r.status_code == 202 and len(r.json()["stopping"]) == 1, r.text
    gone = r.json()["stopping"][0]
    eventually(lambda: etcd_workers(cluster, "decode") == before - {gone}, 90, what=f"{gone} to leave etcd")
    eventually(lambda: gone not in router_workers(cluster), 30, what=f"{gone} to leave routing")
    eventually(lambda: admin.get(f"/cluster/drains/{gone}").json()["state"] == "drained", 30, what="drain done")
    pool = {p["role"]: p for p in admin.get("/cluster").json()["pools"]}["decode"]
    assert (pool["desired"], pool["ready"], pool["draining"]) == (1, 1, 0)


def test_autoscaler_samples_the_live_cluster(cluster, admin, oai):
    """Its latencies come from the endpoint's histograms (scraped each round), its queues and KV
    use from the workers; set never to act here, it holds."""
    done = threading.Event()

    def traffic():
        while not done.is_set():
            oai.completions.create(model=model(cluster), prompt="keep the endpoint busy", max_tokens=8, **GREEDY)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        a = eventually(lambda: (s := admin.get("/cluster").json()["autoscaling"])["last_sample"]["ttft_p90_s"]
                       is not None and s, 60, what="a sample with a TTFT p90 from the endpoint's histogram")
    finally:
        done.set()
        t.join()
    assert 0 < a["last_sample"]["ttft_p90_s"] < 120 and a["endpoint_url"] == cluster.url
    assert a["endpoint_app"] == cluster.app_name and a["last_window"]["num_replicas"] == 1
    assert a["last_error"] is None and a["last_scrape_error"] is None, a
    assert "hold" in a["last_decision"]["reason"] and a["num_changes"] == 0


def test_admin_metrics_export_quota_and_use(admin):
    text = admin.get("/metrics").text
    for name in ("pdserve_kv_quota_blocks{", "pdserve_kv_used_blocks{", "pdserve_kv_bytes{",
                 "pdserve_node_kv_budget_blocks{", "pdserve_pool_desired_replicas{", "pdserve_worker_rss_bytes{"):
        assert name in text, name


def test_cli_against_the_live_api(cluster, admin, capsys):
    base = ["cluster", "--url", cluster.admin_url, "--token", TOKEN]
    assert cli(base + ["status"]) == 0
    assert json.loads(capsys.readouterr().out)["cluster_name"] == cluster.config.cluster_name
    assert cli(base + ["workers"]) == 0
    assert {w["role"] for w in json.loads(capsys.readouterr().out)["workers"]} == {"prefill", "decode"}
    assert cli(base + ["quota"]) == 0 and "resizer" in json.loads(capsys.readouterr().out)
    assert cli(base + ["drain", "decode-77"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "worker_not_found"
    assert cli(["cluster", "--url", cluster.admin_url, "--token", "wrong", "status"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["type"] == "authentication_error"
    assert cli(base + ["scale", "prefill", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["started"] == ["prefill-1"]
    eventually(lambda: "prefill-1" in etcd_workers(cluster, "prefill"), 120, what="prefill-1 to register")
    assert cli(base + ["remove", "prefill-1"]) == 0  # immediate: its key goes at once, no lease wait
    assert json.loads(capsys.readouterr().out) == {"worker_id": "prefill-1", "role": "prefill", "state": "removed"}
    assert etcd_workers(cluster, "prefill") == {"prefill-0"}
    assert admin.get("/cluster/workers/prefill-1").status_code == 404


def test_the_token_never_reaches_a_log(cluster, admin):
    from pathlib import Path

    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    marker = f"GET /cluster/workers/{MARKER}"  # requested by test_bad_values_get_a_clear_4xx

    def scan():
        hits = {"marker": False, "token": []}
        for path in logs.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                hits["marker"] |= marker.encode() in data
                if TOKEN.encode() in data:
                    hits["token"].append(str(path))
        return hits

    eventually(lambda: scan()["marker"], 30, what="the management API's access log line in Ray's logs")
    assert scan()["token"] == []
