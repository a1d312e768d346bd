"""Where one CUDA IPC READ spends its time (``transfer.py --profile-ipc``), on the decode side of a
running transfer.py: a diagnostic that reaches into the transceiver's internals.
benchmarks/read_host_cost.py times the host-side part on any machine.

bench=ipc_profile, per sweep size (the largest and 16 MiB, contiguous ids), ms (median of 20):
    read_blocking[_int64_ids]  the transceiver's whole READ (ids as lists / int64 arrays)
    reader_read                CudaIpcReader.read (runs planned beforehand)
    reader_issue_host          CudaIpcReader.issue alone: the host time of a READ's launch
    copy_sync / slices_sync    copy_runs + synchronize: one strided copy / one memcpy per slice
    local_copy                 a copy of the same bytes between two of this process's tensors
    stream_ctx_torch / stream_ctx_reader   making a stream current and back: torch.cuda.stream()
                               vs the reader's C calls; empty_sync: synchronize of an idle stream
    plan_runs, ids_to_numpy_x2 the planning alone
bench=ipc_copy_paths, the request layout's 2048-token READ (128 blocks, 64 MiB in bf16), copy_runs +
    synchronize per way of copying, ms, each byte-checked against the mapped source:
    scattered ids on both sides: block-table kernel vs torch gather + scatter; the source
    scattered into a destination range: kernel vs one index_select into it; 8 runs: kernel vs one
    strided copy per run; 1 run: strided copy
bench=ipc_cprofile: the functions with the most own time over 50 read_blocking of the largest size.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import random
import statistics
import time

from benchmarks.transfer import MIB


def _median_ms(fn, iters: int = 20, warmup: int = 5) -> float:
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 4)


def profile_ipc_read(side, args, emit) -> None:
    import numpy as np
    import torch

    from kv_transfer import cuda_ipc
    from kv_transfer.block_copy import copy_runs
    from kv_transfer.descriptors import block_id_array, plan_runs

    txi, lay = side.ipc["sweep"], side.layouts["sweep"]
    peer_name = "prefill-sweep_ipc"
    peer = txi._peers[peer_name]
    reader = txi._ipc
    mapped = reader._mapped(peer)
    remote, ours, stream = mapped.segments, reader._ours, mapped.streams[-1]
    bps = lay.blocks_per_segment
    for size_mib in sorted({max(args.sizes_mib), min(16, max(args.sizes_mib))}, reverse=True):
        ids = list(range(size_mib * MIB // lay.bytes_per_block_all_layers))
        ids_np = np.asarray(ids, dtype=np.int64)
        runs = plan_runs(ids, ids, bps, bps)
        nbytes = len(ids) * lay.bytes_per_block_all_layers

        def copies(**kwargs):
            def run():
                with torch.cuda.stream(stream):
                    copy_runs(remote, ours, lay, lay, runs, **kwargs)
                stream.synchronize()
            return run

        def local_copy():
            with torch.cuda.stream(stream):
                ours[0].flat[:nbytes].copy_(side.caches["sweep"].segments[0].view(-1).view(torch.uint8)[:nbytes],
                                            non_blocking=True)
            stream.synchronize()

        def torch_ctx():
            with torch.cuda.stream(stream):
                pass

        def reader_ctx():
            cuda_ipc._exit_streams(cuda_ipc._enter_streams(mapped.stream_ids))

        def issue_host():
            reader.issue(peer, runs, lay)

        cases = {"read_blocking": lambda: txi.read_blocking(peer_name, ids, ids, 60.0),
                 "read_blocking_int64_ids": lambda: txi.read_blocking(peer_name, ids_np, ids_np, 60.0),
                 "reader_read": lambda: reader.read(peer, runs, lay),
                 "copy_sync": copies(), "slices_sync": copies(max_slice_copies=1 << 30), "local_copy": local_copy,
                 "stream_ctx_torch": torch_ctx, "stream_ctx_reader": reader_ctx,
                 "empty_sync": lambda: stream.synchronize(),
                 "plan_runs": lambda: plan_runs(ids, ids, bps, bps),
                 "ids_to_numpy_x2": lambda: (block_id_array(ids), block_id_array(ids))}
        out = {name: _median_ms(fn) for name, fn in cases.items()}
        stream.synchronize()
        out["reader_issue_host"] = _median_ms(issue_host)  # issued READs queue up: wait after timing
        stream.synchronize()
        emit({"bench": "ipc_profile", "size_mib": size_mib, "runs": len(runs), "ms": out,
              "cpu_count": os.cpu_count()})
    _copy_paths(side, emit)
    prof = cProfile.Profile()
    ids = list(range(max(args.sizes_mib) * MIB // lay.bytes_per_block_all_layers))
    prof.enable()
    for _ in range(50):
        txi.read_blocking(peer_name, ids, ids, 60.0)
    prof.disable()
    top = sorted(pstats.Stats(prof).stats.items(), key=lambda kv: -kv[1][2])[:12]  # by own time
    emit({"bench": "ipc_cprofile", "size_mib": max(args.sizes_mib),
          "own_us_per_read": [(f"{k[0].rsplit('/', 1)[-1]}:{k[1]}:{k[2]}", round(v[2] / 50 * 1e6, 1)) for k, v in top]})


def _copy_paths(side, emit) -> None:
    """copy_runs + synchronize of one 2048-token request, per way of copying, byte-checked."""
    import torch

    from kv_transfer.block_copy import copy_runs
    from kv_transfer.descriptors import plan_runs

    txi, lay = side.ipc["llama"], side.layouts["llama"]
    reader = txi._ipc
    txi.read_blocking("prefill-llama_ipc", [0], [0], 60.0)  # maps the peer (a first READ opens it)
    mapped = reader._mapped(txi._peers["prefill-llama_ipc"])
    remote, ours, stream = mapped.segments, reader._ours, mapped.streams[-1]
    bps, n = lay.blocks_per_segment, 128
    scattered = random.Random(3).sample(range(bps), n), random.Random(4).sample(range(bps), n)
    eight_runs = [b + 3 * (b // 16) for b in range(n)]  # 8 runs of 16 blocks, gaps of 3
    patterns = {"scattered": scattered, "scattered_into_range": (scattered[0], list(range(n))),
                "8_runs": (eight_runs, eight_runs), "1_run": (list(range(n)), list(range(n)))}
    ways = {"scattered": {"kernel": dict(kernel=True), "gather_scatter": dict(kernel=False)},
            "scattered_into_range": {"kernel": dict(kernel=True), "index_select_into": dict(kernel=False)},
            "8_runs": {"kernel": dict(kernel=True, max_strided_runs=0), "strided_per_run": dict(kernel=False)},
            "1_run": {"strided": dict()}}
    for pattern, (src_ids, dst_ids) in patterns.items():
        runs = plan_runs(src_ids, dst_ids, bps, bps)
        s_idx = torch.tensor(src_ids, device=stream.device)
        d_idx = torch.tensor(dst_ids, device=stream.device)
        record = {"bench": "ipc_copy_paths", "pattern": pattern, "blocks": n, "runs": len(runs),
                  "bytes": n * lay.bytes_per_block_all_layers}
        for way, kwargs in ways[pattern].items():
            ours[0].flat.zero_()

            def run():
                with torch.cuda.stream(stream):
                    copy_runs(remote, ours, lay, lay, runs, **kwargs)
                stream.synchronize()

            try:
                record[f"{way}_ms"] = _median_ms(run)
                record[f"{way}_bytes_match"] = bool(torch.equal(ours[0].by_block.index_select(0, d_idx),
                                                                remote[0].by_block.index_select(0, s_idx)))
            except Exception as e:  # one way failing must not hide the others
                record[f"{way}_error"] = f"{type(e).__name__}: {e}"
        emit(record)
