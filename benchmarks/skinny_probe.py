"""Can a Triton tensor-core kernel that reads W once beat cuBLAS on the decode projections at a few
rows (batch 2-32)? (issue 8: at batch 32 the Llama-3.2-1B step's GEMMs take ~0.87 ms of a 1.35 ms
graph on an H200; cuBLAS's M = 32 kernels read q|k|v at ~1.8 TB/s and o at ~1.3 TB/s.)

    python3 benchmarks/skinny_probe.py --rows 8,32        # CUDA: one JSON line per (rows, shape, kernel)
    TRITON_INTERPRET=1 python3 benchmarks/skinny_probe.py --check    # CPU: correctness, small shapes

Timed as gemv_probe.py times the GEMV: 16 distinct weights per shape (lm_head: one) in one CUDA
graph, median of 5 replays, µs per call. Kernel: workers/engine/gemv_kernel.skinny_kernel with
(BLOCK_N, BLOCK_K, warps, stages); BLOCK_M = the rows padded to a power of two >= 16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.engine import gemv  # noqa: E402
from workers.engine.gemv_kernel import skinny_kernel  # noqa: E402

LAYERS = 16
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
          "lm_head": (128256, 2048)}
CONFIGS = ((16, 128, 4, 4), (16, 256, 4, 3), (16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 8, 3), (16, 512, 4, 2),
           (64, 128, 4, 4), (32, 64, 4, 6))


def skinny(x: torch.Tensor, w: torch.Tensor, cfg) -> torch.Tensor:
    bn, bk, warps, stages = cfg
    m, k = x.shape
    n = w.shape[0]
    y = x.new_empty((m, n))
    bm = max(16, triton.next_power_of_2(m))
    skinny_kernel[(triton.cdiv(n, bn),)](x, w, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), HAS_BIAS=False,
                                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, INTERPRET=INTERPRET, num_warps=warps,
                                         num_stages=stages)
    return y


def check_cpu() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--check runs under the Triton interpreter: set TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for m, n, k in ((2, 37, 300), (5, 64, 256), (16, 100, 77)):
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        for cfg in CONFIGS[:3]:
            got, want = skinny(x, w, cfg), x @ w.T
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    if worst > 1e-4:
        raise SystemExit(f"skinny differs from torch: max relative error {worst:.2e}")
    print(json.dumps({"check": "ok", "max_rel_err": worst}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--rows", default="8,32")
    args = ap.parse_args()
    if args.check:
        return check_cpu()
    for m in map(int, args.rows.split(",")):
        total = {"cublas": 0.0, "best": 0.0}
        for name, (n, k) in SHAPES.items():
            count = LAYERS if name != "lm_head" else 1
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = torch.nn.functional.linear(x, ws[0]).float()
            times = {"cublas": gemv.graph_time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in ws])}
            for cfg in CONFIGS:
                err = float((skinny(x, ws[0], cfg).float() - want).norm() / want.norm())
                if err > 1e-2:
                    raise SystemExit(f"skinny {cfg} wrong on {name} at {m} rows: relative error {err:.2e}")
                times["x".join(map(str, cfg))] = gemv.graph_time_us([lambda w=w: skinny(x, w, cfg) for w in ws])
            for kernel, us in times.items():
                print(json.dumps({"rows": m, "shape": name, "kernel": kernel, "us": round(us, 2),
                                  "weight_TBps": round(n * k * 2 / us / 1e6, 2)}), flush=True)
            best = min(v for kk, v in times.items() if kk != "cublas")
            total["cublas"] += times["cublas"] * count
            total["best"] += best * count
            del ws
        print(json.dumps({"rows": m, "summary": "one decode step's projections", "cublas_us": round(total["cublas"], 1),
                          "best_skinny_us": round(total["best"], 1)}), flush=True)


if __name__ == "__main__":
    main()
