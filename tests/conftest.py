"""Suite-wide fixtures: tiny random-weight checkpoints (built once, cached on disk) and the
environment every test runs in (UCX on loopback, quiet tokenizers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One intra-op thread (here and in subprocesses: Ray workers, benchmark smoke runs): the test models
# are tiny, and on a busy 2-core box torch's OpenMP threads wait on each other at every op (a
# 64x128 linear took 2.4 ms with 2 threads under load vs 7 us with 1, measured on this machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
INTERPRETER_TESTS = "tests/workers/engine/test_triton_attention.py"
CACHE = Path(os.environ.get("PDSERVE_TEST_CACHE", REPO / ".cache" / "test-models"))


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """tiny_checkpoint(family) -> directory of a seeded random model + tokenizer."""
    from tests.tiny_models import build_tiny_checkpoint

    def build(family: str = "llama") -> str:
        return str(build_tiny_checkpoint(family, CACHE / f"tiny-{family}"))

    return build


# -- one Ray instance (with Serve) and one etcd for the whole session -----------------------------
# Starting Ray costs ~5 s and ~1 GB: every test that needs Ray shares this one. pdserve clusters
# inside it keep apart by cluster name (Ray namespace + etcd prefix) and Serve route prefix.
@pytest.fixture(scope="session")
def session_etcd(tmp_path_factory):
    from cluster.etcd_server import LocalEtcd

    etcd = LocalEtcd(tmp_path_factory.mktemp("session-etcd")).start()
    yield etcd
    etcd.stop()


@pytest.fixture(scope="session")
def ray_session():
    """Ray (local, in-process head) with Serve's HTTP proxy on a free loopback port."""
    import logging

    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=os.environ.get("PDSERVE_TEST_RAY_LOGS") == "1")
    from cluster.etcd_server import pick_free_port

    port = pick_free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield {"serve_port": port}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="package")
def pdserve_cluster(ray_session, session_etcd, tmp_path_factory):
    """pdserve_cluster(model_dir, prefix=None, **overrides) -> a started cluster.launcher.Cluster.
    Whatever is still running is stopped when the test package ends; a module-scoped cluster
    fixture should `yield` it and call .stop() itself, so that only one module's workers run at a
    time on a small CI machine."""
    import uuid

    from cluster.config import load_config
    from cluster.etcd_server import pick_free_port
    from cluster.launcher import Cluster

    started = []
    os.environ.setdefault("PDSERVE_RUN_DIR", str(tmp_path_factory.mktemp("pdserve-run")))

    def start(model_dir: str, prefix: str | None = None, **overrides) -> Cluster:
        name = f"t{uuid.uuid4().hex[:8]}"
        base = {
            "cluster_name": name, "model.path": model_dir, "model.device": "cpu",
            "etcd.endpoints": [session_etcd.endpoint], "etcd.lease_ttl_s": 3,
            "server.port": ray_session["serve_port"], "server.admin_port": pick_free_port(),
            "server.admin_token": "test-token",
            "engine.block_size": 4, "engine.num_kv_blocks": 256, "engine.blocks_per_segment": 32,
            "engine.max_num_batched_tokens": 128, "engine.max_num_seqs": 16,
            "pools.prefill.num_cpus": 0.1, "pools.decode.num_cpus": 0.1,
            "router.local_prefill_threshold_tokens": 0,
            # tests that kill workers inspect what the death left behind (routing, leases, leaks):
            # no replacement joins under them; tests/reliability/test_pool_keeper.py turns it on
            "server.replace_dead_workers": False,
        }
        base.update({k.replace("__", "."): v for k, v in overrides.items()})
        # app names and route prefixes are never reused here: stop() need not wait for Serve to
        # finish removing the apps (~3 s of graceful replica shutdown per app, per module)
        cluster = Cluster(load_config(None, base), say=lambda m: None, app_name=name, route_prefix=f"/{prefix or name}",
                          wait_for_app_removal=False)
        started.append(cluster)
        cluster.start(ready_timeout_s=300)
        return cluster

    yield start
    for c in started:
        c.stop()


def attach_ingress(cluster, prefix: str, **overrides):
    """A second OpenAI endpoint (e.g. another routing policy) over the same cluster's workers."""
    from ray import serve

    from cluster.config import parse_config
    from cluster.launcher import config_as_dict
    from router.app import build_app

    raw = config_as_dict(cluster.config)
    for dotted, value in overrides.items():
        node = raw
        *path, last = dotted.replace("__", ".").split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    parse_config(raw)  # validate early
    serve.run(build_app({"config": raw}), name=f"{cluster.app_name}-{prefix}", route_prefix=f"/{prefix}")
    cluster.extra_apps.append(f"{cluster.app_name}-{prefix}")
    base = cluster.url.rsplit("/", 1)[0] + f"/{prefix}"
    import httpx
    import time

    deadline = time.monotonic() + 120
    while httpx.get(base + "/ready", timeout=10).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(f"ingress {prefix} not ready")
        time.sleep(0.2)
    return base


def pytest_collection_finish(session):
    """The Triton interpreter's checks (~3 CPU-minutes in three processes) start now, niced, and
    run while the rest of the suite does; test_triton_attention.py collects their results."""
    if any(item.nodeid.startswith(INTERPRETER_TESTS) for item in session.items):
        from tests.workers.engine import interpreter_runs

        interpreter_runs.start()


def pytest_sessionfinish(session, exitstatus):
    from tests.workers.engine import interpreter_runs

    interpreter_runs.stop()  # whatever still runs (nothing when they were not started)
