"""benchmarks/transfer.py's per-request bench (bench=request): the READ of one request's KV in a
Llama-3.2-1B shape (16 layers, 8 KV heads, head_dim 64, block 16 tokens; fp32 on cpu, bf16 on cuda)
at 512 and 2048 tokens, blocks contiguous or scattered (one run per block), through the configured
backend and, on cuda, the CUDA IPC path; beside a torch copy of the same bytes. Every path's bytes
are checked once (weighted checksum on both sides).
"""

from __future__ import annotations

import random
import statistics
import time


def _block_ids(num_blocks: int, pattern: str, capacity: int, seed: int) -> list[int]:
    if pattern == "contiguous":
        return list(range(num_blocks))
    return random.Random(seed).sample(range(capacity), num_blocks)  # ~one run per block


def bench_requests(side, conn, args, emit) -> None:
    import torch

    from benchmarks.transfer import _sync, _timed

    lay = side.layouts["llama"]
    paths = [(args.backend, side.tx["llama"], "llama")]
    if "llama" in side.ipc:
        paths.append(("ipc", side.ipc["llama"], "llama_ipc"))
    for tokens, pattern, (path, tx, key) in [(t, p, x) for t in (512, 2048) for p in ("contiguous", "scattered")
                                             for x in paths]:
        num_blocks = -(-tokens // lay.block_size)
        size = num_blocks * lay.bytes_per_block_all_layers
        src = torch.rand(size // 4, device=side.device).view(torch.uint8)
        dst = torch.zeros_like(src)
        remote = _block_ids(num_blocks, pattern, lay.blocks_per_segment, 3)
        local = _block_ids(num_blocks, pattern, lay.blocks_per_segment, 4)
        conn.send(("checksum", (key, remote)))
        want = conn.recv()
        side.caches[key].segments[0].zero_()
        try:
            tx.read_blocking(f"prefill-{key}", remote, local, 60.0, num_tokens=tokens)
        except Exception as e:
            if path != "ipc":
                raise
            emit({"bench": "request", "path": path, "tokens": tokens, "blocks": pattern,
                  "error": f"{type(e).__name__}: {e}"})
            continue
        bytes_match = side.checksum(key, local) == want
        times, copies, descs = [], [], 0
        for i in range(args.warmup + args.iters):
            start = time.perf_counter()
            result = tx.read_blocking(f"prefill-{key}", remote, local, 60.0, num_tokens=tokens)
            elapsed = time.perf_counter() - start
            copy = _timed(lambda: (dst.copy_(src), _sync(args.device)))
            if i >= args.warmup:
                times.append(elapsed)
                copies.append(copy)
                descs = result.num_descriptors
        med = statistics.median(times)
        emit({"bench": "request", "device": args.device, "backend": args.backend, "path": path, "layout": lay.model_id,
              "dtype": lay.dtype, "tokens": tokens, "blocks": pattern, "size_bytes": size,
              "descriptors": descs, "transfer_ms": round(med * 1e3, 3),
              "transfer_p90_ms": round(sorted(times)[int(0.9 * (len(times) - 1))] * 1e3, 3),
              "transfer_GBps": round(size / med / 1e9, 3),
              "memcpy_ms": round(statistics.median(copies) * 1e3, 3), "bytes_match": bytes_match})
