"""Fixtures for KV transfer tests: one Ray instance for the whole tests/kv_transfer package,
KVPeer actors on it."""

from __future__ import annotations

import logging
import os

import pytest

import tests.kv_transfer.peer as peer_module

os.environ.setdefault("UCX_NET_DEVICES", "lo")


@pytest.fixture(scope="package")
def ray_cluster():
    """Ray for this package: reuses an instance another fixture started (never shutting that one
    down), else starts a small local one and stops it after the package's last test."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=os.environ.get("PDSERVE_TEST_RAY_LOGS") == "1")
        started = True
    # Actors import KVPeer from this test package; ship it by value so workers need no sys.path.
    ray.cloudpickle.register_pickle_by_value(peer_module)
    yield ray
    if started:
        ray.shutdown()


class _Spawner:
    """spawn(worker_id, backend="nixl", env=None, **kwargs) -> a KVPeer actor handle. ``env`` adds
    environment variables for that actor's process (e.g. UCX_TLS)."""

    def __init__(self, ray):
        self.ray = ray
        self.actors = []

    def __call__(self, worker_id: str, backend: str = "nixl", env: dict | None = None, **kwargs):
        env_vars = {"UCX_NET_DEVICES": "lo", **(env or {})}
        cls = self.ray.remote(peer_module.KVPeer).options(num_cpus=0, max_concurrency=4,
                                                           runtime_env={"env_vars": env_vars})
        actor = cls.remote(worker_id, backend, **kwargs)
        self.ray.get(actor.pid.remote())  # constructed (raises here if the transceiver failed)
        self.actors.append(actor)
        return actor

    def kill_all(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:
                pass


@pytest.fixture(scope="module")
def spawn_peer(ray_cluster):
    """KVPeer actors that live until the module's last test."""
    spawner = _Spawner(ray_cluster)
    yield spawner
    spawner.kill_all()


@pytest.fixture
def spawn_peer_each(ray_cluster):
    """KVPeer actors that live for one test (big caches, or processes the test kills/stops)."""
    spawner = _Spawner(ray_cluster)
    yield spawner
    spawner.kill_all()
