"""Can a Triton GEMV beat cuBLAS on the batch-1 decode projections? (issue 8: decode_b1 needs the
weights read near the copy rate; cuBLAS reaches ~2.0 TB/s of ~3.0 there.)

    python3 benchmarks/gemv_probe.py                 # CUDA: one JSON line per (shape, kernel)
    TRITON_INTERPRET=1 python3 benchmarks/gemv_probe.py --check   # CPU: correctness only, small shapes

Shapes: the Llama-3.2-1B projections of one layer (fused q|k|v and gate|up, as
engine.fuse_projections makes them), 16 distinct weights each (one per layer: together they
overflow L2, as in a real step), and the tied lm_head. Kernels: ``cublas`` (F.linear) and the
engine's GEMV (workers/engine/gemv.py) with BLOCK_N x BLOCK_K x warps, timed the way gemv.choose()
times them at load: all layers' calls captured in one CUDA graph (no launch gaps), median of 5
replays, per call. The last line sums the best kernel of each shape over one decode step against
cuBLAS and the weights / copy-rate floor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.engine import gemv  # noqa: E402

LAYERS = 16
LAYER = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}
LM_HEAD = (128256, 2048)


def projection_weights():
    """(name, n, k, count, weights) per projection: LAYERS distinct bf16 weights [n, k] a layer shape,
    the lm_head once; each shape's weights are freed before the next is made."""
    for name, (n, k) in {**LAYER, "lm_head": LM_HEAD}.items():
        count = LAYERS if name in LAYER else 1
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]
        yield name, n, k, count, weights
        weights.clear()  # the caller's list too: the memory is free once the caller's tensors are gone
        torch.cuda.empty_cache()


CONFIGS = tuple(dict.fromkeys((*gemv.CONFIGS, (16, 512, 4), (8, 256, 4), (32, 128, 4), (64, 128, 8), (8, 1024, 8), (16, 1024, 8),
           (4, 2048, 8), (2, 2048, 4))))


def copy_rate() -> float:
    """GB/s of a 1 GiB device copy, bytes read + written (how engine.py's floor counts it)."""
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    return 2 * big.numel() / (gemv.graph_time_us([big.clone] * 3) * 1e-6) / 1e9


def check_cpu() -> None:
    """Under TRITON_INTERPRET=1: every config == torch on small odd shapes (fp32)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--check runs under the Triton interpreter: set TRITON_INTERPRET=1")
    gemv._register_op()
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for n, k in ((37, 300), (8, 1024), (100, 77)):
        w, x = torch.randn(n, k, generator=gen), torch.randn(1, k, generator=gen)
        want = w @ x[0]
        for cfg in CONFIGS:
            got = gemv.linear(x, w, None, cfg)[0]
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
    copy_gbs = copy_rate()
    best: dict[str, tuple[float, float]] = {}  # shape -> (cublas us, best gemv us)
    for name, (n, k) in {**LAYER, "lm_head": LM_HEAD}.items():
        count = LAYERS if name in LAYER else 1
        layers = []
        for _ in range(count):
            m = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            nn.init.normal_(m.weight, std=0.02)
            layers.append(m)
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
        want = torch.nn.functional.linear(x, layers[0].weight).float()
        with torch.inference_mode():
            times = gemv.time_shape(layers, CONFIGS)
        for cfg, us in times.items():
            err = 0.0 if cfg is None else float(
                (gemv.linear(x, layers[0].weight, None, cfg).float() - want).norm() / want.norm())
            print(json.dumps({"shape": name, "n": n, "k": k, "kernel": gemv._name(cfg), "us": round(us, 2),
                              "weight_GBps": round(n * k * 2 / (us * 1e-6) / 1e9, 1), "rel_err": round(err, 5)}),
                  flush=True)
        best[name] = (times[None], min(us for cfg, us in times.items() if cfg is not None))
        del layers
    step = {kind: sum(best[s][i] * (LAYERS if s in LAYER else 1) for s in best) for i, kind in
            enumerate(("cublas_us", "best_gemv_us"))}
    step["best_of_both_us"] = sum(min(best[s]) * (LAYERS if s in LAYER else 1) for s in best)
    weight_bytes = 2 * (LAYERS * sum(n * k for n, k in LAYER.values()) + LM_HEAD[0] * LM_HEAD[1])
    print(json.dumps({"summary": "one decode step's projections", **{k: round(v, 1) for k, v in step.items()},
                      "copy_GBps": round(copy_gbs, 1), "floor_us": round(weight_bytes / (copy_gbs * 1e9) * 1e6, 1),
                      "device": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()
