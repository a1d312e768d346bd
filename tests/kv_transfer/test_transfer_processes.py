"""Two plain processes (multiprocessing spawn, no Ray): the prefill side serves its KVPeer's
handshake over a pipe, the decode side (this test process) READs byte-exact. Also bfloat16."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from tests.kv_transfer.peer import KVPeer

REMOTE = [30, 31, 32, 33, 7, 1, 2]  # 31 -> 32 crosses the prefill side's segment boundary (32/seg)
LOCAL = [4, 5, 6, 7, 9, 0, 15]  # 7 -> 8 would cross decode's (8/seg); 9 and 15 in other segments


def _serve(conn, backend: str, dtype: str, threads: int) -> None:
    """Child process: a prefill-side KVPeer answering (method, args) requests until 'close'."""
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    peer = KVPeer("proc-prefill", backend, blocks_per_segment=32, num_segments=2, seed=11,
                  layout_overrides={"dtype": dtype}, nixl_num_threads=threads)
    while True:
        method, args = conn.recv()
        if method == "close":
            peer.close()
            conn.send(None)
            return
        conn.send(getattr(peer, method)(*args))


@pytest.fixture(scope="module", params=[("nixl", "float32", 0), ("nixl", "bfloat16", 2), ("tcp", "bfloat16", 0)],
                ids=lambda p: f"{p[0]}-{p[1]}-threads{p[2]}")
def prefill_process(request):
    """NIXL's default engine and its thread-pool engine (2 threads, descriptors split), and tcp."""
    backend, dtype, threads = request.param
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(there, backend, dtype, threads), daemon=True)
    proc.start()

    def call(method: str, *args):
        here.send((method, args))
        if not here.poll(120):
            raise TimeoutError(f"prefill process did not answer {method}")
        return here.recv()

    yield call, backend, dtype, threads
    call("close")
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()


def test_two_processes_byte_exact(prefill_process):
    call, backend, dtype, threads = prefill_process
    decode = KVPeer("proc-decode", backend, blocks_per_segment=8, num_segments=2, seed=12,
                    layout_overrides={"dtype": dtype}, nixl_num_threads=threads)
    try:
        decode.zero()
        decode.add_peer(call("peer_info"))
        result = decode.read("proc-prefill", REMOTE, LOCAL, 10.0, len(REMOTE) * 4 - 1)
        expected = call("blocks", REMOTE)
        assert expected.dtype == decode.layout.torch_dtype
        assert decode.blocks(LOCAL).view(torch.uint8).numpy().tobytes() == expected.view(torch.uint8).numpy().tobytes()
        assert not decode.blocks([b for b in range(16) if b not in LOCAL]).any()
        assert result.num_bytes == len(REMOTE) * decode.layout.bytes_per_block_all_layers
        if backend == "nixl":  # UCX's choice of transport was captured and reported
            protocols = decode.transport_info()["protocols"]
            assert protocols.get("read into host from host"), protocols
    finally:
        decode.close()
