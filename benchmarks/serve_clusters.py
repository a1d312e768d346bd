"""The clusters a serving benchmark compares, all inside one Ray instance and one etcd.

    disaggregated  P prefill workers + D decode workers (decode prefills locally only when the
                   uncached part of a prompt is below router.local_prefill_threshold_tokens)
    colocated      P + D decode workers and no prefill pool: every worker prefills and decodes
                   (pools.prefill.replicas = min_replicas = 0, router.min_prefill_workers = 0)

Each cluster gets one OpenAI endpoint per routing policy over the same workers (Serve apps under
their own route prefixes; cf. tests/conftest.py attach_ingress), so kv_aware and round_robin are
measured on the very same processes. Clusters are started one at a time and stopped before the
next, so an idle cluster never takes CPU from the one being measured.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cluster.etcd_server import pick_free_port

MODES = ("disaggregated", "colocated")
ROUTINGS = ("kv_aware", "round_robin")  # compared by default
ALL_ROUTINGS = (*ROUTINGS, "cache_aware")  # every router.policy (--routings)


@dataclass
class BenchEnv:
    """One Ray (with Serve on a free loopback port) and one local etcd for the whole benchmark."""

    run_dir: Path
    num_cpus: int = 2
    num_gpus: int = 0
    serve_port: int = 0
    etcd: object = None

    def start(self) -> "BenchEnv":
        import os

        import ray
        from ray import serve

        from cluster.etcd_server import LocalEtcd

        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("PDSERVE_RUN_DIR", str(self.run_dir / "pdserve-run"))
        self.etcd = LocalEtcd(self.run_dir / "etcd").start()
        ray.init(address="local", num_cpus=self.num_cpus, num_gpus=self.num_gpus, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
        self.serve_port = pick_free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.serve_port})
        return self

    def stop(self) -> None:
        import ray
        from ray import serve

        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        if self.etcd is not None:
            self.etcd.stop()


@dataclass
class BenchCluster:
    mode: str
    cluster: object  # cluster.launcher.Cluster
    urls: dict[str, str] = field(default_factory=dict)  # routing policy -> endpoint URL
    apps: list[str] = field(default_factory=list)  # extra Serve apps (the round-robin ingress)

    def stop(self) -> None:
        # the cluster removes every app of its own at once (not one graceful shutdown after another)
        self.cluster.extra_apps.extend(a for a in self.apps if a not in self.cluster.extra_apps)
        self.cluster.stop()


def pool_overrides(mode: str, num_prefill: int, num_decode: int, gpus_per_worker: float) -> dict:
    """Dotted config overrides for the pools of one mode (same total workers in both modes)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    total = num_prefill + num_decode
    if mode == "disaggregated":
        prefill = {"replicas": num_prefill, "min_replicas": num_prefill, "max_replicas": max(4, num_prefill)}
        decode = {"replicas": num_decode, "min_replicas": num_decode, "max_replicas": max(4, num_decode)}
        min_prefill = num_prefill
    else:
        prefill = {"replicas": 0, "min_replicas": 0, "max_replicas": 4}
        decode = {"replicas": total, "min_replicas": total, "max_replicas": max(4, total)}
        min_prefill = 0
    out = {"router.min_prefill_workers": min_prefill, "router.min_decode_workers": decode["replicas"]}
    for role, pool in (("prefill", prefill), ("decode", decode)):
        for key, value in pool.items():
            out[f"pools.{role}.{key}"] = value
        out[f"pools.{role}.num_gpus"] = gpus_per_worker
    return out


def start_cluster(env: BenchEnv, mode: str, routings: tuple[str, ...], base: dict, num_prefill: int,
                  num_decode: int, gpus_per_worker: float, ready_timeout_s: float = 900) -> BenchCluster:
    """A started cluster of ``mode`` with one endpoint per routing policy (the first one is the
    cluster's own endpoint)."""
    from cluster.config import load_config
    from cluster.launcher import Cluster

    name = f"bench-{mode[:4]}-{uuid.uuid4().hex[:6]}"
    overrides = {
        **base, "cluster_name": name, "etcd.endpoints": [env.etcd.endpoint], "server.port": env.serve_port,
        "server.admin_port": pick_free_port(), "server.admin_token": uuid.uuid4().hex,
        **pool_overrides(mode, num_prefill, num_decode, gpus_per_worker), "router.policy": routings[0],
    }
    cluster = Cluster(load_config(None, overrides), say=lambda m: None, app_name=name, route_prefix=f"/{name}")
    bench = BenchCluster(mode, cluster)
    try:
        cluster.start(ready_timeout_s=ready_timeout_s)
        bench.urls[routings[0]] = cluster.url
        for policy in routings[1:]:
            app = f"{name}-{policy.replace('_', '')}"
            bench.urls[policy] = _attach_ingress(cluster, app, {"router": {"policy": policy}})
            bench.apps.append(app)
    except BaseException:
        bench.stop()
        raise
    return bench


def _attach_ingress(cluster, app: str, patch: dict, timeout_s: float = 300) -> str:
    from ray import serve

    from cluster.launcher import config_as_dict
    from router.app import build_app

    raw = config_as_dict(cluster.config)
    for section, values in patch.items():
        raw[section].update(values)
    serve.run(build_app({"config": raw}), name=app, route_prefix=f"/{app}")
    url = cluster.url.rsplit("/", 1)[0] + f"/{app}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/ready", timeout=10).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"endpoint {url} not ready within {timeout_s:.0f} s")
        time.sleep(0.5)


def config_override(item: str) -> tuple[str, object]:
    """One ``--set KEY=VALUE`` argument (an argparse ``type``) -> (dotted key, value); VALUE is
    parsed as JSON when it parses (numbers, true/false, lists), else kept as a string."""
    import argparse
    import json

    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set wants KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def worker_hop_times(url: str, namespace: str) -> dict[str, list[float]]:
    """Every worker's hop_times since the last call (cleared), pooled per role: {"decode.read": [s, ...]}.
    The workers are the ones the endpoint's router knows (GET /v1/routing/recent); needs ray.init."""
    import ray

    pooled: dict[str, list[float]] = {}
    workers = httpx.get(url + "/v1/routing/recent", timeout=30).json()["workers"]
    for wid, w in workers.items():
        actor = ray.get_actor(wid, namespace=namespace)
        for name, times in ray.get(actor.hop_times.remote(True), timeout=30).items():
            pooled.setdefault(f"{w['role']}.{name}", []).extend(times)
    return pooled
