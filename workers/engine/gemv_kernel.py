"""The Triton GEMV of workers/engine/gemv.py (opt-in ``engine.gemv``), in a module of its own: Triton
resolves a @jit function's callees from its module's globals, so the kernel and its tile live here
at module level, imported only when the GEMV is used."""

from __future__ import annotations

import triton
import triton.language as tl


# Batch-1 projections (workers/engine/gemv.py): y = W x + b, one program per BLOCK_N rows of W.
@triton.jit
def _gemv_tile(w, x, rows, row_ok, k0, K, stride_wn, acc, BLOCK_K: tl.constexpr):
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    wt = tl.load(w + rows[:, None] * stride_wn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    xv = tl.load(x + cols, mask=col_ok, other=0.0)
    return acc + tl.sum(wt.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)


@triton.jit
def gemv_kernel(x, w, b, y, N, K, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if INTERPRET:  # the interpreter cannot take tensor bounds in range()
        k0 = 0
        while k0 < K:
            acc = _gemv_tile(w, x, rows, row_ok, k0, K, stride_wn, acc, BLOCK_K)
            k0 += BLOCK_K
    else:
        for k0 in range(0, K, BLOCK_K):
            acc = _gemv_tile(w, x, rows, row_ok, k0, K, stride_wn, acc, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y + rows, acc.to(y.dtype.element_ty), mask=row_ok)
