"""benchmarks/transfer.py's pipelined bench (``--pipelined N``, cuda): N CUDA IPC READs in flight
against N torch copies of the same bytes, both issued back to back on the reader's stream and
synchronized once, in the same run, per size of the bandwidth sweep.

    issue     per READ: plan_runs(ids as lists) + CudaIpcReader.issue (segment checks, the
              copy launch); then one CudaIpcReader.synchronize. The transceiver's read_blocking
              waits per READ and so cannot overlap: this is the reader's API, below it (no
              metrics, no handshake lookups).
    threads   N threads each calling the transceiver's read_blocking at once (what a decode
              worker with N requests in asyncio.to_thread does): wall time until all N returned;
              the bench runs with a worker's GIL switch interval (workers/worker_base.py, 0.5 ms;
              the thirteenth session's numbers had Python's default, 5 ms)
    loop      N ``await transceiver.read`` gathered on one event loop (what a decode worker does
              now: a READ from a CUDA IPC peer is issued on the loop and its events polled there,
              no thread per READ); ``ipc_loop``
    memcpy    N ``copy_`` of the same byte count between two of this process's tensors, on the
              reader's stream, one synchronize (with --prefill-gpu != --decode-gpu also
              ``memcpy_peer``: the N copies from the prefill GPU)
    slices    as ``issue`` without the reader's checks: copy_runs with one memcpy per (layer, kv)
              slice (max_slice_copies) instead of one strided copy per run
Where the time goes (thirteenth session): ``*_host_us`` = host time per READ / copy until the
last one is queued (before the synchronize), ``*_device_us`` = device time per READ / copy
(torch.profiler, kernels and memcpys), ``*_kernels`` = what ran on the device for one READ.

READ i reads the i-th range of ``size`` bytes of the sweep cache (wrapping round the segment),
so back-to-back READs are different requests' blocks. GB/s = N * size / median wall time.
Every range's bytes are checked once per size (weighted checksum on both sides).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

MIB = 1 << 20


def bench_pipelined(side, conn, args, emit) -> None:
    import torch

    from benchmarks.cuda_kernels import kernel_times
    from kv_transfer.block_copy import copy_runs
    from kv_transfer.descriptors import plan_runs
    from workers.worker_base import GIL_SWITCH_INTERVAL_S

    txi, lay = side.ipc.get("sweep"), side.layouts["sweep"]
    if txi is None or not hasattr(txi._ipc, "issue"):
        emit({"bench": "pipelined", "error": "no CUDA IPC reader with issue() in this tree"})
        return
    key, depth = "sweep_ipc", args.pipelined
    peer_name = f"prefill-{key}"
    peer = txi._peers[peer_name]
    reader = txi._ipc
    stream = reader._mapped(peer).streams[-1]  # ours: every segment is mapped on the decode GPU
    bps = lay.blocks_per_segment
    cross_gpu = args.prefill_gpu != args.decode_gpu
    max_bytes = max(args.sizes_mib) * MIB
    src = torch.rand(max_bytes // 4, device=side.device).view(torch.uint8)
    dst = torch.zeros_like(src)
    src_peer = torch.rand(max_bytes // 4, device=f"cuda:{args.prefill_gpu}").view(torch.uint8) if cross_gpu else None
    pool = ThreadPoolExecutor(depth)
    loop = asyncio.new_event_loop()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as in a decode worker's process
    try:
        for size_mib in args.sizes_mib:
            size = size_mib * MIB
            num_blocks = size // lay.bytes_per_block_all_layers
            starts = [(i * num_blocks) % (bps - num_blocks + 1) for i in range(depth)]
            ranges = [list(range(s, s + num_blocks)) for s in starts]

            host: dict[str, list[float]] = {"ipc_issue": [], "memcpy": [], "slices": []}

            def issue():
                t = time.perf_counter()
                for ids in ranges:
                    reader.issue(peer, plan_runs(ids, ids, bps, bps), lay)
                host["ipc_issue"].append(time.perf_counter() - t)
                reader.synchronize(peer)

            mapped, ours = reader._mapped(peer).segments, reader._ours

            def slices():
                t = time.perf_counter()
                with torch.cuda.stream(stream):
                    for ids in ranges:
                        copy_runs(mapped, ours, lay, lay, plan_runs(ids, ids, bps, bps), max_slice_copies=64)
                host["slices"].append(time.perf_counter() - t)
                stream.synchronize()

            def threads():
                for f in [pool.submit(txi.read_blocking, peer_name, ids, ids, 60.0) for ids in ranges]:
                    f.result()

            def on_loop():
                async def gathered():
                    await asyncio.gather(*(txi.read(peer_name, ids, ids, 60.0) for ids in ranges))
                loop.run_until_complete(gathered())

            def copies(source, name=None):
                def run():
                    t = time.perf_counter()
                    with torch.cuda.stream(stream):
                        for _ in range(depth):
                            dst[:size].copy_(source[:size], non_blocking=True)
                    if name:
                        host[name].append(time.perf_counter() - t)
                    stream.synchronize()
                return run

            match = True
            threads()  # the first read_blocking chooses the peer's path (cuda_ipc): the loop's READs need it
            for fill in (issue, on_loop):
                side.caches[key].segments[0].zero_()
                fill()
                for ids in {tuple(r): r for r in ranges}.values():
                    conn.send(("checksum", (key, ids)))
                    match &= side.checksum(key, ids) == conn.recv()
            on_loop_ok = txi._reads_on_loop(peer_name)
            cases = {"ipc_issue": issue, "ipc_threads": threads, "ipc_loop": on_loop, "memcpy": copies(src, "memcpy"),
                     "slices": slices}
            if cross_gpu:
                cases["memcpy_peer"] = copies(src_peer)
            times: dict[str, list[float]] = {name: [] for name in cases}
            for i in range(args.warmup + args.iters):
                for name, fn in cases.items():  # interleaved: every case sees the same machine load
                    start = time.perf_counter()
                    fn()
                    if i >= args.warmup:
                        times[name].append(time.perf_counter() - start)
            gbps = {name: round(depth * size / statistics.median(t) / 1e9, 3) for name, t in times.items()}
            record = {"bench": "pipelined", "size_bytes": size, "depth": depth, "bytes_match": match,
                      "switch_interval_s": GIL_SWITCH_INTERVAL_S,
                      **{f"{name}_GBps": v for name, v in gbps.items()},
                      "ipc_issue_ratio_vs_memcpy": round(gbps["ipc_issue"] / gbps["memcpy"], 3),
                      "ipc_threads_ratio_vs_memcpy": round(gbps["ipc_threads"] / gbps["memcpy"], 3),
                      "ipc_loop_ratio_vs_memcpy": round(gbps["ipc_loop"] / gbps["memcpy"], 3),
                      "ipc_loop_on_loop": on_loop_ok}
            if cross_gpu:
                record["ipc_issue_ratio_vs_memcpy_peer"] = round(gbps["ipc_issue"] / gbps["memcpy_peer"], 3)
                record["ipc_threads_ratio_vs_memcpy_peer"] = round(gbps["ipc_threads"] / gbps["memcpy_peer"], 3)
            for name, t in host.items():
                record[f"{name}_host_us"] = round(statistics.median(t) / depth * 1e6, 1)
            record["slices_ratio_vs_memcpy"] = round(gbps["slices"] / gbps["memcpy"], 3)
            for name in ("ipc_issue", "memcpy", "slices"):
                total, top = kernel_times(cases[name], repeats=3, top=3)
                record[f"{name}_device_us"] = round(total / depth, 1)
                record[f"{name}_kernels"] = [(k, round(us / depth, 1)) for k, us in top]
            emit(record)
    finally:
        sys.setswitchinterval(switch)
        pool.shutdown()
        loop.close()
