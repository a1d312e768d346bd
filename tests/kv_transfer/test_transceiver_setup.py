"""Configuration, backend selection, typed errors and metrics of transceivers (in-process)."""

from __future__ import annotations

import pickle
import sys

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

from kv_transfer import make_transceiver
from kv_transfer.config import TransferConfig
from kv_transfer.errors import (BackendUnavailableError, CompatMismatchError, DeadlineExceededError,
                                LeaseExpiredError, TransferError)
from tests.kv_transfer.peer import make_layout
from workers.engine.kv_cache import KVCache


def test_config_defaults_and_refusals():
    cfg = TransferConfig()
    assert (cfg.backend, cfg.lease_ttl_s, cfg.deadline_s, cfg.layerwise) == ("nixl", 30.0, 10.0, False)
    with pytest.raises(ValidationError, match="backnd"):
        TransferConfig(backnd="tcp")
    with pytest.raises(ValidationError, match="backend"):
        TransferConfig(backend="ray")
    with pytest.raises(ValidationError, match="layerwise needs"):
        TransferConfig(backend="tcp", layerwise=True)
    with pytest.raises(ValidationError, match="deadline_s"):
        TransferConfig(deadline_s=0)


def test_nixl_that_cannot_load_says_what_to_install(monkeypatch):
    """No silent fallback to tcp: the error names the package to install."""
    for name in [m for m in sys.modules if m == "nixl" or m.startswith("nixl.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nixl", None)  # import nixl -> ImportError
    cache = KVCache(make_layout(), 1)
    with pytest.raises(BackendUnavailableError, match=r"pip install nixl==1\.5\.1"):
        make_transceiver(TransferConfig(backend="nixl"), cache, "no-nixl", registry=CollectorRegistry())
    assert cache._listeners == [], "a transceiver that failed to start must not stay subscribed"


@pytest.mark.parametrize("error", [
    DeadlineExceededError("late", request_id="r1", peer="p"),
    LeaseExpiredError("expired", request_id="r2"),
    CompatMismatchError.from_diff({"dtype": ("float32", "bfloat16")}, "p"),
])
def test_errors_survive_pickling_with_their_fields(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and isinstance(copy, TransferError)
    assert (str(copy), copy.request_id, copy.peer) == (str(error), error.request_id, error.peer)
    if isinstance(error, CompatMismatchError):
        assert copy.diff == {"dtype": ("float32", "bfloat16")} and "dtype" in str(copy)


def test_two_transceivers_in_one_process_keep_their_own_metrics():
    registry = CollectorRegistry()
    caches = [KVCache(make_layout(), 1) for _ in range(2)]
    a = make_transceiver(TransferConfig(backend="tcp"), caches[0], "metrics-a", host="127.0.0.1", registry=registry)
    b = make_transceiver(TransferConfig(backend="tcp"), caches[1], "metrics-b", host="127.0.0.1", registry=registry)
    try:
        b.add_peer(a.peer_info())
        result = b.read_blocking("metrics-a", [0, 1], [2, 3], 10.0)
        text = generate_latest(registry).decode()
        assert f'pdserve_kv_transfer_bytes_total{{backend="tcp",direction="read",worker_id="metrics-b"}} {float(result.num_bytes)}' in text
        assert 'worker_id="metrics-a"' not in text.split("pdserve_kv_transfer_bytes_total")[1].split("#")[0]
        assert b.counters()["num_transfers"] == 1 and a.counters()["num_transfers"] == 0
        with pytest.raises(TransferError):
            b.read_blocking("nobody", [0], [0], 1.0)
        with pytest.raises(DeadlineExceededError, match="no time left"):  # an expired budget fails fast
            b.read_blocking("metrics-a", [0], [0], 0.0)
        assert 'pdserve_kv_transfer_failures_total{backend="tcp",error="unknown_peer",worker_id="metrics-b"} 1.0' in \
            generate_latest(registry).decode()
    finally:
        a.close()
        b.close()
    assert caches[0]._listeners == [] and caches[1]._listeners == []


def test_device_reads_are_issued_on_the_loop_and_awaited_by_polling():
    """KVTransceiver.read for a peer whose READs are device copies (CUDA IPC on a GPU; here the
    tcp backend with its READ swapped for CudaIpcReader's copies on CPU tensors and events that
    complete after a few polls): run on the caller's thread, not a worker thread; the bytes in
    place; the event loop free for other tasks while it polls; metrics counted; a refused READ
    raises as read_blocking's would. Other peers keep the thread path."""
    import asyncio
    import threading

    from kv_transfer.cuda_ipc import CudaIpcReader

    registry = CollectorRegistry()
    src = KVCache(make_layout(), 1)
    for i, t in src.segments.items():
        t.copy_(torch.randn_like(t))
    dst = KVCache(make_layout(), 1)
    a = make_transceiver(TransferConfig(backend="tcp"), src, "loop-a", host="127.0.0.1", registry=registry)
    b = make_transceiver(TransferConfig(backend="tcp"), dst, "loop-b", host="127.0.0.1", registry=registry)
    reader = CudaIpcReader(torch.device("cpu"))
    info = a.peer_info()
    reader.adopt(info, src.segments)
    for i, t in dst.segments.items():
        reader.add_local(i, t, dst.layout)
    polls, threads = [], []

    class Event:  # completes on its third query
        def query(self):
            polls.append(1)
            return len(polls) % 3 == 0

        def synchronize(self):
            pass

    def device_read(peer_info, runs):
        threads.append(threading.get_ident())
        return reader.issue_events(peer_info, runs, dst.layout)[0], [Event()]

    b._reads_on_loop = lambda peer: peer == "loop-a"
    b._device_read_events = device_read
    try:
        b.add_peer(info)

        async def main():
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            t = asyncio.ensure_future(ticker())
            result = await b.read("loop-a", [0, 1, 2], [5, 6, 7], 10.0)
            t.cancel()
            return result, ticks

        result, ticks = asyncio.run(main())
        assert threads == [threading.get_ident()] and len(polls) == 3 and ticks >= 2
        assert dst.read_blocks([5, 6, 7]).equal(src.read_blocks([0, 1, 2]))
        assert result.num_bytes == 3 * dst.layout.bytes_per_block_all_layers and b.counters()["num_transfers"] == 1
        with pytest.raises(ValueError, match="does not have"):  # our blocks past the cache: refused, nothing moved
            asyncio.run(b.read("loop-a", [3], [10_000], 10.0))
        assert len(threads) == 2
    finally:
        a.close()
        b.close()


def _thread_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, from /proc (Linux)."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def test_nixl_progress_thread_sleeps_between_rounds():
    """nixl's Python agent hard-codes a busy progress loop; start_agent must get our delay into the
    native agent (if nixl stops building its config the way start_agent expects, this fails)."""
    import time

    from kv_transfer.nixl_agent import load_nixl, start_agent

    api = load_nixl()
    threads = {}
    for delay in (0, 100):
        before = set(_thread_cpu_s())
        config = api.nixl_agent_config(enable_prog_thread=True, enable_listen_thread=False, backends=["UCX"])
        agent = start_agent(api, f"progress-probe-{delay}", config, delay)
        threads[delay] = (agent, set(_thread_cpu_s()) - before)
        assert threads[delay][1], "the NIXL agent started no progress thread"
    start = _thread_cpu_s()
    time.sleep(2.0)
    end = _thread_cpu_s()
    used = {delay: sum(end.get(t, 0.0) - start.get(t, 0.0) for t in tids) for delay, (_, tids) in threads.items()}
    # the busy loop takes whatever CPU it gets (a whole core when idle); 100 us sleeps take ~2 %
    assert used[0] > 0.2 and used[100] < 0.25 * used[0], used


def test_a_new_registry_never_gets_a_collected_one_s_metrics():
    """Metric families were kept per id(registry): a registry made after an earlier one was
    collected could get its address and the dead one's families, leaving its own text empty (the
    test above failed that way once in the suite). Now each live registry gets its own."""
    import gc

    from kv_transfer.metrics import TransferMetrics

    for i in range(10):  # without the fix the 3rd registry got the 1st one's address; gc.collect() takes ~0.4 s here
        registry = CollectorRegistry()
        metrics = TransferMetrics(f"w{i}", "tcp", registry=registry)
        assert "pdserve_kv_transfers" in generate_latest(registry).decode(), i
        del metrics, registry
        gc.collect()
