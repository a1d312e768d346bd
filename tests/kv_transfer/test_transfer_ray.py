"""Two Ray actors, each with its own KVCache and a real NIXL (or TCP) transceiver: byte-exact
transfers, re-handshake after a segment is added, compat refusal, lease expiry, layer-wise
streaming. Faults that kill or stop processes live in test_faults_ray.py."""

from __future__ import annotations

import pytest
import torch

from kv_transfer.descriptors import pair_runs
from kv_transfer.errors import (CompatMismatchError, DeadlineExceededError, LeaseExpiredError, StalePeerError,
                                TransferAbortedError)
from workers.protocol import LayerwiseTarget

# Prefill side: 16 blocks per segment, 3 segments (ids 0..47). Decode side: 8 per segment, 4
# segments (ids 0..31): each side addresses blocks by its own layout.
REMOTE = [3, 4, 5, 6, 14, 15, 16, 17, 40, 22, 23, 9]  # 15 -> 16 crosses a prefill segment boundary
LOCAL = [0, 1, 2, 3, 5, 6, 7, 8, 20, 30, 31, 12]  # 7 -> 8 crosses a decode segment boundary
NUM_TOKENS = len(REMOTE) * 4 - 3  # block_size 4: the last block holds 1 meaningful token


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module", params=["nixl", "tcp"])
def pair(request, spawn_peer, ray_cluster):
    """(prefill actor, decode actor, backend) with decode's blocks zeroed and the handshake done."""
    backend = request.param
    prefill = spawn_peer(f"prefill-{backend}", backend, blocks_per_segment=16, num_segments=3, seed=1)
    decode = spawn_peer(f"decode-{backend}", backend, blocks_per_segment=8, num_segments=4, seed=2)
    ray_cluster.get(decode.zero.remote())
    ray_cluster.get(decode.add_peer.remote(ray_cluster.get(prefill.peer_info.remote())))
    return prefill, decode, backend


def test_blocks_arrive_byte_exact(pair, ray_cluster):
    """Non-contiguous ids, runs cut at both sides' segment boundaries, a partial last block: the
    local blocks hold exactly the remote blocks' bytes (whole blocks), nothing else is written."""
    ray = ray_cluster
    prefill, decode, backend = pair
    result = ray.get(decode.read.remote(f"prefill-{backend}", REMOTE, LOCAL, 10.0, NUM_TOKENS))

    expected = ray.get(prefill.blocks.remote(REMOTE))
    got = ray.get(decode.blocks.remote(LOCAL))
    assert as_bytes(got) == as_bytes(expected)
    untouched = [b for b in range(32) if b not in LOCAL]
    assert not ray.get(decode.blocks.remote(untouched)).any(), "a block outside the destination list was written"

    num_runs = len(pair_runs(REMOTE, LOCAL, 16, 8))
    # coalesced: [3..6]->[0..3], [14,15]->[5,6], 16->7 (prefill boundary), 17->8 (decode boundary),
    # 40->20, [22,23]->[30,31], 9->12
    assert num_runs == 7
    assert result.num_descriptors == 4 * 2 * num_runs  # one per (layer, K/V, run): a single request
    assert result.num_bytes == len(REMOTE) * 4 * 2 * 4 * 2 * 16 * 4
    counters = ray.get(decode.counters.remote())
    assert counters["num_transfers"] >= 1 and counters["transfer_bytes"] >= result.num_bytes


def test_block_count_must_match_num_tokens(pair, ray_cluster):
    prefill, decode, backend = pair
    with pytest.raises(ValueError, match="need 2 blocks"):
        ray_cluster.get(decode.read.remote(f"prefill-{backend}", [1, 2, 3], [1, 2, 3], 10.0, 8))


def test_segment_added_after_handshake_needs_rehandshake(pair, ray_cluster):
    """Prefill grows by a segment (epoch bump): decode's old handshake cannot address it
    (StalePeerError); needs_handshake says so, and after ensure_peer the read is byte-exact."""
    ray = ray_cluster
    prefill, decode, backend = pair
    peer = f"prefill-{backend}"
    index, epoch = ray.get(prefill.add_segment.remote(seed=7))
    new_blocks = [index * 16 + 2, index * 16 + 3]
    assert ray.get(decode.needs_handshake.remote(peer, epoch))
    with pytest.raises(StalePeerError):
        ray.get(decode.read.remote(peer, new_blocks, [26, 27], 10.0))

    info = ray.get(prefill.peer_info.remote())
    ray.get(decode.ensure_peer.remote(info, epoch, info.compat_hash))
    assert not ray.get(decode.needs_handshake.remote(peer, epoch))
    ray.get(decode.read.remote(peer, new_blocks + REMOTE[:2], [26, 27, 28, 29], 10.0))
    assert as_bytes(ray.get(decode.blocks.remote([26, 27, 28, 29]))) == \
        as_bytes(ray.get(prefill.blocks.remote(new_blocks + REMOTE[:2])))


@pytest.mark.parametrize("pair", ["nixl"], indirect=True)  # the check runs before any backend call
def test_compat_mismatch_names_the_field(pair, spawn_peer, ray_cluster):
    ray = ray_cluster
    prefill, _, backend = pair
    other = spawn_peer(f"decode-headdim-{backend}", backend, layout_overrides={"head_dim": 8})
    info = ray.get(prefill.peer_info.remote())
    with pytest.raises(CompatMismatchError, match="head_dim") as err:
        ray.get(other.add_peer.remote(info))
    assert err.value.diff == {"head_dim": (8, 16)}
    with pytest.raises(CompatMismatchError, match="head_dim"):  # a KVHandle's hash also triggers it
        ray.get(other.ensure_peer.remote(info, info.kv_epoch, info.compat_hash))


def test_lease_expired_before_read_is_reported_on_release(pair, ray_cluster):
    """The prefill lease runs out before the READ: the READ itself still returns bytes (one-sided),
    but the release reports LeaseExpiredError so the reader discards them; the expiry was reported
    exactly once and nothing stays pinned."""
    ray = ray_cluster
    prefill, decode, backend = pair
    ray.get(prefill.pin.remote("req-late", REMOTE, 0.05))
    while "req-late" not in ray.get(prefill.expired_ids.remote()):
        pass  # the reaper reports it (polls every 20 ms)
    ray.get(decode.read.remote(f"prefill-{backend}", REMOTE, LOCAL, 10.0))
    with pytest.raises(LeaseExpiredError, match="req-late"):
        ray.get(prefill.release.remote("req-late"))
    assert ray.get(prefill.expired_ids.remote()).count("req-late") == 1
    assert ray.get(prefill.num_pinned_blocks.remote()) == 0


def test_release_in_time_frees_the_pin(pair, ray_cluster):
    ray = ray_cluster
    prefill, decode, backend = pair
    ray.get(prefill.pin.remote("req-ok", REMOTE, 30.0))
    assert ray.get(prefill.num_pinned_blocks.remote()) == len(REMOTE)
    ray.get(decode.read.remote(f"prefill-{backend}", REMOTE, LOCAL, 10.0))
    assert ray.get(prefill.release.remote("req-ok")) == tuple(REMOTE)
    assert ray.get(prefill.num_pinned_blocks.remote()) == 0


@pytest.mark.parametrize("pair", ["nixl"], indirect=True)
def test_nixl_logs_the_selected_ucx_transports(pair, ray_cluster):
    prefill, decode, backend = pair
    info = ray_cluster.get(decode.transport_info.remote())
    assert info["env"]["UCX_NET_DEVICES"] == "lo"
    assert info["ucx_version"], "UCX's own log was not captured"
    reads = info["protocols"].get("read into host from host", [])
    assert reads, f"no READ protocol reported by UCX: {info}"


# -- layer-wise streaming (nixl only: WRITE + notifications) --------------------------------------
def _layerwise_target(ray, pair, request_id: str) -> LayerwiseTarget:
    prefill, decode, backend = pair
    info = ray.get(decode.peer_info.remote())
    ray.get(prefill.ensure_peer.remote(info, info.kv_epoch, info.compat_hash))  # reverse handshake
    ray.get(decode.expect_layers.remote(request_id))
    return LayerwiseTarget(request_id, info.worker_id, tuple(LOCAL), info.kv_epoch, info.compat_hash)


@pytest.mark.parametrize("pair", ["nixl"], indirect=True)
def test_layerwise_streaming_overlaps_compute(pair, ray_cluster):
    """The prefill actor 'computes' 4 layers, 0.2 s each, calling layer_done after each; the decode
    actor waits for all layers. Layer 0 is already in decode's blocks before layer 3 is computed,
    and the final bytes are exact."""
    ray = ray_cluster
    prefill, decode, backend = pair
    ray.get(decode.zero.remote())
    target = _layerwise_target(ray, pair, "lw-overlap")
    recv = decode.receive_layers.remote("lw-overlap", 30.0, len(LOCAL))
    done_at = ray.get(prefill.send_layers.remote(target, REMOTE, 0.2))
    result = ray.get(recv)
    assert len(result.layer_times) == 4
    assert result.layer_times[0] < done_at[3], "layer 0 arrived only after the last layer was computed"
    assert as_bytes(ray.get(decode.blocks.remote(LOCAL))) == as_bytes(ray.get(prefill.blocks.remote(REMOTE)))


@pytest.mark.parametrize("pair", ["nixl"], indirect=True)
def test_layerwise_abort_reaches_the_reader(pair, ray_cluster):
    ray = ray_cluster
    prefill, decode, backend = pair
    target = _layerwise_target(ray, pair, "lw-abort")
    ray.get(prefill.send_layers_then_abort.remote(target, REMOTE, 2))
    with pytest.raises(TransferAbortedError, match="prefill failed"):
        ray.get(decode.receive_layers.remote("lw-abort", 30.0, len(LOCAL)))


@pytest.mark.parametrize("pair", ["nixl"], indirect=True)
def test_layerwise_deadline_names_missing_layers(pair, ray_cluster):
    prefill, decode, backend = pair
    ray_cluster.get(decode.expect_layers.remote("lw-never"))
    with pytest.raises(DeadlineExceededError, match=r"layers \[0, 1, 2, 3\]"):
        ray_cluster.get(decode.receive_layers.remote("lw-never", 0.2, len(LOCAL)))
