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


# Decode steps of a few rows (2 <= M <= BLOCK_M): y = x W^T + b on tensor cores, one program per
# BLOCK_N rows of W streaming K in BLOCK_K tiles (the rows of x padded to BLOCK_M >= 16, masked).
# W is read once whatever M is, like the GEMV; num_stages keeps several W tiles in flight.
@triton.jit
def _skinny_tile(x, w, ms, m_ok, rows, row_ok, k0, K, stride_xm, stride_wn, acc, BLOCK_K: tl.constexpr):
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    xt = tl.load(x + ms[:, None] * stride_xm + cols[None, :], mask=m_ok[:, None] & col_ok[None, :], other=0.0)
    wt = tl.load(w + rows[:, None] * stride_wn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    return tl.dot(xt, tl.trans(wt), acc)


@triton.jit
def skinny_kernel(x, w, b, y, M, N, K, stride_xm, stride_wn, stride_ym, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if INTERPRET:  # the interpreter cannot take tensor bounds in range()
        k0 = 0
        while k0 < K:
            acc = _skinny_tile(x, w, ms, m_ok, rows, row_ok, k0, K, stride_xm, stride_wn, acc, BLOCK_K)
            k0 += BLOCK_K
    else:
        for k0 in range(0, K, BLOCK_K):
            acc = _skinny_tile(x, w, ms, m_ok, rows, row_ok, k0, K, stride_xm, stride_wn, acc, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y + ms[:, None] * stride_ym + rows[None, :], acc.to(y.dtype.element_ty),
             mask=m_ok[:, None] & row_ok[None, :])
