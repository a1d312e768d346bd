"""KV transfer modes through real workers (Ray actors, real NIXL, etcd): layer-wise streaming
(transfer.layerwise: the decode worker reserves its blocks, the prefill worker WRITEs each layer
as its forward pass finishes it) against whole-request READs and against colocated prefill, token
for token; a stale handshake renewed once inside a READ; an import that waits for free blocks
past its lease's TTL; a prefill worker killed mid-stream (last: the package's cluster keeps one
prefill worker after it). After each, no KV block is used or pinned on any worker. The cluster
and helpers: conftest.py."""

from __future__ import annotations

import dataclasses
import time
import uuid

import ray

from tests.reliability.faults import assert_no_leaks, counters, on_worker, wait_for, workers_of
from tests.serving.transfer_modes.conftest import (GREEDY, PROMPTS, decode_engine_requests, generate, set_layerwise,
                                                   set_transfer)
from workers.protocol import GenerateRequest


def test_layerwise_equals_whole_request_and_colocated(cluster, workers):
    decode, pf = workers["decode"], workers["prefill_ids"][0]
    before_d, before_p = counters(decode), counters(workers[pf])
    colocated = [generate(decode, p) for p in PROMPTS]
    layerwise = [generate(decode, p, [pf], salt=f"lw{i}") for i, p in enumerate(PROMPTS)]
    # again with the same salt: the decode worker holds the prompt's full blocks, only the tail
    # (first_block_index > 0) is streamed
    layerwise_tail = [generate(decode, p, [pf], salt=f"lw{i}") for i, p in enumerate(PROMPTS[:2])]
    set_layerwise(decode, False)
    try:
        whole = [generate(decode, p, [pf]) for p in PROMPTS]
    finally:
        set_layerwise(decode, True)
    assert layerwise == colocated
    assert layerwise_tail == colocated[:2]
    assert whole == colocated
    after_d, after_p = counters(decode), counters(workers[pf])
    n = len(PROMPTS)
    assert after_d["num_local_prefills"] - before_d["num_local_prefills"] == n  # the colocated runs only
    assert after_d["num_prefill_fallbacks"] == before_d["num_prefill_fallbacks"]
    assert after_d["num_transfer_failures"] == before_d["num_transfer_failures"]
    assert after_p["num_transfers"] - before_p["num_transfers"] == n + 2  # one layer-wise send each
    assert after_d["num_transfers"] - before_d["num_transfers"] == 2 * n + 2  # receives + READs
    assert decode_engine_requests(decode) == []
    assert_no_leaks(cluster.url)


def _pretend_newer_handshake(worker, info, kv_epoch: int) -> None:
    worker.transceiver.add_peer(dataclasses.replace(info, kv_epoch=kv_epoch))


def test_stale_handshake_is_renewed_once_inside_the_read(cluster, workers):
    """The prefill worker shrinks to one segment, the decode worker handshakes with it, then it
    grows back (new segments, new epoch). The decode worker holds a handshake that claims the new
    epoch but lacks the new segments, so the READ of blocks there raises StalePeerError: the
    decode worker re-handshakes once, READs again, and the request succeeds on that prefill
    worker (no retry elsewhere, no fallback)."""
    decode, pf = workers["decode"], workers["prefill_ids"][1]
    prefill = workers[pf]
    set_layerwise(decode, False)
    try:
        ray.get(prefill.resize.remote(32), timeout=60)  # 1 segment of 32 blocks
        shrunk = ray.get(prefill.peer_info.remote(), timeout=60)
        assert len(shrunk.segments) == 1
        assert generate(decode, PROMPTS[0], [pf]) == generate(decode, PROMPTS[0])  # handshake at that epoch
        ray.get(prefill.resize.remote(256), timeout=60)  # segments 1.. come back at new addresses
        grown = ray.get(prefill.peer_info.remote(), timeout=60)
        assert grown.kv_epoch > shrunk.kv_epoch and len(grown.segments) == 8
        on_worker(decode, _pretend_newer_handshake, shrunk, grown.kv_epoch)
        before = counters(decode)
        prompt = [(i * 11) % 300 + 3 for i in range(120)]  # 30 blocks: past segment 0's free blocks
        assert generate(decode, prompt, [pf]) == generate(decode, prompt)
    finally:
        set_layerwise(decode, True)
    after = counters(decode)
    assert after["num_transfer_failures"] - before["num_transfer_failures"] == 1  # the stale READ
    assert after["num_transfers"] - before["num_transfers"] == 1  # the READ after the re-handshake
    assert (after["num_prefill_retries"], after["num_prefill_fallbacks"]) == \
        (before["num_prefill_retries"], before["num_prefill_fallbacks"])
    known = on_worker(decode, lambda w, p: w.transceiver.known_epoch(p), pf)
    assert known == grown.kv_epoch
    assert_no_leaks(cluster.url)


def _hold_free_blocks(worker, hold_s: float) -> None:
    """Take every free KV block of the decode worker for hold_s (on its engine thread)."""
    import asyncio

    def grab(engine):
        worker.held_blocks = engine.pool.allocate(engine.pool.num_free)

    def free(engine):
        engine.pool.free(worker.held_blocks)
        worker.held_blocks = []

    async def hold():
        await worker.loop.call(grab)
        await asyncio.sleep(hold_s)
        await worker.loop.call(free)

    worker.held_blocks = None
    asyncio.run_coroutine_threadsafe(hold(), worker.loop._loop)  # __ray_call__ runs fn off the actor's loop


def hold_free_blocks(decode, hold_s: float) -> None:
    on_worker(decode, _hold_free_blocks, hold_s)
    wait_for(lambda: on_worker(decode, lambda w: w.held_blocks is not None), 30, "the blocks to be taken")


def test_import_waits_for_blocks_past_its_lease_ttl(cluster, workers):
    """With no free KV block on the decode worker for longer than the handle's lease (TTL 2 s,
    blocks held 4 s), the import waits, renewing the lease, and READs within the renewed lease:
    no transfer failure, no fallback, tokens as colocated. A request whose deadline passes while it
    waits ends with the deadline error and is not prefilled locally afterwards."""
    decode, pf = workers["decode"], workers["prefill_ids"][1]
    prompt = [(i * 13) % 300 + 3 for i in range(40)]
    want = generate(decode, prompt)
    ttl_s = on_worker(decode, lambda w: w.spec.transfer.lease_ttl_s)
    set_layerwise(decode, False)
    set_transfer(decode, lease_ttl_s=2.0)
    try:
        before, before_p = counters(decode), counters(workers[pf])
        hold_free_blocks(decode, 4.0)
        assert generate(decode, prompt, [pf]) == want
        after, after_p = counters(decode), counters(workers[pf])
        assert after["num_transfers"] - before["num_transfers"] == 1
        assert (after["num_transfer_failures"], after["num_prefill_retries"], after["num_prefill_fallbacks"],
                after["num_local_prefills"]) == (before["num_transfer_failures"], before["num_prefill_retries"],
                                                 before["num_prefill_fallbacks"], before["num_local_prefills"])
        assert after_p["num_leases_expired"] == before_p["num_leases_expired"]

        hold_free_blocks(decode, 4.0)
        req = GenerateRequest(f"t-{uuid.uuid4().hex[:8]}", tuple(prompt), GREEDY, cache_salt=uuid.uuid4().hex,
                              prefill_candidates=(pf,), deadline_s=2.0)
        deltas = [ray.get(ref, timeout=60) for ref in decode.generate.options(num_returns="streaming").remote(req)]
        assert [d.error for d in deltas] == ["request deadline of 2 s exceeded"]
        final = counters(decode)
        assert final["num_prefill_fallbacks"] == after["num_prefill_fallbacks"]
        assert final["num_local_prefills"] == after["num_local_prefills"]
    finally:
        set_transfer(decode, lease_ttl_s=ttl_s)
        set_layerwise(decode, True)
    wait_for(lambda: on_worker(decode, lambda w: w.held_blocks == []), 30, "the held blocks to be given back")
    assert decode_engine_requests(decode) == []
    assert_no_leaks(cluster.url)


def _hold_after_layer_0(worker, hold_s: float) -> None:
    tx = worker.transceiver
    make_sender = type(tx).layerwise_sender
    worker.num_layers_sent = 0

    def layerwise_sender(target, src_block_ids, deadline_s):
        sender = make_sender(tx, target, src_block_ids, deadline_s)
        send = sender.layer_done

        def layer_done(layer, wait_written=None):
            send(layer, wait_written)
            worker.num_layers_sent += 1
            if layer == 0:
                time.sleep(hold_s)  # on the engine thread, inside the forward pass: mid-stream

        sender.layer_done = layer_done
        return sender

    tx.layerwise_sender = layerwise_sender


def _peer_gone_failures(worker) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("pdserve_kv_transfer_failures_total", {
        "worker_id": worker.worker_id, "backend": "nixl", "error": "peer_gone"}) or 0.0


def test_prefill_killed_mid_stream(cluster, workers):
    """The prefill worker dies after WRITing layer 0 of 3: the decode worker's attempt fails with
    PeerGoneError (counted under error="peer_gone"), its reserved blocks are freed once the
    prefill worker is known dead, and the request completes by the counted local fallback."""
    decode, pf = workers["decode"], workers["prefill_ids"][0]
    victim = workers[pf]
    on_worker(victim, _hold_after_layer_0, 30.0)
    before, gone_before = counters(decode), on_worker(decode, _peer_gone_failures)
    want = generate(decode, PROMPTS[2])
    result = {}
    import threading

    t = threading.Thread(target=lambda: result.setdefault("tokens", generate(decode, PROMPTS[2], [pf])), daemon=True)
    t.start()
    wait_for(lambda: on_worker(victim, lambda w: w.num_layers_sent) >= 1, 60, "layer 0 to be sent")
    ray.kill(victim)
    t.join(120)
    assert result.get("tokens") == want
    after = counters(decode)
    assert after["num_prefill_fallbacks"] == before["num_prefill_fallbacks"] + 1
    assert on_worker(decode, _peer_gone_failures) == gone_before + 1
    wait_for(lambda: decode_engine_requests(decode) == [], 30, "the decode worker to free the reservation")
    ray.get(cluster.manager.remove.remote(pf), timeout=60)
    wait_for(lambda: pf not in workers_of(cluster.url), 30, f"{pf} to leave routing")
    assert_no_leaks(cluster.url)
