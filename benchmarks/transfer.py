"""KV transfer benchmark: the transceiver's READ between two processes vs a plain memory copy of
the same bytes in the same run. Prints one JSON line per measurement.

    python benchmarks/transfer.py --device cpu --backend nixl

bench=bandwidth   1 MiB..256 MiB, contiguous blocks of a 1-layer layout (2 descriptors per read):
                  size_bytes, nixl_GBps (or tcp_GBps), transfer_GBps, memcpy_GBps, ratio_vs_memcpy;
                  on cuda also ipc_GBps (the transceiver's CUDA IPC path, transfer.cuda_ipc: on) and
                  ipc_ratio_vs_memcpy; with --prefill-gpu != --decode-gpu, memcpy_peer_GBps (torch copy
                  from the prefill GPU to the decode GPU in one process) and ipc_ratio_vs_memcpy_peer.
                  Each path's bytes are checked once per size (weighted checksum on both sides).
bench=request     per-request READ time for a Llama-3.2-1B-shaped KV (16 layers, 8 KV heads,
                  head_dim 64, block 16 tokens; fp32 on cpu, bf16 on cuda) at 512 and 2048
                  tokens, blocks contiguous or scattered (one run per block)
                  (benchmarks/transfer_requests.py)
bench=pipelined   (cuda, --pipelined N) N CUDA IPC READs in flight vs N torch copies of the same bytes,
                  each side issued back to back and synchronized once (benchmarks/transfer_pipelined.py)
bench=layerwise   (nixl) time until all KV is on the decode side, prefill computing each layer for
                  layer_ms (a sleep: on a GPU, compute and copies run on different engines):
                  whole-request READ after the last layer vs layer-wise WRITEs as layers finish

GB/s are medians over --iters timed reads, each timed around the whole read call (descriptor
building, post, polling); memcpy is torch's copy_ between two preallocated, pre-touched buffers,
interleaved with the reads so both see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if os.environ.get("PDSERVE_KV_TRANSFER_TREE"):  # another kv_transfer (a before/after comparison)
    sys.path.insert(0, os.environ["PDSERVE_KV_TRANSFER_TREE"])
os.environ.setdefault("UCX_NET_DEVICES", "lo")

MIB = 1 << 20
SWEEP = dict(model_id="bench-sweep", num_layers=1, num_kv_heads=8, head_dim=128, block_size=16)  # 128 KiB/block
LLAMA_1B = dict(model_id="llama-3.2-1b", num_layers=16, num_kv_heads=8, head_dim=64, block_size=16)


def _layouts(device: str, max_mib: int):
    from kv_transfer.layout import KVLayout

    sweep_dtype = "float32"
    sweep_blocks = max_mib * MIB // (2 * 16 * 8 * 128 * 4)
    kv_dtype = "bfloat16" if device == "cuda" else "float32"
    return {"sweep": KVLayout(**SWEEP, dtype=sweep_dtype, blocks_per_segment=sweep_blocks),
            "llama": KVLayout(**LLAMA_1B, dtype=kv_dtype, blocks_per_segment=256)}


def _transceiver(backend: str, name: str, cache, nixl_threads: int, cuda_ipc: str = "off",
                 progress_delay_us: int = 100):
    from prometheus_client import CollectorRegistry

    from kv_transfer.metrics import TransferMetrics

    metrics = TransferMetrics(name, backend, CollectorRegistry())
    if backend == "nixl":
        from kv_transfer.nixl_transceiver import NixlTransceiver

        return NixlTransceiver(name, cache, metrics=metrics, num_threads=nixl_threads, cuda_ipc=cuda_ipc,
                               progress_delay_us=progress_delay_us)
    from kv_transfer.tcp_transceiver import TcpTransceiver

    return TcpTransceiver(name, cache, host="127.0.0.1", metrics=metrics)


class Side:
    """One process's caches (sweep + llama) and their transceivers."""

    def __init__(self, role: str, args):
        import torch

        from workers.engine.kv_cache import KVCache

        self.device = _device(args, role)
        if self.device.startswith("cuda"):
            torch.cuda.set_device(self.device)
        self.layouts = _layouts(args.device, max(args.sizes_mib))
        if args.device == "cuda" and args.backend == "nixl":
            # the CUDA IPC reads get caches of their own: one process may map a peer allocation only
            # once (cudaIpcOpenMemHandle), and UCX maps the NIXL caches' for its cuda_ipc GETs
            self.layouts.update({f"{k}_ipc": lay for k, lay in list(self.layouts.items())})
        self.caches = {k: KVCache(lay, 1, device=self.device) for k, lay in self.layouts.items()}
        gen = torch.Generator(device=self.device).manual_seed(1 if role == "prefill" else 2)
        for cache in self.caches.values():
            for seg in cache.segments.values():
                seg.copy_(torch.rand(seg.shape, generator=gen, device=self.device, dtype=torch.float32).to(seg.dtype))
        # decode on cuda: the *_ipc caches read with CUDA IPC (transfer.cuda_ipc: on), the others with NIXL
        ipc_reader = role == "decode" and args.device == "cuda"
        self.tx, self.ipc = {}, {}
        for k, c in self.caches.items():
            if k.endswith("_ipc") and ipc_reader:
                self.ipc[k.removesuffix("_ipc")] = _transceiver("nixl", f"{role}-{k}", c, 0, cuda_ipc="on")
            else:
                self.tx[k] = _transceiver(args.backend, f"{role}-{k}", c, args.nixl_threads,
                                          progress_delay_us=args.progress_delay_us)

    def checksum(self, key: str, ids: list[int]) -> float:
        import torch

        blocks = self.caches[key].read_blocks(ids).reshape(-1).float()
        weights = torch.linspace(1.0, 2.0, blocks.numel(), device=blocks.device)
        return float((blocks * weights).sum(dtype=torch.float64))

    def close(self):
        for tx in list(self.tx.values()) + list(self.ipc.values()):
            tx.close()


def _device(args, role: str) -> str:
    if args.device != "cuda":
        return args.device
    return f"cuda:{args.prefill_gpu if role == 'prefill' else args.decode_gpu}"


def _prefill_main(conn, args) -> None:
    """The prefill process: serves handshakes, simulated compute and layer-wise sends."""
    side = Side("prefill", args)
    conn.send({k: tx.peer_info() for k, tx in side.tx.items()})
    while True:
        cmd, payload = conn.recv()
        if cmd == "close":
            side.close()
            conn.send(None)
            return
        if cmd == "add_peer":
            side.tx["llama"].add_peer(payload)
            conn.send(None)
        elif cmd == "checksum":
            conn.send(side.checksum(*payload))
        elif cmd == "compute":  # all layers, then answer: the decode side reads after this
            layer_ms, num_layers = payload
            for _ in range(num_layers):
                time.sleep(layer_ms / 1000)
            conn.send(None)
        elif cmd == "layerwise":
            target, src_ids, layer_ms = payload
            sender = side.tx["llama"].layerwise_sender(target, src_ids, 60.0)
            for layer in range(side.layouts["llama"].num_layers):
                time.sleep(layer_ms / 1000)
                sender.layer_done(layer)
            sender.finish()
            conn.send(None)


class _ChildPipe:
    """The decode side's end of the pipe to the prefill process: a recv that fails at once when
    that process has died (its traceback is on stderr) instead of waiting for ever."""

    def __init__(self, conn, child):
        self.conn, self.child = conn, child

    def send(self, message) -> None:
        self.conn.send(message)

    def recv(self):
        while not self.conn.poll(1.0):
            if not self.child.is_alive():
                raise RuntimeError(f"the prefill process exited (code {self.child.exitcode}); see its traceback above")
        return self.conn.recv()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _sync(device: str):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def bench_bandwidth(side: Side, conn, args, emit) -> None:
    import torch

    tx, lay = side.tx["sweep"], side.layouts["sweep"]
    txi = side.ipc.get("sweep")
    peer = "prefill-sweep"
    max_bytes = max(args.sizes_mib) * MIB
    src = torch.rand(max_bytes // 4, device=side.device).view(torch.uint8)
    dst = torch.zeros_like(src)
    cross_gpu = args.device == "cuda" and args.prefill_gpu != args.decode_gpu
    src_peer = torch.rand(max_bytes // 4, device=f"cuda:{args.prefill_gpu}").view(torch.uint8) if cross_gpu else None
    for size_mib in args.sizes_mib:
        size = size_mib * MIB
        ids = list(range(size // lay.bytes_per_block_all_layers))
        reads, ipc_reads, copies, copies_1t, peer_copies = [], [], [], [], []
        conn.send(("checksum", ("sweep", ids)))
        want = conn.recv()
        match = {}
        for name, t, key in (("nixl", tx, "sweep"), ("ipc", txi, "sweep_ipc")):
            if t is not None:
                if key != "sweep":
                    conn.send(("checksum", (key, ids)))
                    want = conn.recv()
                side.caches[key].segments[0].zero_()
                try:
                    t.read_blocking(f"prefill-{key}", ids, ids, 60.0)
                except Exception as e:
                    if t is tx:
                        raise
                    emit({"bench": "bandwidth", "size_bytes": size, "ipc_error": f"{type(e).__name__}: {e}"})
                    side.ipc.pop("sweep").close()  # measure the rest without it
                    continue
                match[name] = side.checksum(key, ids) == want
        txi = side.ipc.get("sweep")

        def copy():
            dst[:size].copy_(src[:size])
            _sync(args.device)

        def copy_peer():
            dst[:size].copy_(src_peer[:size])
            _sync(args.device)

        def copy_one_thread():
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                copy()
            finally:
                torch.set_num_threads(threads)

        for i in range(args.warmup + args.iters):
            r = _timed(lambda: tx.read_blocking(peer, ids, ids, 60.0))
            ri = _timed(lambda: txi.read_blocking(f"{peer}_ipc", ids, ids, 60.0)) if txi is not None else None
            c = _timed(copy)
            c1 = _timed(copy_one_thread) if args.device == "cpu" else c
            cp = _timed(copy_peer) if cross_gpu else None
            if i >= args.warmup:
                reads.append(r)
                ipc_reads.append(ri)
                copies.append(c)
                copies_1t.append(c1)
                peer_copies.append(cp)
        gbps = size / statistics.median(reads) / 1e9
        memcpy = size / statistics.median(copies) / 1e9
        memcpy_1t = size / statistics.median(copies_1t) / 1e9
        record = {"bench": "bandwidth", "device": args.device, "backend": args.backend, "size_bytes": size,
                  f"{args.backend}_GBps": round(gbps, 3), "transfer_GBps": round(gbps, 3),
                  "transfer_best_GBps": round(size / min(reads) / 1e9, 3), "memcpy_GBps": round(memcpy, 3),
                  "ratio_vs_memcpy": round(gbps / memcpy, 3), "memcpy_1thread_GBps": round(memcpy_1t, 3),
                  "ratio_vs_memcpy_1thread": round(gbps / memcpy_1t, 3), "iters": args.iters,
                  f"{args.backend}_bytes_match": match.get("nixl")}
        if txi is not None:
            ipc = size / statistics.median(ipc_reads) / 1e9
            record.update(ipc_GBps=round(ipc, 3), ipc_best_GBps=round(size / min(ipc_reads) / 1e9, 3),
                          ipc_ratio_vs_memcpy=round(ipc / memcpy, 3), ipc_bytes_match=match.get("ipc"))
        if cross_gpu:
            peer_gbps = size / statistics.median(peer_copies) / 1e9
            record.update(memcpy_peer_GBps=round(peer_gbps, 3), prefill_gpu=args.prefill_gpu, decode_gpu=args.decode_gpu,
                          nixl_ratio_vs_memcpy_peer=round(gbps / peer_gbps, 3))
            if txi is not None:
                record["ipc_ratio_vs_memcpy_peer"] = round(record["ipc_GBps"] / peer_gbps, 3)
        emit(record)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backend", choices=["nixl", "tcp"], default="nixl")
    parser.add_argument("--sizes-mib", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layer-ms", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 4.0])
    parser.add_argument("--nixl-threads", type=int, default=0, help="NIXL UCX backend num_threads (0 = default)")
    parser.add_argument("--progress-delay-us", type=int, default=100, help="transfer.nixl_progress_delay_us")
    parser.add_argument("--prefill-gpu", type=int, default=0, help="cuda: the prefill process's GPU")
    parser.add_argument("--decode-gpu", type=int, default=0, help="cuda: the decode process's GPU")
    parser.add_argument("--skip", default="", help="comma list of benches to skip: bandwidth,request,layerwise")
    parser.add_argument("--profile-ipc", action="store_true", help="cuda: profile one CUDA IPC read of the largest size")
    parser.add_argument("--pipelined", type=int, default=0, help="cuda: also N READs in flight vs N copies (0: off)")
    parser.add_argument("--ucx-log-copy", default=None, help="copy this process's UCX log here at the end")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_prefill_main, args=(there, args), daemon=True)
    child.start()
    here = _ChildPipe(here, child)
    infos = here.recv()
    side = Side("decode", args)
    try:
        for key, tx in side.tx.items():
            tx.add_peer(infos[key])
        for key, tx in side.ipc.items():
            tx.add_peer(infos[f"{key}_ipc"])
        import torch

        emit({"bench": "env", "device": args.device, "backend": args.backend, "cpus": os.cpu_count(),
              "torch_threads": torch.get_num_threads(),
              "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
              "machine": platform.node(), "torch": torch.__version__, "nixl_threads": args.nixl_threads,
              "kv_transfer": str(Path(sys.modules["kv_transfer"].__file__).parent),
              "progress_delay_us": args.progress_delay_us,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "prefill_gpu": args.prefill_gpu if args.device == "cuda" else None,
              "decode_gpu": args.decode_gpu if args.device == "cuda" else None,
              "peer_access": (torch.cuda.can_device_access_peer(args.decode_gpu, args.prefill_gpu)
                              if args.device == "cuda" and args.prefill_gpu != args.decode_gpu else None)})
        if "bandwidth" not in skip:
            bench_bandwidth(side, here, args, emit)
        if args.pipelined and "sweep" in side.ipc:
            from benchmarks.transfer_pipelined import bench_pipelined

            bench_pipelined(side, here, args, emit)
        if "request" not in skip:
            from benchmarks.transfer_requests import bench_requests

            bench_requests(side, here, args, emit)
        if args.profile_ipc and "sweep" in side.ipc:  # last: a diagnostic, after the measurements
            from benchmarks.transfer_ipc_profile import profile_ipc_read

            profile_ipc_read(side, args, emit)
        if "layerwise" not in skip and args.backend == "nixl":
            from benchmarks.transfer_layerwise import bench_layerwise

            bench_layerwise(side, here, args, emit)
        info = side.tx["sweep"].transport_info()
        emit({"bench": "transports", **{k: v for k, v in info.items() if k != "env"}})
        for key, txi in side.ipc.items():
            emit({"bench": "ipc_paths", "cache": f"{key}_ipc", "read_paths": txi.transport_info()["read_paths"]})
        if args.ucx_log_copy and info.get("log_file"):
            import shutil

            shutil.copy(info["log_file"], args.ucx_log_copy)
    finally:
        if child.is_alive():  # (a dead one: the error that brought us here says why)
            here.send(("close", None))
            here.recv()
        child.join(timeout=30)
        side.close()


if __name__ == "__main__":
    main()
