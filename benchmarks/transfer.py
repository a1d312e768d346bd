"""KV transfer benchmark: the transceiver's READ between two processes vs a plain memory copy of
the same bytes in the same run. Prints one JSON line per measurement.

    python benchmarks/transfer.py --device cpu --backend nixl

bench=bandwidth   1 MiB..256 MiB, contiguous blocks of a 1-layer layout (2 descriptors per read):
                  size_bytes, nixl_GBps (or tcp_GBps), transfer_GBps, memcpy_GBps, ratio_vs_memcpy
bench=request     per-request READ time for a Llama-3.2-1B-shaped KV (16 layers, 8 KV heads,
                  head_dim 64, block 16 tokens; fp32 on cpu, bf16 on cuda) at 512 and 2048
                  tokens, blocks contiguous or scattered (one run per block)
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
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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


def _transceiver(backend: str, name: str, cache, nixl_threads: int):
    from prometheus_client import CollectorRegistry

    from kv_transfer.metrics import TransferMetrics

    metrics = TransferMetrics(name, backend, CollectorRegistry())
    if backend == "nixl":
        from kv_transfer.nixl_transceiver import NixlTransceiver

        return NixlTransceiver(name, cache, metrics=metrics, num_threads=nixl_threads)
    from kv_transfer.tcp_transceiver import TcpTransceiver

    return TcpTransceiver(name, cache, host="127.0.0.1", metrics=metrics)


class Side:
    """One process's caches (sweep + llama) and their transceivers."""

    def __init__(self, role: str, args):
        import torch

        from workers.engine.kv_cache import KVCache

        self.layouts = _layouts(args.device, max(args.sizes_mib))
        self.caches = {k: KVCache(lay, 1, device=args.device) for k, lay in self.layouts.items()}
        gen = torch.Generator(device=args.device).manual_seed(1 if role == "prefill" else 2)
        for cache in self.caches.values():
            for seg in cache.segments.values():
                seg.copy_(torch.rand(seg.shape, generator=gen, device=args.device, dtype=torch.float32).to(seg.dtype))
        self.tx = {k: _transceiver(args.backend, f"{role}-{k}", c, args.nixl_threads) for k, c in self.caches.items()}

    def close(self):
        for tx in self.tx.values():
            tx.close()


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


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _sync(device: str):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def bench_bandwidth(side: Side, args, emit) -> None:
    import torch

    tx, lay = side.tx["sweep"], side.layouts["sweep"]
    peer = "prefill-sweep"
    max_bytes = max(args.sizes_mib) * MIB
    src = torch.rand(max_bytes // 4, device=args.device).view(torch.uint8)
    dst = torch.zeros_like(src)
    for size_mib in args.sizes_mib:
        size = size_mib * MIB
        ids = list(range(size // lay.bytes_per_block_all_layers))
        reads, copies, copies_1t = [], [], []

        def copy():
            dst[:size].copy_(src[:size])
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
            c = _timed(copy)
            c1 = _timed(copy_one_thread) if args.device == "cpu" else c
            if i >= args.warmup:
                reads.append(r)
                copies.append(c)
                copies_1t.append(c1)
        gbps = size / statistics.median(reads) / 1e9
        memcpy = size / statistics.median(copies) / 1e9
        memcpy_1t = size / statistics.median(copies_1t) / 1e9
        emit({"bench": "bandwidth", "device": args.device, "backend": args.backend, "size_bytes": size,
              f"{args.backend}_GBps": round(gbps, 3), "transfer_GBps": round(gbps, 3),
              "transfer_best_GBps": round(size / min(reads) / 1e9, 3), "memcpy_GBps": round(memcpy, 3),
              "ratio_vs_memcpy": round(gbps / memcpy, 3), "memcpy_1thread_GBps": round(memcpy_1t, 3),
              "ratio_vs_memcpy_1thread": round(gbps / memcpy_1t, 3), "iters": args.iters})


def _block_ids(num_blocks: int, pattern: str, capacity: int, seed: int) -> list[int]:
    if pattern == "contiguous":
        return list(range(num_blocks))
    return random.Random(seed).sample(range(capacity), num_blocks)  # ~one run per block


def bench_requests(side: Side, args, emit) -> None:
    import torch

    tx, lay = side.tx["llama"], side.layouts["llama"]
    for tokens in (512, 2048):
        num_blocks = -(-tokens // lay.block_size)
        size = num_blocks * lay.bytes_per_block_all_layers
        src = torch.rand(size // 4, device=args.device).view(torch.uint8)
        dst = torch.zeros_like(src)
        for pattern in ("contiguous", "scattered"):
            remote = _block_ids(num_blocks, pattern, lay.blocks_per_segment, 3)
            local = _block_ids(num_blocks, pattern, lay.blocks_per_segment, 4)
            times, copies, descs = [], [], 0
            for i in range(args.warmup + args.iters):
                start = time.perf_counter()
                result = tx.read_blocking("prefill-llama", remote, local, 60.0, num_tokens=tokens)
                elapsed = time.perf_counter() - start
                copy = _timed(lambda: (dst.copy_(src), _sync(args.device)))
                if i >= args.warmup:
                    times.append(elapsed)
                    copies.append(copy)
                    descs = result.num_descriptors
            med = statistics.median(times)
            emit({"bench": "request", "device": args.device, "backend": args.backend, "layout": lay.model_id,
                  "dtype": lay.dtype, "tokens": tokens, "blocks": pattern, "size_bytes": size,
                  "descriptors": descs, "transfer_ms": round(med * 1e3, 3),
                  "transfer_p90_ms": round(sorted(times)[int(0.9 * (len(times) - 1))] * 1e3, 3),
                  "transfer_GBps": round(size / med / 1e9, 3),
                  "memcpy_ms": round(statistics.median(copies) * 1e3, 3)})


def bench_layerwise(side: Side, conn, args, emit) -> None:
    from workers.protocol import LayerwiseTarget

    tx, lay = side.tx["llama"], side.layouts["llama"]
    conn.send(("add_peer", tx.peer_info()))
    conn.recv()
    tokens = 2048
    ids = list(range(-(-tokens // lay.block_size)))
    for layer_ms in args.layer_ms:
        whole, streamed = [], []
        for i in range(args.warmup + args.iters):
            start = time.perf_counter()
            conn.send(("compute", (layer_ms, lay.num_layers)))
            conn.recv()
            tx.read_blocking("prefill-llama", ids, ids, 60.0)
            t_whole = time.perf_counter() - start

            rid = f"lw-{uuid.uuid4().hex[:8]}"
            tx.expect_layers(rid)
            target = LayerwiseTarget(rid, "decode-llama", tuple(ids), side.caches["llama"].epoch, tx.compat_hash)
            start = time.perf_counter()
            conn.send(("layerwise", (target, ids, layer_ms)))
            tx.receive_layers_blocking(rid, 60.0, len(ids))
            t_stream = time.perf_counter() - start
            conn.recv()
            if i >= args.warmup:
                whole.append(t_whole)
                streamed.append(t_stream)
        w, s = statistics.median(whole), statistics.median(streamed)
        compute = lay.num_layers * layer_ms / 1e3
        emit({"bench": "layerwise", "device": args.device, "layout": lay.model_id, "dtype": lay.dtype,
              "tokens": tokens, "num_layers": lay.num_layers, "layer_ms": layer_ms,
              "compute_ms": round(compute * 1e3, 3), "whole_request_ms": round(w * 1e3, 3),
              "layerwise_ms": round(s * 1e3, 3), "gain_ms": round((w - s) * 1e3, 3),
              "transfer_after_compute_whole_ms": round((w - compute) * 1e3, 3),
              "transfer_after_compute_layerwise_ms": round((s - compute) * 1e3, 3)})


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
    parser.add_argument("--skip", default="", help="comma list of benches to skip: bandwidth,request,layerwise")
    parser.add_argument("--ucx-log-copy", default=None, help="copy this process's UCX log here at the end")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_prefill_main, args=(there, args), daemon=True)
    child.start()
    infos = here.recv()
    side = Side("decode", args)
    try:
        for key, tx in side.tx.items():
            tx.add_peer(infos[f"{key}"])
        import torch

        emit({"bench": "env", "device": args.device, "backend": args.backend, "cpus": os.cpu_count(),
              "torch_threads": torch.get_num_threads(),
              "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
              "machine": platform.node(), "torch": torch.__version__, "nixl_threads": args.nixl_threads,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None})
        if "bandwidth" not in skip:
            bench_bandwidth(side, args, emit)
        if "request" not in skip:
            bench_requests(side, args, emit)
        if "layerwise" not in skip and args.backend == "nixl":
            bench_layerwise(side, here, args, emit)
        info = side.tx["sweep"].transport_info()
        emit({"bench": "transports", **{k: v for k, v in info.items() if k != "env"}})
        if args.ucx_log_copy and info.get("log_file"):
            import shutil

            shutil.copy(info["log_file"], args.ucx_log_copy)
    finally:
        here.send(("close", None))
        here.recv()
        child.join(timeout=30)
        side.close()


if __name__ == "__main__":
    main()
