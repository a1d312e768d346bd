"""Host time of the CUDA calls a decode step makes, each alone, with the device idle and with the
device busy (a long kernel queued first, as under async scheduling): is the host's step slow
because of Python or because of these calls? (issue 8: on one H200 host a batch-1 step's `prepare`
took 253 µs bare, ~8x the CI box's Python for the same work.)

    python3 benchmarks/cuda_api_cost.py            # one JSON line per call and condition (µs, median)

Calls: a non-blocking H2D copy from pinned memory (the step's metadata upload, 4 KiB), a small
device-to-device copy (the token fill), an event record, a pinned host allocation (torch's caching
host allocator), a non-blocking D2H copy into pinned memory (the sampled tokens), the replay of a
captured graph of 300 small kernels (a decode graph's node count), event.query; plus a numpy
loop of the kind `prepare` runs, as a measure of the host's Python speed, and numpy writes into
pinned vs pageable host memory (prepare stages into pinned buffers).
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch


def timed(fn, n: int = 200) -> float:
    """Median µs of fn() over n calls."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 2)


def main() -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 2
    dev = torch.device("cuda")
    host = torch.zeros(1024, dtype=torch.int32, pin_memory=True)
    dst = torch.zeros(1024, dtype=torch.int32, device=dev)
    src_ids = torch.zeros(32, dtype=torch.int64, device=dev)
    ids = torch.zeros(1, 64, dtype=torch.int64, device=dev)
    out_host = torch.zeros(32, dtype=torch.int64, pin_memory=True)
    x = torch.zeros(256, device=dev)
    static = torch.zeros(256, device=dev)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        static.add_(1)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        for _ in range(300):
            static.add_(x)
    torch.cuda.synchronize()
    event = torch.cuda.Event()
    event.record()
    calls = {
        "h2d_pinned_4k": lambda: dst.copy_(host, non_blocking=True),
        "d2d_fill_copy": lambda: ids[0, :32].copy_(src_ids),
        "event_record": lambda: torch.cuda.Event().record(),
        "pinned_alloc": lambda: torch.empty(32, dtype=torch.int64, pin_memory=True),
        "d2h_pinned": lambda: out_host.copy_(src_ids, non_blocking=True),
        "graph_replay_300": graph.replay,
        "event_query": event.query,
    }
    arr = np.arange(64, dtype=np.int64)

    def numpy_work():
        a = np.cumsum(arr)
        b = np.fromiter((v + 1 for v in range(32)), dtype=np.int64, count=32)
        return int(a[-1] + b.sum())

    pinned_np = torch.zeros(4096, dtype=torch.int64, pin_memory=True).numpy()
    plain_np = torch.zeros(4096, dtype=torch.int64).numpy()

    def staging(buf):  # writes of the kind prepare makes into its staging buffer
        def run():
            buf[:64] = arr
            buf[64:128] = np.cumsum(buf[:64]) - 1
            buf[128:192] = buf[64:128] // 16 + (buf[:64] % 16) * 512
        return run

    rows = [{"call": "python_numpy_loop", "us": timed(numpy_work, 2000)},
            {"call": "numpy_staging_pinned", "us": timed(staging(pinned_np), 2000)},
            {"call": "numpy_staging_pageable", "us": timed(staging(plain_np), 2000)}]
    for busy in (False, True):
        for name, fn in calls.items():
            n = (20 if busy else 60) if name == "graph_replay_300" else 200
            if busy:
                torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time queued ahead: the calls find it busy
            else:
                torch.cuda.synchronize()
            rows.append({"call": name, "device_busy": busy, "us": timed(fn, n)})
            torch.cuda.synchronize()
    for r in rows:
        r["card"] = torch.cuda.get_device_name()
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
