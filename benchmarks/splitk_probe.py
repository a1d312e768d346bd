"""Split-K projections for decode batches: does a batched GEMM over K slices beat cuBLAS's own pick?
(issue 8: at batch 32 cuBLAS reads the q|k|v and o weights at ~1.7 TB/s of ~4.2, down at ~2.5:
too few tiles for 132 SMs when N is 2048-3072 and M is 1-32.)

    python3 benchmarks/splitk_probe.py [--rows 1,8,32] [--splits 2,4,8]   # CUDA: one JSON line per case

A weight W [N, K] is stored as S slices [S, N, K/S]; y = sum_s x_s @ W_s^T is one ``torch.bmm``
(S times the tiles of one GEMM, each reading 1/S of W) and a sum over S. Shapes and timing as in
gemv_probe.py: the Llama-3.2-1B projections of one layer (fused q|k|v and gate|up), 16 distinct
weights (together they overflow L2), the lm_head once, all calls of a case captured in one CUDA
graph, median of 5 replays, µs per call. ``sum`` cases include the reduction (a kernel of its own
here; inside the compiled decode graph inductor fuses it into the next op); ``fp32`` cases ask
bmm for fp32 partials (``out_dtype``). The last lines sum one decode step's projections per row
count: cuBLAS against the best case of each shape.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gemv_probe import projection_weights  # noqa: E402
from workers.engine.gemv import graph_time_us  # noqa: E402


def slices(weight: torch.Tensor, splits: int) -> torch.Tensor:
    n, k = weight.shape
    return weight.view(n, splits, k // splits).transpose(0, 1).contiguous()


def splitk(x: torch.Tensor, ws: torch.Tensor, fp32: bool) -> torch.Tensor:
    """x [M, K], ws [S, N, K/S] -> [M, N] in x's dtype."""
    s, _, ks = ws.shape
    xs = x.view(x.shape[0], s, ks).transpose(0, 1)  # [S, M, K/S]
    if fp32:
        part = torch.bmm(xs, ws.transpose(1, 2), out_dtype=torch.float32)
    else:
        part = torch.bmm(xs, ws.transpose(1, 2))
    return part.sum(0, dtype=torch.float32).to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--splits", default="2,4,8")
    ap.add_argument("--blas", choices=("cublas", "cublaslt"), help="torch.backends.cuda.preferred_blas_library")
    args = ap.parse_args()
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    rows_list = [int(r) for r in args.rows.split(",")]
    split_list = [int(s) for s in args.splits.split(",")]
    torch.manual_seed(0)
    step: dict[int, dict[str, float]] = {m: {"cublas": 0.0, "best": 0.0} for m in rows_list}
    picks: dict[int, dict[str, str]] = {m: {} for m in rows_list}
    for name, n, k, count, weights in projection_weights():
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = torch.nn.functional.linear(x, weights[0]).float()
            cases = {"cublas": [lambda w=w: torch.nn.functional.linear(x, w) for w in weights]}
            outs = {"cublas": torch.nn.functional.linear(x, weights[0])}
            for s in split_list:
                if k % s:
                    continue
                sliced = [slices(w, s) for w in weights]
                for fp32 in (False, True):
                    label = f"splitk{s}{'_fp32' if fp32 else ''}"
                    try:
                        outs[label] = splitk(x, sliced[0], fp32)
                    except (RuntimeError, TypeError) as exc:  # out_dtype missing in this torch
                        print(json.dumps({"shape": name, "rows": m, "kernel": label, "error": str(exc)[:200]}))
                        continue
                    cases[label] = [lambda ws=ws, f=fp32: splitk(x, ws, f) for ws in sliced]
                del sliced
            times = {}
            with torch.inference_mode():
                for label, calls in cases.items():
                    times[label] = graph_time_us(calls)
                    err = float((outs[label].float() - want).norm() / want.norm())
                    print(json.dumps({"shape": name, "n": n, "k": k, "rows": m, "kernel": label,
                                      "us": round(times[label], 2),
                                      "weight_GBps": round(n * k * 2 / (times[label] * 1e-6) / 1e9, 1),
                                      "rel_err": round(err, 5)}), flush=True)
            best = min(times, key=times.get)
            step[m]["cublas"] += times["cublas"] * count
            step[m]["best"] += times[best] * count
            picks[m][name] = best
    for m in rows_list:
        print(json.dumps({"summary": "one decode step's projections", "rows": m,
                          "cublas_us": round(step[m]["cublas"], 1), "best_us": round(step[m]["best"], 1),
                          "picks": picks[m], "blas": str(torch.backends.cuda.preferred_blas_library()),
                          "device": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()
