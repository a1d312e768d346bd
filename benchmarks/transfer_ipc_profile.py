"""Where one CUDA IPC READ of benchmarks/transfer.py's sweep spends its time (``--profile-ipc``):
the whole read_blocking (ids as lists, and as int64 arrays) next to its pieces (CudaIpcReader.read,
copy_runs + synchronize, the same copies issued by hand on the mapped tensors, a local copy of the
same bytes, the planning alone), then the functions with the most own time under cProfile. A
diagnostic: it reaches into the transceiver's internals. benchmarks/read_host_cost.py times the
host-side part on any machine.
"""

from __future__ import annotations

import os
import statistics
import time

from benchmarks.transfer import MIB

def profile_ipc_read(side, args, emit) -> None:
    """Where one CUDA IPC read of the largest size spends its time (median of 20, ms): the whole
    read_blocking, CudaIpcReader.read alone, copy_runs + synchronize alone, the same copies issued
    by hand on the mapped tensors, and a local copy of the same bytes."""
    import torch

    import numpy as np

    from kv_transfer.block_copy import copy_runs
    from kv_transfer.descriptors import block_id_array, plan_runs

    txi, lay = side.ipc["sweep"], side.layouts["sweep"]
    ids = list(range(max(args.sizes_mib) * MIB // lay.bytes_per_block_all_layers))
    ids_np = np.asarray(ids, dtype=np.int64)
    peer = txi._peers["prefill-sweep_ipc"]
    runs = plan_runs(ids, ids, lay.blocks_per_segment, lay.blocks_per_segment)
    mapped = txi._ipc._opened[peer.agent_name]
    remote, dst = mapped.segments, txi._ipc._local  # views made at open / when our segment was added
    stream = mapped.streams[-1]
    half = remote[0].flat.numel() // 2

    def copies():
        with torch.cuda.stream(stream):
            copy_runs(remote, dst, lay, lay, runs)
        stream.synchronize()

    def by_hand():
        with torch.cuda.stream(stream):
            dst[0].flat[:half].copy_(remote[0].flat[:half], non_blocking=True)
            dst[0].flat[half:].copy_(remote[0].flat[half:], non_blocking=True)
        stream.synchronize()

    def local_copy():
        with torch.cuda.stream(stream):
            dst[0].flat.copy_(side.caches["sweep"].segments[0].view(-1).view(torch.uint8), non_blocking=True)
        stream.synchronize()

    cases = {"read_blocking": lambda: txi.read_blocking("prefill-sweep_ipc", ids, ids, 60.0),
             "read_blocking_int64_ids": lambda: txi.read_blocking("prefill-sweep_ipc", ids_np, ids_np, 60.0),
             "reader_read": lambda: txi._ipc.read(peer, runs, lay),
             "copy_runs_sync": copies, "by_hand": by_hand, "local_copy": local_copy,
             "empty_sync": lambda: stream.synchronize(),
             "plan_runs_alone": lambda: plan_runs(ids, ids, lay.blocks_per_segment, lay.blocks_per_segment),
             "ids_to_numpy_x2": lambda: (block_id_array(ids), block_id_array(ids)),
             "python_loop_10k": lambda: sum(range(10_000))}
    out = {}
    for name, fn in cases.items():
        times = []
        for i in range(25):
            start = time.perf_counter()
            fn()
            if i >= 5:
                times.append(time.perf_counter() - start)
        out[name] = round(statistics.median(times) * 1e3, 4)
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        txi.read_blocking("prefill-sweep_ipc", ids, ids, 60.0)
    prof.disable()
    st = pstats.Stats(prof)
    top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:12]  # by own time
    import threading

    emit({"bench": "ipc_profile", "size_mib": max(args.sizes_mib), "runs": len(runs), "ms": out,
          "threads": sorted(t.name for t in threading.enumerate()), "cpu_count": os.cpu_count(),
          "own_us_per_read": [(f"{k[0].rsplit('/', 1)[-1]}:{k[1]}:{k[2]}", round(v[2] / 50 * 1e6, 1)) for k, v in top]})
