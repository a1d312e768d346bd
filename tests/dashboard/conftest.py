"""A live cluster (tiny llama, 1 prefill + 1 decode, room to scale decode to 2) with its management
API, and a real headless Chromium driven by Playwright (Debian's /usr/bin/chromium; Playwright's
own browser downloads are never used)."""

from __future__ import annotations

import os
import secrets

import httpx
import pytest

TOKEN = f"dash-{secrets.token_urlsafe(16)}"
CHROMIUM = os.environ.get("PDSERVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="package")
def cluster(pdserve_cluster, tiny_checkpoint):
    import ray

    c = pdserve_cluster(tiny_checkpoint("llama"), prefix="dashboard", server__admin_token=TOKEN,
                        pools__decode__max_replicas=2)
    # served under a route prefix here: tell the manager where the endpoint is (GET /cluster/traffic)
    ray.get(c.manager.set_endpoint_url.remote(c.url))
    yield c
    # stopped when this package ends: pdserve_cluster's own clean-up runs only when the whole
    # suite does, and an idle cluster's workers keep using CPU meanwhile
    c.stop()


@pytest.fixture(scope="package")
def admin(cluster):
    with httpx.Client(base_url=cluster.admin_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="package")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (or `make system-deps`), "
                    "or set PDSERVE_CHROMIUM to its path")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: pip install -e '.[test]' (never `playwright install`: "
                    "the tests use the system Chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page_errors() -> list[str]:
    return []


@pytest.fixture
def page(browser, page_errors):
    """A fresh browser context (empty sessionStorage) per test; uncaught page errors are collected."""
    context = browser.new_context()
    pg = context.new_page()
    pg.on("pageerror", lambda e: page_errors.append(str(e)))
    pg.on("console", lambda m: page_errors.append(m.text) if m.type == "error" else None)
    yield pg
    context.close()
