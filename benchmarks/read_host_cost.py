"""Host-side cost of one KV READ on the CUDA IPC path, per number of block ids, on any machine:
the real ``NixlTransceiver.read_blocking`` (arguments -> runs -> segment checks -> CudaIpcReader.read
-> copy_runs -> metrics) copying between CPU tensors of tiny blocks, so the time is Python and
torch dispatch, not bytes. Prints one JSON line per case and tree, then one comparison line per case.
read_us: ids given as Python lists (as the engine hands them); read_int64_array_us: the same ids
as int64 numpy arrays (no per-id conversion left); plan_us: the run builder alone (pair_runs
before, plan_runs after); nixl_descriptors_us: the NIXL path's descriptor lists for those runs.

    git worktree add --detach /tmp/rhc-old <commit>          # the code to compare against
    python benchmarks/read_host_cost.py --before /tmp/rhc-old
    git worktree remove /tmp/rhc-old

Each tree runs in its own process (both import ``kv_transfer``). What is not in the number: on a
GPU, entering the reader's stream and synchronizing it (one of each per READ, before and after
this change); a tree without CPU support in CudaIpcReader gets no-op stand-ins for those two.

Layouts: ``llama`` is Llama-3.2-1B's 16 layers with the engine's default 64 blocks per segment
(4096 blocks, so 2048 scattered ids touch every segment); ``sweep`` is benchmarks/transfer.py's
bandwidth sweep (1 layer, one segment: a contiguous READ is 2 slices). Blocks are 8 bytes.
Cases: contiguous ids (both sides from 0) and scattered ids (a seeded sample of the whole cache).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUM_IDS = (16, 128, 512, 2048)
LAYOUTS = {"llama": dict(num_layers=16, blocks_per_segment=64, num_segments=64),
           "sweep": dict(num_layers=1, blocks_per_segment=4096, num_segments=1)}
CASES = [("llama", "contiguous"), ("llama", "scattered"), ("sweep", "contiguous")]


class _NoStream:
    def synchronize(self) -> None:
        pass


def _pair(lay_name: str):
    """Two CPU caches of one layout, the decode side's transceiver handshaken with the prefill
    side's and reading it through a CudaIpcReader on CPU tensors."""
    import torch
    from prometheus_client import CollectorRegistry

    from kv_transfer.cuda_ipc import CudaIpcReader, PathChoice
    from kv_transfer.layout import KVLayout
    from kv_transfer.metrics import TransferMetrics
    from kv_transfer.nixl_transceiver import NixlTransceiver
    from workers.engine.kv_cache import KVCache

    spec = LAYOUTS[lay_name]
    lay = KVLayout("read-host-cost", num_layers=spec["num_layers"], num_kv_heads=1, head_dim=4, block_size=1,
                   dtype="float16", blocks_per_segment=spec["blocks_per_segment"])
    src, dst = KVCache(lay, spec["num_segments"]), KVCache(lay, spec["num_segments"])
    gen = torch.Generator().manual_seed(0)
    for seg in src.segments.values():
        seg.copy_(torch.randn(seg.shape, generator=gen))
    registry = CollectorRegistry()
    a = NixlTransceiver(f"prefill-{lay_name}", src, metrics=TransferMetrics("a", "nixl", registry), cuda_ipc="off")
    b = NixlTransceiver(f"decode-{lay_name}", dst, metrics=TransferMetrics("b", "nixl", registry), cuda_ipc="off")
    b.add_peer(a.peer_info())
    info = b._peers[a.worker_id]
    reader = CudaIpcReader(torch.device("cpu", 0))
    if hasattr(reader, "adopt"):  # CPU tensors supported as they are
        reader.adopt(info, src.segments)
        for i, t in dst.segments.items():
            reader.add_local(i, t, lay)
    else:  # the reader before: mapped segments as flat bytes, no-op stream stand-ins
        from kv_transfer.cuda_ipc import flat_bytes  # where the older trees keep it

        reader._opened[info.agent_name] = (info.kv_epoch, {i: flat_bytes(t) for i, t in src.segments.items()}, ())
        reader._stream = lambda device: _NoStream()
        torch.cuda.stream = lambda stream: contextlib.nullcontext()
    b._ipc = reader
    b._paths[info.agent_name] = (info.kv_epoch, PathChoice("cuda_ipc", "read_host_cost: CPU tensors"))
    return lay, src, dst, a, b


def _ids(lay, pattern: str, n: int, seed: int) -> list[int]:
    capacity = LAYOUTS["llama" if lay.num_layers > 1 else "sweep"]["num_segments"] * lay.blocks_per_segment
    if pattern == "contiguous":
        return list(range(n))
    return random.Random(seed).sample(range(capacity), n)


def _median_us(fn, budget_s: float, min_iters: int = 7, max_iters: int = 2000) -> tuple[float, int]:
    for _ in range(3):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 1), len(times)


def worker(label: str, budget_s: float) -> None:
    import numpy as np

    import kv_transfer
    from kv_transfer import descriptors

    tree = Path(os.environ["PYTHONPATH"]).resolve()
    if not Path(kv_transfer.__file__).resolve().is_relative_to(tree):
        raise RuntimeError(f"kv_transfer came from {kv_transfer.__file__}, not from {tree}")

    plan = getattr(descriptors, "plan_runs", descriptors.pair_runs)
    for lay_name in dict.fromkeys(name for name, _ in CASES):
        lay, src, dst, a, b = _pair(lay_name)
        bps = lay.blocks_per_segment
        try:
            for pattern in [p for name, p in CASES if name == lay_name]:
                for n in NUM_IDS:
                    remote, local = _ids(lay, pattern, n, 3), _ids(lay, pattern, n, 4)
                    for seg in dst.segments.values():
                        seg.zero_()
                    result = b.read_blocking(a.worker_id, remote, local, 60.0)
                    match = bool(dst.read_blocks(local).equal(src.read_blocks(remote)))
                    read_us, iters = _median_us(lambda: b.read_blocking(a.worker_id, remote, local, 60.0), budget_s)
                    r_arr, l_arr = np.asarray(remote, dtype=np.int64), np.asarray(local, dtype=np.int64)
                    array_us, _ = _median_us(lambda: b.read_blocking(a.worker_id, r_arr, l_arr, 60.0), budget_s / 2)
                    plan_us, _ = _median_us(lambda: plan(remote, local, bps, bps), budget_s / 4)
                    runs = plan(remote, local, bps, bps)
                    info = b._peers[a.worker_id]  # the NIXL path's descriptor lists for the same runs
                    descriptors_us, _ = _median_us(lambda: b.descriptor_lists(info, runs), budget_s / 4)
                    print(json.dumps({"bench": "read_host_cost", "tree": label, "layout": lay_name, "ids": pattern,
                                      "num_ids": n, "runs": len(runs), "slices": result.num_descriptors,
                                      "read_us": read_us, "read_int64_array_us": array_us, "plan_us": plan_us,
                                      "nixl_descriptors_us": descriptors_us, "iters": iters, "bytes_match": match}),
                          flush=True)
        finally:
            a.close()
            b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", help="a checkout of the code to compare against (git worktree add --detach DIR REV)")
    ap.add_argument("--budget-s", type=float, default=0.4, help="time spent per case and tree")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # child: the label of the tree on sys.path
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.budget_s)
        return
    trees = ([("before", Path(args.before).resolve())] if args.before else []) + [("after", REPO)]
    rows: dict[tuple, dict[str, dict]] = {}
    for label, tree in trees:
        env = {**os.environ, "PYTHONPATH": str(tree), "UCX_NET_DEVICES": os.environ.get("UCX_NET_DEVICES", "lo")}
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", label,
                              "--budget-s", str(args.budget_s)], env=env, cwd=tree, check=True, capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            if line.startswith("{"):
                print(line, flush=True)
                rec = json.loads(line)
                rows.setdefault((rec["layout"], rec["ids"], rec["num_ids"]), {})[label] = rec
    if args.before:
        for (lay, pattern, n), by in rows.items():
            old, new = by["before"], by["after"]
            print(json.dumps({"bench": "read_host_cost_compare", "layout": lay, "ids": pattern, "num_ids": n,
                              "runs": new["runs"], "before_us": old["read_us"], "after_us": new["read_us"],
                              "speedup": round(old["read_us"] / new["read_us"], 2),
                              "after_int64_array_us": new["read_int64_array_us"],
                              "plan_before_us": old["plan_us"], "plan_after_us": new["plan_us"],
                              "nixl_descriptors_before_us": old["nixl_descriptors_us"],
                              "nixl_descriptors_after_us": new["nixl_descriptors_us"],
                              "bytes_match": old["bytes_match"] and new["bytes_match"]}))


if __name__ == "__main__":
    main()
