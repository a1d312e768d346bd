"""The live dashboard in a real headless Chromium against a running cluster: the page is public but
shows nothing without the token, asks for it, refuses a wrong one, shows the pools and workers,
the endpoint's traffic and routing decisions, and follows a pool being scaled up and down.

Waits are liveness bounds (the page polls every 0.5 s here), never speed checks."""

from __future__ import annotations

import os
import time

import httpx

from tests.dashboard.conftest import TOKEN

SCALE_WAIT_MS = 240_000  # a new worker loads its model and registers; generous on a loaded 2-core box
SHOW_WAIT_MS = 60_000


def open_dashboard(page, cluster, token: str | None = TOKEN):
    fragment = f"#token={token}&interval=0.5" if token else ""
    page.goto(f"{cluster.admin_url}/dashboard{fragment}")


def wait_until(page, js: str, timeout_ms: int) -> None:
    """Polls a JS expression in the page until truthy. (Not page.wait_for_function: its in-page
    polling evaluates strings, which the page's Content-Security-Policy rightly forbids.)"""
    deadline = time.monotonic() + timeout_ms / 1000
    while not page.evaluate(js):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_ms / 1000:.0f} s waiting for: {js}")
        page.wait_for_timeout(200)


def row(page, worker_id: str, state: str | None = None) -> str:
    return f'#workers tr[data-worker-id="{worker_id}"]' + (f'[data-state="{state}"]' if state else "")


def test_the_page_is_public_and_holds_no_data(cluster):
    r = httpx.get(f"{cluster.admin_url}/dashboard", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "connect-src 'self'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp.split(";")[1]
    assert r.headers["cache-control"] == "no-store"
    assert cluster.config.cluster_name not in r.text and TOKEN not in r.text
    # its data routes are not public
    for path in ("/cluster", "/cluster/workers", "/cluster/traffic"):
        assert httpx.get(f"{cluster.admin_url}{path}", timeout=30).status_code == 401, path
    assert httpx.post(f"{cluster.admin_url}/dashboard", timeout=30).status_code == 401


def test_without_a_token_it_asks_and_a_wrong_one_is_refused(cluster, page):
    open_dashboard(page, cluster, token=None)
    page.wait_for_selector("#login", state="visible", timeout=SHOW_WAIT_MS)
    assert page.locator("#workers tbody tr").count() == 0
    page.fill("#token-input", "not-the-token")
    page.click("#login button")
    wait_until(page, "document.getElementById('banner').textContent.includes('401')", SHOW_WAIT_MS)
    assert page.is_visible("#login") and not page.is_visible("#app")
    assert page.locator("#workers tbody tr").count() == 0
    # the right token through the form works
    page.fill("#token-input", TOKEN)
    page.click("#login button")
    page.wait_for_selector(row(page, "decode-0", "ready"), timeout=SHOW_WAIT_MS)


def test_it_shows_the_workers_traffic_and_routing_decisions(cluster, page, page_errors, admin):
    open_dashboard(page, cluster)
    page.wait_for_selector(row(page, "prefill-0", "ready"), timeout=SHOW_WAIT_MS)
    page.wait_for_selector(row(page, "decode-0", "ready"), timeout=SHOW_WAIT_MS)
    assert "token" not in page.url  # the fragment is gone from the address bar
    assert page.text_content("#cluster-name") == f"cluster {cluster.config.cluster_name}"
    # the workers the API lists, no more, no less
    listed = {w["worker_id"] for w in admin.get("/cluster/workers").json()["workers"]}
    shown = set(page.eval_on_selector_all("#workers tbody tr", "rs => rs.map(r => r.dataset.workerId)"))
    assert shown == listed
    kv_cell = page.text_content(row(page, "decode-0") + " td:nth-child(4)")
    assert "/ 256" in kv_cell  # used / quota blocks (engine.num_kv_blocks of the fixture)
    # the prefill backlog column: the worker's own report, as the API lists it (idle: 0 tokens)
    api_load = {w["worker_id"]: w["load"] for w in admin.get("/cluster/workers").json()["workers"]}
    backlog = page.text_content(row(page, "decode-0") + " td:nth-child(9)")
    assert backlog == str(api_load["decode-0"]["num_pending_prefill_tokens"]) == "0"
    pools = page.eval_on_selector_all("#pools tbody tr", "rs => rs.map(r => r.dataset.pool)")
    assert sorted(pools) == ["decode", "prefill"]

    # traffic: a few requests through the endpoint show up as routing decisions and latency samples
    model = cluster.config.model.served_model_name
    for i in range(3):
        r = httpx.post(f"{cluster.url}/v1/completions", timeout=120, json={
            "model": model, "prompt": f"The capital of France is {i}", "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200, r.text
    wait_until(page, "document.querySelectorAll('#decisions tr.decision').length >= 3", SHOW_WAIT_MS)
    wait_until(page,
               "Number(document.querySelector('[data-spark=\"TTFT p50\"]')?.dataset.points || 0) >= 1", SHOW_WAIT_MS)
    first = page.eval_on_selector("#decisions tr.decision", "r => [...r.cells].map(c => c.textContent)")
    assert first[1] == "decode-0" and first[3] in ("disaggregated", "uncached_below_threshold")
    if os.environ.get("PDSERVE_DASHBOARD_SCREENSHOT"):  # a picture for the docs, on request
        page.screenshot(path=os.environ["PDSERVE_DASHBOARD_SCREENSHOT"], full_page=True)
    polls = int(page.eval_on_selector("body", "b => b.dataset.polls"))
    wait_until(page, f"Number(document.body.dataset.polls) > {polls}", SHOW_WAIT_MS)  # it keeps polling
    assert page_errors == []


def test_it_follows_a_scale_up_and_down(cluster, page, page_errors, admin):
    open_dashboard(page, cluster)
    page.wait_for_selector(row(page, "decode-0", "ready"), timeout=SHOW_WAIT_MS)
    assert page.locator(row(page, "decode-1")).count() == 0

    r = admin.post("/cluster/pools/decode/scale", json={"replicas": 2})
    assert r.status_code == 202, r.text
    (new_id,) = r.json()["started"]
    page.wait_for_selector(row(page, new_id), timeout=SHOW_WAIT_MS)  # shown while it starts
    page.wait_for_selector(row(page, new_id, "ready"), timeout=SCALE_WAIT_MS)
    wait_until(page, "document.querySelector('#pools tr[data-pool=\"decode\"] td:nth-child(3)').textContent === '2'",
               SHOW_WAIT_MS)

    r = admin.post("/cluster/pools/decode/scale", json={"replicas": 1})
    assert r.status_code == 202 and r.json()["stopping"] == [new_id], r.text
    page.wait_for_selector(row(page, new_id), state="detached", timeout=SCALE_WAIT_MS)
    assert page.locator(row(page, "decode-0", "ready")).count() == 1
    assert page_errors == []
