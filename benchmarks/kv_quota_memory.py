"""KV quota memory benchmark: is the memory of a shrunk KV cache really given back?

One engine (the tests' tiny llama, or any checkpoint) with a large KV cache. Cycles of
shrink -> grow -> shrink, plus a shrink while requests hold blocks (the segments holding them are
returned only when the requests finish). After each step it reads

    kv_bytes   KVCache.num_bytes (what the engine holds)
    rss_bytes  the process' resident memory (psutil), on CPU
    cuda_*     torch.cuda.memory_allocated / mem_get_info, on CUDA

and prints one JSON line per step with the change in each and the ratio rss_released / kv_released
(1.0 = every byte the cache let go left the process). The baseline in the same run is the first
step (the full cache).

    .venv/bin/python benchmarks/kv_quota_memory.py                 # CPU, ~400 MB of KV, < 30 s
    .venv/bin/python benchmarks/kv_quota_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.engine.config import EngineConfig, ModelConfig  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.protocol import SamplingParams  # noqa: E402


def measure(engine: Engine) -> dict:
    gc.collect()
    out = {"kv_bytes": engine.kv_cache.num_bytes, "num_blocks": engine.kv_cache.num_blocks,
           "rss_bytes": psutil.Process().memory_info().rss}
    if engine.kv_cache.device.type == "cuda":
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        out.update(cuda_allocated_bytes=torch.cuda.memory_allocated(), cuda_used_bytes=total - free)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="checkpoint dir, or 'tiny' (the tests' tiny llama)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--num-blocks", type=int, default=32768)
    ap.add_argument("--blocks-per-segment", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    model = args.model
    if model == "tiny":
        from tests.tiny_models import build_tiny_checkpoint

        model = str(build_tiny_checkpoint("llama", REPO / ".cache" / "test-models" / "tiny-llama"))
    engine = Engine(ModelConfig(path=model, device=args.device),
                    EngineConfig(block_size=args.block_size, num_kv_blocks=args.num_blocks,
                                 blocks_per_segment=args.blocks_per_segment, max_num_batched_tokens=256,
                                 max_num_seqs=8),
                    model)
    full, quarter = args.num_blocks, args.num_blocks // 4
    first = last = measure(engine)
    print(json.dumps({"step": "baseline (full cache)", **first, "device": args.device,
                      "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}), flush=True)

    def step(name: str, **extra) -> dict:
        nonlocal last
        now = measure(engine)
        kv_released = last["kv_bytes"] - now["kv_bytes"]
        rss_released = last["rss_bytes"] - now["rss_bytes"]
        line = {"step": name, **now, "kv_released_bytes": kv_released, "rss_released_bytes": rss_released,
                "rss_over_kv": round(rss_released / kv_released, 3) if kv_released else None, **extra}
        if "cuda_used_bytes" in now:
            line["cuda_released_bytes"] = last["cuda_used_bytes"] - now["cuda_used_bytes"]
        print(json.dumps(line), flush=True)
        last = now
        return line

    for cycle in (1, 2):
        r = engine.resize(quarter)
        step(f"shrink to 1/4 (cycle {cycle})", pending_blocks=r.num_pending_blocks)
        engine.resize(full)
        step(f"grow back (cycle {cycle})")

    # blocks in use: the segments holding them stay until the requests finish
    sampling = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    for i in range(8):
        engine.add_request(f"r{i}", [1 + (i * 7 + j) % 300 for j in range(200)], sampling)
    for _ in range(4):
        engine.step()
    used = engine.stats().num_used_blocks
    t0 = time.perf_counter()
    r = engine.resize(1)
    step("shrink to 1 segment with requests running", used_blocks=used, pending_blocks=r.num_pending_blocks,
         resize_ms=round((time.perf_counter() - t0) * 1e3, 2))
    while engine.has_work():
        engine.step()
    engine.resizer.reap()
    step("requests finished: the rest returned", pending_blocks=engine.resizer.result().num_pending_blocks)
    total = first["kv_bytes"] - last["kv_bytes"]
    print(json.dumps({"step": "summary", "kv_released_bytes": total,
                      "rss_released_bytes": first["rss_bytes"] - last["rss_bytes"],
                      "rss_over_kv": round((first["rss_bytes"] - last["rss_bytes"]) / total, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
