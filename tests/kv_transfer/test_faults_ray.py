"""Fault injection between two Ray actors: the prefill process killed mid-transfer, or stopped so
the transfer cannot finish by its deadline. Every failure surfaces as its typed error, and the
prefill side's pins end (released or expired), so nothing stays pinned."""

from __future__ import annotations

import os
import signal

import pytest

from kv_transfer.errors import DeadlineExceededError, PeerGoneError

# 64 KiB per (layer, kv, block), 512 KiB per block: 128 blocks = 64 MiB per read.
BIG = dict(layout_overrides={"num_kv_heads": 8, "head_dim": 128, "block_size": 16}, blocks_per_segment=64,
           num_segments=2)
ALL_BLOCKS = list(range(128))


@pytest.mark.parametrize("backend", ["nixl", "tcp"])
def test_prefill_killed_mid_transfer_is_peer_gone(backend, spawn_peer_each, ray_cluster):
    """The decode actor reads 64 MiB again and again; the prefill actor is killed while it does.
    The read in flight (or the next one) fails with PeerGoneError, not a hang or a generic error."""
    ray = ray_cluster
    prefill = spawn_peer_each(f"kill-prefill-{backend}", backend, seed=3, **BIG)
    decode = spawn_peer_each(f"kill-decode-{backend}", backend, seed=4, **BIG)
    ray.get(decode.add_peer.remote(ray.get(prefill.peer_info.remote())))
    loop = decode.read_until_error.remote(f"kill-prefill-{backend}", ALL_BLOCKS, ALL_BLOCKS, 120.0)
    while ray.get(decode.reads_done.remote()) < 3:
        pass  # transfers are flowing
    ray.kill(prefill)
    with pytest.raises(PeerGoneError, match=f"kill-prefill-{backend}"):
        ray.get(loop, timeout=60)
    assert ray.get(decode.counters.remote())["num_transfer_failures"] == 1


@pytest.mark.parametrize("backend", ["nixl", "tcp"])
def test_stopped_prefill_hits_the_deadline_and_its_lease_expires(backend, spawn_peer_each, ray_cluster):
    """The prefill process is frozen (SIGSTOP) before the read: with NIXL over UCX's TCP lane (the
    emulated READ needs the peer's progress thread) or with the TCP backend, the read cannot
    finish and fails with DeadlineExceededError at its deadline. Once the prefill side runs again,
    its lease on the blocks expires and is reported: nothing stays pinned there."""
    ray = ray_cluster
    env = {"UCX_TLS": "tcp"} if backend == "nixl" else {}
    prefill = spawn_peer_each(f"stop-prefill-{backend}", backend, seed=5, env=env, **BIG)
    decode = spawn_peer_each(f"stop-decode-{backend}", backend, seed=6, env=env, **BIG)
    ray.get(decode.add_peer.remote(ray.get(prefill.peer_info.remote())))
    ray.get(prefill.pin.remote("req-frozen", ALL_BLOCKS, 0.5))
    pid = ray.get(prefill.pid.remote())
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(DeadlineExceededError, match="deadline"):
            ray.get(decode.read.remote(f"stop-prefill-{backend}", ALL_BLOCKS, ALL_BLOCKS, 1.0), timeout=60)
    finally:
        os.kill(pid, signal.SIGCONT)
    while "req-frozen" not in ray.get(prefill.expired_ids.remote()):
        pass
    assert ray.get(prefill.num_pinned_blocks.remote()) == 0
    assert ray.get(decode.counters.remote())["num_transfer_failures"] == 1
