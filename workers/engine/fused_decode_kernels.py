"""Triton kernels of the fused small-batch decode step (workers/engine/fused_decode.py), in a module
of their own: Triton resolves a @jit function's callees from its module's globals.

Each kernel may be launched with programmatic dependent launch (PDL=True, launch_pdl=True; sm_90+):
it lets the next kernel launch at its start (griddepcontrol.launch_dependents) and reads nothing
an earlier kernel wrote before griddepcontrol.wait. The GEMV loads its first weight chunk before
that wait, so weights stream in while the previous kernel finishes. Without PDL neither
instruction is emitted. Rounding follows transformers' eager modules: every op's result is rounded to the
model's dtype where the module's would be (a no-op in fp32).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _rms_scale(x_ptr, K: tl.constexpr, eps, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of one row of K values, in fp32."""
    ss = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        ss += xv * xv
    return tl.rsqrt(tl.sum(ss, axis=0) / K + eps)


@triton.jit
def _normalised(xv, norm_ptr, cols, K, r, NORM: tl.constexpr):
    """A chunk [BLOCK_K] of one input row in its dtype: raw, or RMS-normalised as LlamaRMSNorm
    rounds it."""
    if NORM:
        dt = xv.dtype
        xv = (xv.to(tl.float32) * r).to(dt)
        xv = (xv.to(tl.float32) * tl.load(norm_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)).to(dt)
    return xv


@triton.jit
def _input_chunk(x_ptr, norm_ptr, cols, K, r, NORM: tl.constexpr):
    """A chunk of the GEMV's input row in fp32."""
    return _normalised(tl.load(x_ptr + cols, mask=cols < K, other=0.0), norm_ptr, cols, K, r, NORM).to(tl.float32)


@triton.jit
def _output_rows(N, K: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr):
    """This program's outputs idx (< N), the W rows computing them and their element offsets: with
    ROPE, output pair idx of a head = rows (r, r + HALF) of W; else row idx (twice)."""
    idx = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if ROPE:
        rows = (idx // HALF) * (2 * HALF) + idx % HALF
        rows2 = rows + HALF
    else:
        rows = idx
        rows2 = idx
    return idx, idx < N, rows, rows2, rows.to(tl.int64)[:, None] * K, rows2.to(tl.int64)[:, None] * K


@triton.jit
def _weights_before_wait(w_ptr, w2_ptr, w_rows, w2_rows, row_ok, cols0, K, TWO: tl.constexpr, PDL: tl.constexpr):
    """Under PDL: lets the next kernel launch, loads the first chunk of this program's W rows (and
    W2's with TWO; else W's again), which no earlier kernel writes, then waits for the earlier
    kernels' outputs."""
    if PDL:
        gdc_launch_dependents()
    mask = row_ok[:, None] & (cols0 < K)[None, :]
    w_first = tl.load(w_ptr + w_rows + cols0[None, :], mask=mask, other=0.0)
    w2_first = w_first
    if TWO:
        w2_first = tl.load(w2_ptr + w2_rows + cols0[None, :], mask=mask, other=0.0)
    if PDL:
        gdc_wait()
    return w_first, w2_first


@triton.jit
def _rotate(a, b, c1, c2, s1, s2, dt):
    """(a, b) = x[r], x[r + HALF] -> x * cos + rotate_half(x) * sin at those places, each product
    rounded to ``dt`` as transformers' eager apply_rotary_pos_emb rounds it."""
    f32 = tl.float32
    return (((a * c1).to(dt).to(f32) + (-b * s1).to(dt).to(f32)).to(dt),
            ((b * c2).to(dt).to(f32) + (a * s2).to(dt).to(f32)).to(dt))


@triton.jit
def fused_gemv_kernel(x_ptr, stride_xm, w_ptr, b_ptr, w2_ptr, b2_ptr, y_ptr, stride_ym, res_ptr, stride_rm,
                      norm_ptr, pos_ptr, cos_ptr, sin_ptr, stride_cos, N, eps, M: tl.constexpr, K: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr,
                      ROPE: tl.constexpr, HALF: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                      PDL: tl.constexpr):
    """For each of M rows: y[rows] = (res[rows] +) W[rows] . norm?(x) (+ b); one program per BLOCK_N
    outputs. GLU: y[rows] = silu(W[rows] . h + b) * (W2[rows] . h + b2). ROPE (W = whole heads of
    2 * HALF rows, N = pairs): output pairs (r, r + HALF) of a head, rotated as transformers'
    apply_rotary_pos_emb does at the row's position (cos/sin tables [positions, 2 * HALF])."""
    idx, row_ok, rows, rows2, w_rows, w2_rows = _output_rows(N, K, BLOCK_N, ROPE, HALF)
    cols0 = tl.arange(0, BLOCK_K)
    w_first, w2_first = _weights_before_wait(w_ptr, w2_ptr, w_rows, w2_rows, row_ok, cols0, K, GLU or ROPE, PDL)
    dt = w_first.dtype
    for m in tl.static_range(M):
        x_row = x_ptr + m * stride_xm
        r = 1.0
        if K <= BLOCK_K:  # one chunk: the row is loaded once, for its norm and the products
            xv = tl.load(x_row + cols0, mask=cols0 < K, other=0.0)
            if NORM:
                xf = xv.to(tl.float32)
                r = tl.rsqrt(tl.sum(xf * xf, axis=0) / K + eps)
            xv = _normalised(xv, norm_ptr, cols0, K, r, NORM).to(tl.float32)
        else:
            if NORM:
                r = _rms_scale(x_row, K, eps, BLOCK_K)
            xv = _input_chunk(x_row, norm_ptr, cols0, K, r, NORM)
        acc = tl.sum(w_first.to(tl.float32) * xv[None, :], axis=1)
        if GLU or ROPE:
            acc2 = tl.sum(w2_first.to(tl.float32) * xv[None, :], axis=1)
        for k0 in tl.static_range(BLOCK_K, K, BLOCK_K):
            cols = k0 + cols0
            mk = row_ok[:, None] & (cols < K)[None, :]
            xv = _input_chunk(x_row, norm_ptr, cols, K, r, NORM)
            acc += tl.sum(tl.load(w_ptr + w_rows + cols[None, :], mask=mk, other=0.0).to(tl.float32) * xv[None, :],
                          axis=1)
            if GLU or ROPE:
                acc2 += tl.sum(tl.load(w2_ptr + w2_rows + cols[None, :], mask=mk, other=0.0).to(tl.float32)
                               * xv[None, :], axis=1)
        if not (GLU or ROPE):
            acc2 = acc
        ms = m + tl.arange(0, 1)
        _finish(acc[None, :], acc2[None, :], ms, ms < M, idx, row_ok, rows, rows2, b_ptr, b2_ptr,
                y_ptr, stride_ym, res_ptr, stride_rm, pos_ptr, cos_ptr, sin_ptr, stride_cos, dt, GLU, ROPE, HALF,
                RESIDUAL, HAS_BIAS)


@triton.jit
def _finish(acc, acc2, ms, m_ok, idx, row_ok, rows, rows2, b_ptr, b2_ptr, y_ptr, stride_ym, res_ptr, stride_rm,
            pos_ptr, cos_ptr, sin_ptr, stride_cos, dt, GLU: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr,
            RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Bias, SiLU*mul (GLU) or RoPE, residual, store: fp32 products acc (acc2: up / the pair's
    second half) [rows ms, outputs idx], rounded to ``dt`` where the eager modules round."""
    ok = m_ok[:, None] & row_ok[None, :]
    if HAS_BIAS:  # F.linear adds the bias before rounding its output
        acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        if GLU or ROPE:
            acc2 += tl.load(b2_ptr + rows2, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    out = acc.to(dt).to(tl.float32)
    out2 = acc2.to(dt).to(tl.float32)
    if GLU:
        out = (out / (1.0 + tl.exp(-out))).to(dt).to(tl.float32) * out2
        out = out.to(dt).to(tl.float32)
    if ROPE:  # x * cos + rotate_half(x) * sin, each product rounded as the eager ops round it
        at = tl.load(pos_ptr + ms, mask=m_ok, other=0).to(tl.int64)[:, None] * stride_cos + (idx % HALF)[None, :]
        c1 = tl.load(cos_ptr + at, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + at + HALF, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + at, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + at + HALF, mask=ok, other=0.0).to(tl.float32)
        out, out2 = _rotate(out, out2, c1, c2, s1, s2, dt)
        out = out.to(tl.float32)
        tl.store(y_ptr + ms[:, None] * stride_ym + rows2[None, :], out2.to(y_ptr.dtype.element_ty), mask=ok)
    if RESIDUAL:
        res = tl.load(res_ptr + ms[:, None] * stride_rm + rows[None, :], mask=ok, other=0.0).to(tl.float32)
        out = (res + out).to(dt)
    tl.store(y_ptr + ms[:, None] * stride_ym + rows[None, :], out.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def rope_kernel(qkv_ptr, stride_m, pos_ptr, cos_ptr, sin_ptr, stride_cos, qn_ptr, kn_ptr, eps, HQ, HALF: tl.constexpr,
                HEAD_NORM: tl.constexpr, PDL: tl.constexpr):
    """In place on q and k heads of one row (grid: rows, HQ + HKV): optional per-head RMSNorm
    (Qwen3's q_norm / k_norm), then x * cos + rotate_half(x) * sin at the row's position."""
    m = tl.program_id(0)
    h = tl.program_id(1)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    half = tl.arange(0, HALF)
    base = qkv_ptr + m * stride_m + h * 2 * HALF
    x1 = tl.load(base + half)
    x2 = tl.load(base + HALF + half)
    dt = x1.dtype
    if HEAD_NORM:
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        r = tl.rsqrt((tl.sum(x1f * x1f, axis=0) + tl.sum(x2f * x2f, axis=0)) / (2 * HALF) + eps)
        if h < HQ:
            n1 = tl.load(qn_ptr + half).to(tl.float32)
            n2 = tl.load(qn_ptr + HALF + half).to(tl.float32)
        else:
            n1 = tl.load(kn_ptr + half).to(tl.float32)
            n2 = tl.load(kn_ptr + HALF + half).to(tl.float32)
        x1 = ((x1f * r).to(dt).to(tl.float32) * n1).to(dt)
        x2 = ((x2f * r).to(dt).to(tl.float32) * n2).to(dt)
    p = tl.load(pos_ptr + m).to(tl.int64)
    c1 = tl.load(cos_ptr + p * stride_cos + half).to(tl.float32)
    c2 = tl.load(cos_ptr + p * stride_cos + HALF + half).to(tl.float32)
    s1 = tl.load(sin_ptr + p * stride_cos + half).to(tl.float32)
    s2 = tl.load(sin_ptr + p * stride_cos + HALF + half).to(tl.float32)
    o1, o2 = _rotate(x1.to(tl.float32), x2.to(tl.float32), c1, c2, s1, s2, dt)
    tl.store(base + half, o1)
    tl.store(base + HALF + half, o2)
