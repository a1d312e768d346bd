"""Can a Triton GEMV beat cuBLAS on the batch-1 decode projections? (issue 8: decode_b1 needs the
weights read near the copy rate; cuBLAS reaches ~2.0 TB/s of ~3.0 there.)

    python3 benchmarks/gemv_probe.py                 # CUDA: one JSON line per (shape, kernel)
    TRITON_INTERPRET=1 python3 benchmarks/gemv_probe.py --check   # CPU: correctness only, small shapes

Shapes: the Llama-3.2-1B projections of one layer (fused q|k|v and gate|up, as
engine.fuse_projections makes them) and the tied lm_head. ``cublas`` = torch.nn.functional.linear
on [1, K] x [N, K]^T; ``triton BNxBKxSKxW`` = the kernel below with BLOCK_N rows per program, BLOCK_K
columns per load, SPLIT_K programs per row block (partial sums added atomically into an fp32
buffer) and W warps. Time: CUDA events around 200 calls, median of 5 such rounds, per call. The
last line sums the best kernel of each shape over one decode step (16 layers + lm_head) against
cuBLAS and the weights / copy-rate floor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import triton
import triton.language as tl

LAYER = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}
LM_HEAD = (128256, 2048)
CONFIGS = [(8, 512, 1, 4), (16, 512, 1, 4), (16, 256, 1, 4), (32, 256, 1, 8), (8, 1024, 1, 4),
           (4, 1024, 1, 4), (16, 512, 2, 4), (8, 512, 4, 4)]


@triton.jit
def _gemv(W, x, y, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
          INTERPRET: tl.constexpr):
    """y[n] (+)= sum_k W[n, k] x[k] over this program's rows and its 1/SPLIT_K of K, in fp32."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    k_per = tl.cdiv(K, SPLIT_K)
    k0 = pid_k * k_per
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if INTERPRET:  # the interpreter cannot take tensor bounds in range()
        kk = 0
        while kk < k_per:
            acc = _gemv_tile(W, x, rows, row_ok, k0, kk, k_per, K, stride_wn, acc, BLOCK_K)
            kk += BLOCK_K
    else:
        for kk in range(0, k_per, BLOCK_K):
            acc = _gemv_tile(W, x, rows, row_ok, k0, kk, k_per, K, stride_wn, acc, BLOCK_K)
    if SPLIT_K == 1:
        tl.store(y + rows, acc.to(y.dtype.element_ty), mask=row_ok)
    else:
        tl.atomic_add(y + rows, acc, mask=row_ok)


@triton.jit
def _gemv_tile(W, x, rows, row_ok, k0, kk, k_per, K, stride_wn, acc, BLOCK_K: tl.constexpr):
    within = kk + tl.arange(0, BLOCK_K)
    cols = k0 + within
    col_ok = (within < k_per) & (cols < K)
    w = tl.load(W + rows[:, None] * stride_wn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    xv = tl.load(x + cols, mask=col_ok, other=0.0)
    return acc + tl.sum(w.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)


def gemv(w: torch.Tensor, x: torch.Tensor, cfg: tuple[int, int, int, int]) -> torch.Tensor:
    """x [K] -> W x [N] (dtype of x)."""
    bn, bk, sk, warps = cfg
    n, k = w.shape
    out = torch.empty(n, device=w.device, dtype=x.dtype) if sk == 1 else torch.zeros(n, device=w.device,
                                                                                       dtype=torch.float32)
    _gemv[(triton.cdiv(n, bn), sk)](w, x, out, n, k, w.stride(0), BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk,
                                    INTERPRET=os.environ.get("TRITON_INTERPRET") == "1", num_warps=warps)
    return out if sk == 1 else out.to(x.dtype)


def per_call_us(fn, calls: int = 200, rounds: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def copy_rate(dev: str) -> float:
    """GB/s of a 1 GiB device copy, bytes read + written (how engine.py's floor counts it)."""
    big = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    return 2 * big.numel() / (per_call_us(big.clone, 5, 3) * 1e-6) / 1e9


def check_cpu() -> None:
    """Under TRITON_INTERPRET=1: every config == torch on small odd shapes (fp32)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--check runs under the Triton interpreter: set TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for n, k in ((37, 300), (8, 1024), (100, 77)):
        w, x = torch.randn(n, k, generator=gen), torch.randn(k, generator=gen)
        want = w @ x
        for cfg in CONFIGS:
            got = gemv(w, x, cfg)
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    if worst > 1e-5:
        raise SystemExit(f"gemv differs from torch: max relative error {worst:.2e}")
    print(json.dumps({"check": "ok", "configs": len(CONFIGS), "max_rel_err": worst}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="CPU correctness under the Triton interpreter")
    args = ap.parse_args()
    if args.check:
        return check_cpu()
    dev, dt = "cuda", torch.bfloat16
    copy_gbs = copy_rate(dev)
    best: dict[str, tuple[float, float]] = {}  # shape -> (cublas us, best triton us)
    for name, (n, k) in {**LAYER, "lm_head": LM_HEAD}.items():
        w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
        x = torch.randn(k, device=dev, dtype=dt)
        want = torch.nn.functional.linear(x[None], w)[0].float()
        t_cublas = per_call_us(lambda: torch.nn.functional.linear(x[None], w))
        rows = [("cublas", t_cublas, 0.0)]
        for cfg in CONFIGS:
            got = gemv(w, x, cfg).float()
            err = float((got - want).norm() / want.norm())
            rows.append(("triton " + "x".join(map(str, cfg)), per_call_us(lambda: gemv(w, x, cfg)), err))
        for kernel, us, err in rows:
            print(json.dumps({"shape": name, "n": n, "k": k, "kernel": kernel, "us": round(us, 2),
                              "weight_GBps": round(n * k * 2 / (us * 1e-6) / 1e9, 1), "rel_err": round(err, 5)}),
                  flush=True)
        best[name] = (t_cublas, min(us for kernel, us, _ in rows[1:]))
    layers = 16
    step = {kind: sum(best[s][i] * (layers if s in LAYER else 1) for s in best) for i, kind in
            enumerate(("cublas_us", "best_triton_us"))}
    weight_bytes = 2 * (layers * sum(n * k for n, k in LAYER.values()) + LM_HEAD[0] * LM_HEAD[1])
    print(json.dumps({"summary": "one decode step's projections", **{k: round(v, 1) for k, v in step.items()},
                      "copy_GBps": round(copy_gbs, 1), "floor_us": round(weight_bytes / (copy_gbs * 1e9) * 1e6, 1),
                      "device": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()
