"""Host-side cost of one KV READ on the CUDA IPC path, per case, on any machine: the real
``NixlTransceiver.read_blocking`` (arguments -> runs -> segment checks -> CudaIpcReader.read ->
copy_runs -> metrics) copying between CPU tensors of tiny blocks, so the time is Python and torch
dispatch, not bytes. Prints one JSON line per case and tree, then one comparison line per case.

    read_us              read_blocking, ids given as Python lists (as the engine hands them)
    read_int64_array_us  the same ids as int64 numpy arrays (no per-id conversion left)
    plan_us              the run builder alone (pair_runs in old trees, plan_runs after), lists
    reader_us            CudaIpcReader.read alone, runs planned beforehand
    copy_us              copy_runs alone (what the reader adds is reader_us - copy_us)
    launches, ops        torch ops that launch work on a GPU, per READ: every non-view aten op
                         read_blocking dispatches, plus each index upload (a host-to-device copy
                         on a GPU, a no-op on CPU tensors); ops names them
    nixl_descriptors_us  the NIXL path's descriptor lists for the same runs

    git worktree add --detach /tmp/rhc-old <commit>          # the code to compare against
    python benchmarks/read_host_cost.py --before /tmp/rhc-old
    git worktree remove /tmp/rhc-old

Each tree runs in its own process (both import ``kv_transfer``). What is not in the number: on a
GPU, making the reader's stream current and synchronizing it, and the launches' own cost;
a tree without CPU support in CudaIpcReader gets no-op stand-ins for those.

Layouts (16 layers unless said; blocks are 8 bytes):
    llama    the engine's default 64 blocks per segment, 64 segments: 2048 scattered ids touch
             every segment, 2048 contiguous ids are 32 runs
    request  benchmarks/transfer.py's per-request layout (one segment of 256 blocks): 32 and 128
             blocks = its 512- and 2048-token requests
    sweep    benchmarks/transfer.py's bandwidth sweep (1 layer, one segment): a contiguous READ is
             one run of 2 slices; 2048 ids = one 256 MiB range there
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
LAYOUTS = {"llama": dict(num_layers=16, blocks_per_segment=64, num_segments=64),
           "request": dict(num_layers=16, blocks_per_segment=256, num_segments=1),
           "sweep": dict(num_layers=1, blocks_per_segment=4096, num_segments=1)}
CASES = [("llama", "contiguous", (16, 128, 512, 2048)), ("llama", "scattered", (16, 128, 512, 2048)),
         ("request", "contiguous", (32, 128)), ("request", "scattered", (32, 128)),
         ("sweep", "contiguous", (16, 128, 512, 2048))]


class _NoLaunch:
    """Stands in for the block-table kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


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


def _ids(lay_name: str, pattern: str, n: int, seed: int) -> list[int]:
    if pattern == "contiguous":
        return list(range(n))
    spec = LAYOUTS[lay_name]
    return random.Random(seed).sample(range(spec["num_segments"] * spec["blocks_per_segment"]), n)


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


def _count_launches(fn) -> dict[str, int]:
    """The torch ops one call of ``fn`` dispatches that launch work on a GPU: non-view aten ops,
    plus the index uploads (block_copy._upload; older trees: _to_devices, one upload a call when
    both sides are on one device, as here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kv_transfer import block_copy

    ops: dict[str, int] = {}
    in_kernel = []  # non-empty while triton's interpreter runs the kernel (its own torch ops are not ours)

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and not in_kernel:
                name = str(func).removeprefix("aten.").removesuffix(".default")
                ops[name] = ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    def counting(key: str, inner):
        def counted(*args, **kwargs):
            ops[key] = ops.get(key, 0) + 1
            return inner(*args, **kwargs)
        return counted

    class _Launches:  # stands in for the triton kernel: kernel[grid](...) counts one launch
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                ops["block_table_kernel"] = ops.get("block_table_kernel", 0) + 1
                in_kernel.append(True)
                try:
                    return self.kernel[grid](*args, **kwargs)
                finally:
                    in_kernel.pop()
            return launch

    wrapped = {"_upload" if hasattr(block_copy, "_upload") else "_to_devices": "upload"}
    inner = {name: getattr(block_copy, name) for name in wrapped}
    for name, key in wrapped.items():
        setattr(block_copy, name, counting(key, inner[name]))
    if getattr(block_copy, "_copy_blocks_kernel", None) is not None:
        inner["_copy_blocks_kernel"] = block_copy._copy_blocks_kernel
        block_copy._copy_blocks_kernel = _Launches(inner["_copy_blocks_kernel"])
    try:
        with _Count():
            fn()
    finally:
        for name, f in inner.items():
            setattr(block_copy, name, f)
    return ops


def worker(label: str, budget_s: float) -> None:
    """One tree's cases; label "gpu-path" (run under TRITON_INTERPRET=1, so copy_runs takes the
    path it takes on a GPU, block-table kernel included) only counts launches and checks bytes."""
    import numpy as np

    import kv_transfer
    from kv_transfer import block_copy, descriptors

    tree = Path(os.environ["PYTHONPATH"]).resolve()
    if not Path(kv_transfer.__file__).resolve().is_relative_to(tree):
        raise RuntimeError(f"kv_transfer came from {kv_transfer.__file__}, not from {tree}")

    plan = getattr(descriptors, "plan_runs", descriptors.pair_runs)
    for lay_name in dict.fromkeys(name for name, _, _ in CASES):
        lay, src, dst, a, b = _pair(lay_name)
        bps = lay.blocks_per_segment
        info = b._peers[a.worker_id]
        mapped = b._ipc._opened[info.agent_name]
        remote_views = getattr(mapped, "segments", None)
        ours = b._ipc._ours if hasattr(b._ipc, "_ours") else getattr(b._ipc, "_local", None)
        try:
            for pattern, counts in [(p, c) for name, p, c in CASES if name == lay_name]:
                for n in counts:
                    remote, local = _ids(lay_name, pattern, n, 3), _ids(lay_name, pattern, n, 4)
                    for seg in dst.segments.values():
                        seg.zero_()
                    result = b.read_blocking(a.worker_id, remote, local, 60.0)
                    match = bool(dst.read_blocks(local).equal(src.read_blocks(remote)))
                    if label == "gpu-path":
                        ops = _count_launches(lambda: b.read_blocking(a.worker_id, remote, local, 60.0))
                        kernel = block_copy._copy_blocks_kernel
                        block_copy._copy_blocks_kernel = _NoLaunch()  # time the host work around it
                        try:
                            read_us, _ = _median_us(lambda: b.read_blocking(a.worker_id, remote, local, 60.0),
                                                    budget_s / 2)
                        finally:
                            block_copy._copy_blocks_kernel = kernel
                        print(json.dumps({"bench": "read_host_cost_gpu_launches", "layout": lay_name, "ids": pattern,
                                          "num_ids": n, "runs": len(plan(remote, local, bps, bps)),
                                          "launches": sum(ops.values()), "ops": ops, "bytes_match": match,
                                          "read_us_without_kernel_launch": read_us}), flush=True)
                        continue
                    read_us, iters = _median_us(lambda: b.read_blocking(a.worker_id, remote, local, 60.0), budget_s)
                    r_arr, l_arr = np.asarray(remote, dtype=np.int64), np.asarray(local, dtype=np.int64)
                    array_us, _ = _median_us(lambda: b.read_blocking(a.worker_id, r_arr, l_arr, 60.0), budget_s / 2)
                    plan_us, _ = _median_us(lambda: plan(remote, local, bps, bps), budget_s / 4)
                    runs = plan(remote, local, bps, bps)
                    reader_us, _ = _median_us(lambda: b._ipc.read(info, runs, lay), budget_s / 4)
                    copy_us = None
                    if remote_views is not None and ours is not None:  # trees with SegmentViews
                        copy_us, _ = _median_us(lambda: block_copy.copy_runs(remote_views, ours, lay, lay, runs),
                                                budget_s / 4)
                    ops = _count_launches(lambda: b.read_blocking(a.worker_id, remote, local, 60.0))
                    descriptors_us, _ = _median_us(lambda: b.descriptor_lists(info, runs), budget_s / 4)
                    print(json.dumps({"bench": "read_host_cost", "tree": label, "layout": lay_name, "ids": pattern,
                                      "num_ids": n, "runs": len(runs), "slices": result.num_descriptors,
                                      "read_us": read_us, "read_int64_array_us": array_us, "plan_us": plan_us,
                                      "reader_us": reader_us, "copy_us": copy_us, "launches": sum(ops.values()),
                                      "ops": ops, "nixl_descriptors_us": descriptors_us, "iters": iters,
                                      "bytes_match": match}), flush=True)
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
    trees.append(("gpu-path", REPO))  # launches on a GPU's path (block-table kernel under triton's interpreter)
    rows: dict[tuple, dict[str, dict]] = {}
    for label, tree in trees:
        env = {**os.environ, "PYTHONPATH": str(tree), "UCX_NET_DEVICES": os.environ.get("UCX_NET_DEVICES", "lo")}
        if label == "gpu-path":
            env["TRITON_INTERPRET"] = "1"
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
                              "int64_array_before_us": old["read_int64_array_us"],
                              "int64_array_after_us": new["read_int64_array_us"],
                              "plan_before_us": old["plan_us"], "plan_after_us": new["plan_us"],
                              "reader_before_us": old["reader_us"], "reader_after_us": new["reader_us"],
                              "launches_before": old["launches"], "launches_after": new["launches"],
                              "launches_after_gpu_path": by.get("gpu-path", {}).get("launches"),
                              "after_gpu_path_us_without_kernel_launch":
                                  by.get("gpu-path", {}).get("read_us_without_kernel_launch"),
                              "bytes_match": old["bytes_match"] and new["bytes_match"]}))
    print("layout    ids         n   read_us before -> after (GPU path*)   launches before -> after (GPU path)\n"
          "          (*: the block-table kernel's own launch not included)", file=sys.stderr)
    for (lay, pattern, n), by in rows.items():
        b_us, b_l = by.get("before", {}).get("read_us"), by.get("before", {}).get("launches")
        gpu = by.get("gpu-path", {})
        print(f"{lay:9} {pattern:11} {n:5} {b_us!s:>8} -> {by['after']['read_us']!s:<7} "
              f"({gpu.get('read_us_without_kernel_launch')!s:<6}) {b_l!s:>10} -> {by['after']['launches']} "
              f"({gpu.get('launches')})", file=sys.stderr)

if __name__ == "__main__":
    main()
