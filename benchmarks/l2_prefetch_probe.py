"""Does prefetching the next projection's weights into L2, on a side stream while the latency-bound
kernels of a decode layer run (RoPE, attention, norms: HBM idle), make a batch-1 decode step faster?
(issue 8: decode_b1 is 1.14 ms of graph against a 0.58 ms floor on an H200; its projections read
~0.8 ms at ~3 TB/s and ~0.33 ms more is attention and small kernels that leave HBM idle.)

    python3 benchmarks/l2_prefetch_probe.py          # CUDA (sm_90): one JSON line per variant
    TRITON_INTERPRET=1 python3 benchmarks/l2_prefetch_probe.py --check   # CPU: the kernels run

A stand-in for one Llama-3.2-1B layer at batch 1, 16 layers, every weight distinct (together far
over L2): norm -> q|k|v GEMM -> a spin kernel holding ``attn_programs`` SMs for ``attn_us`` (RoPE +
the paged attention's latency; it reads no HBM) -> o GEMM -> add, norm -> gate|up GEMM -> SiLU*mul
-> down GEMM -> add. Variants fork a side stream at the spin and prefetch some of the weights the
next GEMMs read (the o projection, the first MiB of gate|up), joined at the end of the layer; the
whole step is one CUDA graph, timed by replay (median of 20). ``prefetch`` is either Hopper's
``cp.async.bulk.prefetch.L2`` (no registers, one instruction per 16 KiB) or plain loads kept in L2
with evict_last.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.engine import gemv  # noqa: E402

LAYERS = 16
HIDDEN, QKV, INTER = 2048, 3072, 8192
CHUNK = tl.constexpr(16384)  # bytes per bulk prefetch instruction (a multiple of 16)
_BULK = tl.constexpr("{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], "
                     + str(CHUNK.value) + "; mov.u32 $0, 0; }")


@triton.jit
def _spin_kernel(out_ptr, ns, dummy):
    # holds one program per SM for ``ns`` nanoseconds, touching no memory until the end
    t0 = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dummy], dtype=tl.int64, is_pure=False,
                                   pack=1)
    t = t0
    while t - t0 < ns:
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dummy], dtype=tl.int64,
                                      is_pure=False, pack=1)
    tl.store(out_ptr + tl.program_id(0), (t - t0).to(tl.float32))


@triton.jit
def _bulk_prefetch_kernel(base_ptr, out_ptr, num_chunks, PER_PROG: tl.constexpr):
    idx = tl.program_id(0) * PER_PROG + tl.arange(0, PER_PROG)
    live = idx < num_chunks
    addr = base_ptr.to(tl.pointer_type(tl.uint8)) + idx.to(tl.int64) * CHUNK
    r = tl.inline_asm_elementwise(_BULK, "=r,l,r", [addr, live.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(out_ptr + tl.program_id(0), tl.sum(r, axis=0))


@triton.jit
def _load_prefetch_kernel(base_ptr, out_ptr, num_elems, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(STEPS):
        offs = start + s * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(base_ptr + offs, mask=offs < num_elems, other=0.0, eviction_policy="evict_last").to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def spin(out: torch.Tensor, us: float, programs: int) -> None:
    _spin_kernel[(programs,)](out, int(us * 1000), 0, num_warps=1)


def prefetch(t: torch.Tensor, nbytes: int, how: str, out: torch.Tensor, programs: int = 64) -> None:
    """Ask for the first ``nbytes`` of ``t`` (contiguous) in L2."""
    nbytes = min(nbytes, t.numel() * t.element_size())
    if how == "bulk":
        chunks = -(-nbytes // CHUNK.value)
        per = triton.next_power_of_2(max(1, -(-chunks // programs)))
        _bulk_prefetch_kernel[(-(-chunks // per),)](t, out, chunks, PER_PROG=per, num_warps=1)
    else:
        elems, block = nbytes // t.element_size(), 2048
        steps = max(1, -(-elems // (block * programs)))
        _load_prefetch_kernel[(-(-elems // (block * steps)),)](t, out, elems, BLOCK=block, STEPS=steps, num_warps=4)


class Model:
    def __init__(self, batch: int, dtype: torch.dtype, device: str):
        g = torch.Generator(device=device).manual_seed(0)
        w = lambda n, k: (torch.randn(n, k, generator=g, device=device) * k ** -0.5).to(dtype)  # noqa: E731
        self.layers = [(w(QKV, HIDDEN), w(HIDDEN, HIDDEN), w(2 * INTER, HIDDEN), w(HIDDEN, INTER))
                       for _ in range(LAYERS)]
        self.x = torch.randn(batch, HIDDEN, generator=g, device=device).to(dtype)
        self.scratch = torch.zeros(4096, device=device)
        self.side = torch.cuda.Stream() if device == "cuda" else None

    def step(self, attn_us: float, attn_programs: int, plan: dict) -> torch.Tensor:
        x = self.x
        for wqkv, wo, wgu, wd in self.layers:
            h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)
            qkv = F.linear(h, wqkv)
            if plan:
                self.side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.side):
                    prefetch(wo, plan.get("o", 0), plan["how"], self.scratch[1024:])
                    prefetch(wgu, plan.get("gate_up", 0), plan["how"], self.scratch[2048:])
            if attn_us:
                spin(self.scratch, attn_us, attn_programs)
            x = x + F.linear(qkv[:, :HIDDEN], wo)
            h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)
            gu = F.linear(h, wgu)
            x = x + F.linear(F.silu(gu[:, :INTER]) * gu[:, INTER:], wd)
            if plan:
                torch.cuda.current_stream().wait_stream(self.side)
        return x


def graph_ms(fn, replays: int = 20) -> float:
    """Median ms of one replay of ``fn`` captured as a CUDA graph (gemv.graph_time_us's timing)."""
    return gemv.graph_time_us([fn], replays) / 1e3


def gemm_hot_cold(batch: int) -> None:
    """Per projection shape: µs per F.linear with 16 distinct weights (from HBM) vs one weight 16
    times (from L2 after the first): what the GEMM would cost if its weights were already in L2."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = {k: torch.randn(batch, k, generator=g, device="cuda").to(torch.bfloat16) for k in (HIDDEN, INTER)}
    for name, (n, k) in {"qkv": (QKV, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN),
                         "down": (HIDDEN, INTER)}.items():
        ws = [torch.randn(n, k, generator=g, device="cuda").to(torch.bfloat16) for _ in range(LAYERS)]
        cold = graph_ms(lambda: [F.linear(x[k], w) for w in ws]) * 1000 / LAYERS
        hot = graph_ms(lambda: [F.linear(x[k], ws[0]) for _ in ws]) * 1000 / LAYERS
        mb = n * k * 2 / 1e6
        print(json.dumps({"batch": batch, "gemm": name, "mbytes": round(mb, 1), "cold_us": round(cold, 2),
                          "hot_us": round(hot, 2), "cold_tbs": round(mb / cold, 2)}), flush=True)


def check_cpu() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--check runs under the Triton interpreter: set TRITON_INTERPRET=1")
    t = torch.randn(5000)
    out = torch.zeros(64)
    prefetch(t, t.numel() * 4, "load", out, programs=4)
    if abs(float(out.sum()) - float(t.sum())) > 1e-2:
        raise SystemExit(f"load prefetch summed {float(out.sum())}, want {float(t.sum())}")
    print(json.dumps({"check": "ok"}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--attn-us", default="0,10,14")
    p.add_argument("--gemm-hot", action="store_true", help="only the per-GEMM HBM vs L2 timing")
    args = p.parse_args()
    if args.check:
        return check_cpu()
    if args.gemm_hot:
        for batch in map(int, args.batch_sizes.split(",")):
            gemm_hot_cold(batch)
        return
    mib = 1 << 20
    plans = {"none": {}}
    for how in ("bulk", "load"):
        plans[f"{how}:o"] = {"how": how, "o": 8 * mib}
        plans[f"{how}:o+gu16"] = {"how": how, "o": 8 * mib, "gate_up": 16 * mib}
        plans[f"{how}:o+gu32"] = {"how": how, "o": 8 * mib, "gate_up": 32 * mib}
    for batch in map(int, args.batch_sizes.split(",")):
        m = Model(batch, torch.bfloat16, "cuda")
        for attn_us in map(float, args.attn_us.split(",")):
            base = None
            for name, plan in plans.items():
                if attn_us == 0 and name != "none":
                    continue
                ms = graph_ms(lambda: m.step(attn_us, 32, plan))
                base = ms if name == "none" else base
                print(json.dumps({"batch": batch, "attn_us": attn_us, "plan": name, "graph_ms": round(ms, 4),
                                  "vs_none": round(ms / base, 4)}), flush=True)


if __name__ == "__main__":
    main()
