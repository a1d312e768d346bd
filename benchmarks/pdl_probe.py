"""Would programmatic dependent launch (PDL) take a batch-1 decode step to the HBM floor? (issue 8:
the step is ~1.14 ms of graph on an H200 against a 0.58 ms floor; the q|k|v and o GEMMs cost a fixed
~6 µs each and the sixteenth session judged the number of kernels a step, each with its ramp and
tail, to be what is left.)

    python3 benchmarks/pdl_probe.py                  # CUDA (sm_90+): one JSON line per chain
    TRITON_INTERPRET=1 python3 benchmarks/pdl_probe.py --check   # CPU: the fused kernels == torch

A stand-in for the Llama-3.2-1B decode step at batch 1 (16 layers, distinct weights, then the
final norm and the tied lm_head), built three ways and timed as one CUDA graph each (median replay):

- ``torch``: what the engine's compiled graph runs today: RMSNorm ops, cuBLAS ``F.linear`` per
  projection, SiLU*mul, residual adds;
- ``fused``: five Triton kernels a layer of ours: norm + q|k|v GEMV, the attention stand-in, o GEMV
  + residual, norm + gate|up GEMV + SiLU*mul, down GEMV + residual;
- ``fused_pdl``: the same kernels launched with PDL: each lets the next one launch at its start
  (griddepcontrol.launch_dependents), and the next loads its weight rows into registers before it
  waits for its inputs (griddepcontrol.wait), so a kernel's weights stream in during the previous
  kernel's tail and during the attention; ``fused_pdl_late`` loads them after the wait (PDL's launch
  overlap alone).

The attention stand-in is a kernel holding ``--attn-programs`` SMs for ``--attn-us`` (RoPE, the KV
write and the paged attention at ~240 keys take ~9-11 µs a layer on an H200) and reads no HBM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.engine import gemv  # noqa: E402

LAYERS, HIDDEN, QKV, INTER, VOCAB = 16, 2048, 3072, 8192, 128256
EPS = 1e-5


@triton.jit
def _fused_gemv(x_ptr, w_ptr, y_ptr, res_ptr, norm_ptr, N, eps, K: tl.constexpr, BLOCK_N: tl.constexpr,
                NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
                PRELOAD: tl.constexpr):
    """y[rows] = (res[rows] +) W[rows] . norm?(x); with GLU, y[rows] = silu(W[rows] . h) * (W[N + rows] . h)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, K)
    w_at = w_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]
    if PDL:
        gdc_launch_dependents()
    if PRELOAD:  # weights do not depend on the previous kernel: in flight before the wait
        w = tl.load(w_at, mask=row_ok[:, None], other=0.0)
        if GLU:
            w2 = tl.load(w_at + N * K, mask=row_ok[:, None], other=0.0)
    if PDL:
        gdc_wait()
    if not PRELOAD:
        w = tl.load(w_at, mask=row_ok[:, None], other=0.0)
        if GLU:
            w2 = tl.load(w_at + N * K, mask=row_ok[:, None], other=0.0)
    x = tl.load(x_ptr + cols).to(tl.float32)
    if NORM:  # every program normalises the whole (small) input itself
        x = (x * tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
        x = (x * tl.load(norm_ptr + cols).to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
    acc = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if GLU:
        up = tl.sum(w2.to(tl.float32) * x[None, :], axis=1)
        gate = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        acc = (gate / (1.0 + tl.exp(-gate))).to(y_ptr.dtype.element_ty).to(tl.float32) * \
            up.to(y_ptr.dtype.element_ty).to(tl.float32)
    if RESIDUAL:
        acc = tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) + \
            acc.to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _spin(out_ptr, ns, PDL: tl.constexpr):
    """Holds one SM per program for ``ns`` nanoseconds (the attention stand-in)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    t0 = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [0], dtype=tl.int64, is_pure=False, pack=1)
    t = t0
    while t - t0 < ns:
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [0], dtype=tl.int64, is_pure=False,
                                      pack=1)
    tl.store(out_ptr + tl.program_id(0), (t - t0).to(tl.float32))


class Step:
    """Weights of the stand-in model and its activations (batch 1)."""

    def __init__(self, dtype: torch.dtype, device: str, layers: int = LAYERS, hidden: int = HIDDEN,
                 qkv: int = QKV, inter: int = INTER, vocab: int = VOCAB):
        g = torch.Generator(device=device).manual_seed(0)
        w = lambda n, k: (torch.randn(n, k, generator=g, device=device) * k ** -0.5).to(dtype)  # noqa: E731
        nw = lambda: (1 + 0.1 * torch.randn(hidden, generator=g, device=device)).to(dtype)  # noqa: E731
        self.dims = hidden, qkv, inter
        self.layers = [dict(qkv=w(qkv, hidden), o=w(hidden, hidden), gate_up=w(2 * inter, hidden),
                            down=w(hidden, inter), n1=nw(), n2=nw()) for _ in range(layers)]
        self.final_norm, self.lm_head = nw(), w(vocab, hidden)
        self.x0 = torch.randn(hidden, generator=g, device=device).to(dtype)
        self.x = self.x0.clone()
        self.qkv = torch.empty(qkv, device=device, dtype=dtype)
        self.act = torch.empty(inter, device=device, dtype=dtype)
        self.logits = torch.empty(vocab, device=device, dtype=dtype)
        self.scratch = torch.zeros(1024, device=device)

    # ------------------------------------------------------------------ torch (today's kernels)
    def torch_step(self, attn_us: float, attn_programs: int) -> torch.Tensor:
        hidden = self.dims[0]
        x = self.x0
        for lw in self.layers:
            qkv = F.linear(_rms(x, lw["n1"]), lw["qkv"])
            if attn_us:
                _spin[(attn_programs,)](self.scratch, int(attn_us * 1000), PDL=False, num_warps=1)
            x = x + F.linear(qkv[:hidden], lw["o"])  # the attention's output stand-in: q's slice
            gu = F.linear(_rms(x, lw["n2"]), lw["gate_up"])
            inter = gu.shape[-1] // 2
            x = x + F.linear(F.silu(gu[:inter]) * gu[inter:], lw["down"])
        return F.linear(_rms(x, self.final_norm), self.lm_head)

    # ------------------------------------------------------------------ our kernels
    def fused_step(self, attn_us: float, attn_programs: int, pdl: bool, preload: bool, tiles: dict) -> torch.Tensor:
        hidden, _, inter = self.dims
        self.x.copy_(self.x0)
        x, qkv, act = self.x, self.qkv, self.act
        for lw in self.layers:
            self._gemv(x, lw["qkv"], qkv, None, lw["n1"], tiles["qkv"], pdl, preload)
            if attn_us:
                launch = dict(launch_pdl=True) if pdl else {}
                _spin[(attn_programs,)](self.scratch, int(attn_us * 1000), PDL=pdl, num_warps=1, **launch)
            self._gemv(qkv, lw["o"], x, x, None, tiles["o"], pdl, preload, k=hidden)
            self._gemv(x, lw["gate_up"], act, None, lw["n2"], tiles["gate_up"], pdl, preload, glu=True)
            self._gemv(act, lw["down"], x, x, None, tiles["down"], pdl, preload, k=inter)
        self._gemv(x, self.lm_head, self.logits, None, self.final_norm, tiles["lm_head"], pdl, preload)
        return self.logits

    def _gemv(self, x, w, y, res, norm, tile, pdl, preload, k=None, glu=False):
        block_n, warps = tile
        n = w.shape[0] // 2 if glu else w.shape[0]
        launch = dict(launch_pdl=True) if pdl else {}
        _fused_gemv[(triton.cdiv(n, block_n),)](
            x, w, y, x if res is None else res, x if norm is None else norm, n, EPS, K=k or w.shape[1],
            BLOCK_N=block_n, NORM=norm is not None, GLU=glu, RESIDUAL=res is not None, PDL=pdl,
            PRELOAD=preload, num_warps=warps, **launch)


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


TILES = {"qkv": (2, 4), "o": (2, 4), "gate_up": (1, 4), "down": (1, 8), "lm_head": (4, 4)}
TILE_SETS = {
    "default": TILES,
    "wide": {"qkv": (4, 8), "o": (4, 8), "gate_up": (2, 8), "down": (2, 8), "lm_head": (8, 8)},
    "narrow": {"qkv": (1, 4), "o": (1, 4), "gate_up": (1, 4), "down": (1, 4), "lm_head": (2, 4)},
}


def check_cpu() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--check runs under the Triton interpreter: set TRITON_INTERPRET=1")
    s = Step(torch.float32, "cpu", layers=2, hidden=64, qkv=96, inter=128, vocab=200)
    want = s.torch_step(0, 1)
    tiles = {"qkv": (2, 1), "o": (4, 1), "gate_up": (1, 1), "down": (2, 1), "lm_head": (8, 1)}
    got = s.fused_step(0, 1, pdl=False, preload=True, tiles=tiles)
    err = _rel_err(got, want)
    got_late = s.fused_step(0, 1, pdl=False, preload=False, tiles=tiles)
    if err > 1e-5 or _rel_err(got_late, want) > 1e-5:
        raise SystemExit(f"fused step differs from torch: relative error {err:.2e}")
    print(json.dumps({"check": "ok", "rel_err": err}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="CPU correctness under the Triton interpreter")
    p.add_argument("--attn-us", default="0,10")
    p.add_argument("--attn-programs", type=int, default=32)
    p.add_argument("--tiles", default="default,wide,narrow", help=f"tile sets among {sorted(TILE_SETS)}")
    p.add_argument("--replays", type=int, default=20)
    args = p.parse_args()
    if args.check:
        return check_cpu()
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy_gbs = 2 * big.numel() / (gemv.graph_time_us([big.clone] * 3) * 1e-6) / 1e9
    del big
    s = Step(torch.bfloat16, "cuda")
    weight_bytes = 2 * (sum(w.numel() for lw in s.layers for w in lw.values()) + s.lm_head.numel())
    floor_ms = weight_bytes / (copy_gbs * 1e9) * 1e3
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_GBps": round(copy_gbs, 1),
                      "weight_GB": round(weight_bytes / 1e9, 3), "floor_ms": round(floor_ms, 4)}), flush=True)
    with torch.inference_mode():
        want = s.torch_step(0, 1).clone()
        for attn_us in map(float, args.attn_us.split(",")):
            ms = gemv.graph_time_us([lambda: s.torch_step(attn_us, args.attn_programs)], args.replays) / 1e3
            print(json.dumps({"attn_us": attn_us, "chain": "torch", "graph_ms": round(ms, 4),
                              "vs_floor": round(ms / floor_ms, 3)}), flush=True)
            base = ms
            for tile_name in args.tiles.split(","):
                tiles = TILE_SETS[tile_name]
                for chain, pdl, preload in (("fused", False, True), ("fused_pdl_late", True, False),
                                            ("fused_pdl", True, True)):
                    row = {"attn_us": attn_us, "chain": chain, "tiles": tile_name}
                    try:
                        if attn_us == 0:
                            row["rel_err"] = round(_rel_err(s.fused_step(0, 1, pdl, preload, tiles), want), 5)
                        ms = gemv.graph_time_us([lambda: s.fused_step(attn_us, args.attn_programs, pdl, preload,
                                                                      tiles)], args.replays) / 1e3
                        row.update(graph_ms=round(ms, 4), vs_torch=round(ms / base, 3),
                                   vs_floor=round(ms / floor_ms, 3))
                    except Exception as e:  # a tile that does not compile (registers) is a result too
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
