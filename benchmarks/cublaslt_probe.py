"""cuBLASLt's own algorithm candidates for decode-batch projections: does any beat the one torch
gets? (issue 8: at batch 8-32 the decode graph's q|k|v + o GEMMs read their weights at ~1.55 TB/s and
down at ~2.65 of ~4.2; cuBLASLt preferred, a bigger workspace and TunableOp, which on torch 2.11's
CUDA build offers only the default candidate, all left the same kernels in place: benchmarks/README.md,
twentieth session.)

    python3 benchmarks/cublaslt_probe.py [--rows 8,32] [--candidates 32]   # CUDA: one JSON line per case

For each Llama-3.2-1B projection (fused q|k|v and gate|up, 16 distinct weights, the lm_head once) and
row count, ``cublasLtMatmulAlgoGetHeuristic`` is asked for up to --candidates algorithms for
y = x W^T (bf16 in and out, fp32 compute, as torch's F.linear); each candidate and F.linear run as
all their calls captured in one CUDA graph (gemv.graph_time_us: median of 5 replays, µs a call),
each candidate's output compared with F.linear's. The last lines sum one decode step's projections
per row count: F.linear against the fastest candidate of each shape. cuBLASLt is called through
ctypes (torch exposes the library choice, not its algorithms); the library is the one torch's CUDA
build ships. First run on an H200 in the twenty-first session: no candidate beats F.linear
(benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gemv_probe import projection_weights  # noqa: E402
from workers.engine.gemv import graph_time_us  # noqa: E402

CUBLAS_COMPUTE_32F = 68
CUDA_R_32F, CUDA_R_16BF = 0, 14
DESC_TRANSA, DESC_TRANSB = 3, 4  # cublasLtMatmulDescAttributes_t
PREF_MAX_WORKSPACE_BYTES = 1  # cublasLtMatmulPreferenceAttributes_t
OP_N, OP_T = 0, 1
WORKSPACE_BYTES = 32 << 20


class Algo(ctypes.Structure):  # cublasLtMatmulAlgo_t
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class Heuristic(ctypes.Structure):  # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", Algo), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def load_cublaslt() -> ctypes.CDLL:
    """The libcublasLt this process already runs (torch loads it with its first GEMM on CUDA), else
    the one in the nvidia wheels on sys.path, else the loader's."""
    torch.nn.functional.linear(torch.ones(8, 8, device="cuda", dtype=torch.bfloat16),
                               torch.ones(8, 8, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    with open("/proc/self/maps") as maps:
        loaded = sorted({line.split()[-1] for line in maps if "libcublasLt.so" in line})
    roots = [p for p in sys.path if p and os.path.isdir(p)]
    found = sorted({f for r in roots for f in glob.glob(os.path.join(r, "nvidia", "**", "libcublasLt.so*"),
                                                        recursive=True)})
    for path in loaded + found + ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]:
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        print(json.dumps({"cublaslt": path, "already_loaded": path in loaded}), flush=True)
        return lib
    raise SystemExit("libcublasLt not found (searched the nvidia wheels on sys.path and the loader's path)")


class Lt:
    def __init__(self):
        lib = self.lib = load_cublaslt()
        vp, pvp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
        lib.cublasLtCreate.argtypes = [pvp]
        lib.cublasLtMatmulDescCreate.argtypes = [pvp, ctypes.c_int, ctypes.c_int]
        lib.cublasLtMatmulDescSetAttribute.argtypes = [vp, ctypes.c_int, vp, ctypes.c_size_t]
        lib.cublasLtMatrixLayoutCreate.argtypes = [pvp, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64]
        lib.cublasLtMatmulPreferenceCreate.argtypes = [pvp]
        lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [vp, ctypes.c_int, vp, ctypes.c_size_t]
        lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [vp, vp, vp, vp, vp, vp, vp, ctypes.c_int,
                                                       ctypes.POINTER(Heuristic), ctypes.POINTER(ctypes.c_int)]
        lib.cublasLtMatmul.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, ctypes.POINTER(Algo), vp,
                                       ctypes.c_size_t, vp]
        self.handle = vp()
        self._check(lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what}: cublasStatus {status}")

    def problem(self, m: int, n: int, k: int):
        """Descriptors of y [m, n] = x [m, k] @ W [n, k]^T, row-major bf16: in cuBLASLt's
        column-major terms D [n, m] = op_T(W as [k, n]) @ x as [k, m]."""
        lib, vp = self.lib, ctypes.c_void_p
        desc, a, b, c, pref = vp(), vp(), vp(), vp(), vp()
        self._check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), CUBLAS_COMPUTE_32F, CUDA_R_32F), "DescCreate")
        for attr, op in ((DESC_TRANSA, OP_T), (DESC_TRANSB, OP_N)):
            v = ctypes.c_int32(op)
            self._check(lib.cublasLtMatmulDescSetAttribute(desc, attr, ctypes.byref(v), 4), "DescSetAttribute")
        self._check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(a), CUDA_R_16BF, k, n, k), "LayoutCreate A")
        self._check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(b), CUDA_R_16BF, k, m, k), "LayoutCreate B")
        self._check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(c), CUDA_R_16BF, n, m, n), "LayoutCreate C")
        self._check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "PreferenceCreate")
        ws = ctypes.c_uint64(WORKSPACE_BYTES)
        self._check(lib.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), 8),
                    "PreferenceSetAttribute")
        return desc, a, b, c, pref

    def candidates(self, problem, count: int) -> list[Heuristic]:
        desc, a, b, c, pref = problem
        results = (Heuristic * count)()
        got = ctypes.c_int(0)
        self._check(self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, desc, a, b, c, c, pref, count, results,
                                                            ctypes.byref(got)), "AlgoGetHeuristic")
        return [results[i] for i in range(got.value) if results[i].state == 0]

    def matmul(self, problem, heuristic: Heuristic, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
        desc, a, b, c, _ = problem
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self._check(self.lib.cublasLtMatmul(
            self.handle, desc, ctypes.byref(self.alpha), ctypes.c_void_p(w.data_ptr()), a,
            ctypes.c_void_p(x.data_ptr()), b, ctypes.byref(self.beta), ctypes.c_void_p(y.data_ptr()), c,
            ctypes.c_void_p(y.data_ptr()), c, ctypes.byref(heuristic.algo), ctypes.c_void_p(self.workspace.data_ptr()),
            heuristic.workspaceSize, stream), "cublasLtMatmul")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="8,32")
    ap.add_argument("--candidates", type=int, default=32)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        raise SystemExit(2)
    lt = Lt()
    rows_list = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    step = {m: {"linear": 0.0, "best": 0.0} for m in rows_list}
    for name, n, k, count, weights in projection_weights():
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = torch.nn.functional.linear(x, weights[0]).float()
            outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in weights]
            problem = lt.problem(m, n, k)
            with torch.inference_mode():
                linear_us = graph_time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in weights])
                best = ("linear", linear_us)
                for i, h in enumerate(lt.candidates(problem, args.candidates)):
                    try:
                        lt.matmul(problem, h, x, weights[0], outs[0])
                        torch.cuda.synchronize()
                        err = float((outs[0].float() - want).norm() / want.norm())
                        us = graph_time_us([lambda w=w, y=y, h=h: lt.matmul(problem, h, x, w, y)
                                            for w, y in zip(weights, outs)])
                    except RuntimeError as e:
                        print(json.dumps({"shape": name, "rows": m, "candidate": i, "error": str(e)[:200]}), flush=True)
                        continue
                    print(json.dumps({"shape": name, "n": n, "k": k, "rows": m, "candidate": i, "us": round(us, 2),
                                      "linear_us": round(linear_us, 2), "weight_GBps": round(n * k * 2 / us / 1e3, 1),
                                      "workspace": h.workspaceSize, "waves": round(h.wavesCount, 2),
                                      "rel_err": round(err, 5)}), flush=True)
                    if us < best[1] and err < 1e-2:
                        best = (f"candidate {i}", us)
            print(json.dumps({"shape": name, "rows": m, "linear_us": round(linear_us, 2), "best": best[0],
                              "best_us": round(best[1], 2)}), flush=True)
            step[m]["linear"] += linear_us * count
            step[m]["best"] += best[1] * count
    for m in rows_list:
        print(json.dumps({"summary": "one decode step's projections", "rows": m,
                          "linear_us": round(step[m]["linear"], 1), "best_us": round(step[m]["best"], 1),
                          "device": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()
