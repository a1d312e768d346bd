"""Triton kernels of the paged attention: the KV cache write and one attention kernel for every
step (prefill chunks, decodes, and mixes of both), over blocks that may live in any segment; and
a split-KV kernel for decode-only steps that also writes the step's K/V (paged_decode_kernel).

Addressing (see triton_attention.py): KV memory is several segment tensors laid out as
``segment[layer, kv, local_block, slot, kv_head, dim]``. The host gives every kernel element
offsets from one anchor pointer: ``block_off`` (a block's layer-0 K start) and ``slot_off`` (a new
token's layer-0 K slot). The element (layer, kv, slot n of a block, head h, d) is then at

    anchor + block_off + layer * layer_off_stride + kv * kv_off + n * H * D + h * D + d

Step metadata (int32, on the device):
    qb_seq[i]        sequence of query block i;  qb_start[i]: its first packed token
    seq_q_start[s], seq_q_len[s], seq_ctx_len[s], seq_blk_start[s]: packed tokens of sequence s are
                     [q_start, q_start + q_len), at context positions [ctx_len - q_len, ctx_len);
                     its blocks are block_off[blk_start : blk_start + ceil(ctx_len / BS)]
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def write_kv_kernel(
    K, V, k_stride_t, k_stride_h, v_stride_t, v_stride_h, anchor, slot_off, n_real, layer_off, kv_off,
    H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    if t < tl.load(n_real):  # later rows pad a captured graph's batch: they write nothing
        off = tl.load(slot_off + t)  # may be negative: segments can lie below the anchor
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        m = (h[:, None] < H) & (d[None, :] < D)
        k = tl.load(K + t * k_stride_t + h[:, None] * k_stride_h + d[None, :], mask=m)
        v = tl.load(V + t * v_stride_t + h[:, None] * v_stride_h + d[None, :], mask=m)
        dst = anchor + (off + layer_off) + h[:, None] * D + d[None, :]
        tl.store(dst, k.to(anchor.dtype.element_ty), mask=m)
        tl.store(dst + kv_off, v.to(anchor.dtype.element_ty), mask=m)


@triton.jit
def _attend_tile(n0, kv_hi, q, q_pos, m_i, l_i, acc, anchor, layer_off, kv_off, block_off, blk_start,
                 kvh, scale, window, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
                 BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 MASKED: tl.constexpr):
    """Keys [n0, n0 + BLOCK_N) of one sequence into the running (max, sum, output) of its rows.
    ``scale`` is in log2 units (softmax scale * log2 e: exp2 below). MASKED=False: every row sees
    every key of the tile (the caller checked), so no causal/length masks are built."""
    n = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    if MASKED:
        n_ok = n < kv_hi
        base = (tl.load(block_off + blk_start + n // BS, mask=n_ok, other=0) + layer_off
                + (n % BS) * (HKV * D) + kvh * D)
        kv_mask = n_ok[:, None] & (d < D)[None, :]
        k = tl.load(anchor + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(anchor + kv_off + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
    else:
        base = tl.load(block_off + blk_start + n // BS) + layer_off + (n % BS) * (HKV * D) + kvh * D
        d_mask = (d < D)[None, :]
        k = tl.load(anchor + base[:, None] + d[None, :], mask=d_mask, other=0.0)
        v = tl.load(anchor + kv_off + base[:, None] + d[None, :], mask=d_mask, other=0.0)
    scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale
    if MASKED:
        visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        if USE_WINDOW:
            visible = visible & ((q_pos[:, None] - n[None, :]) < window)
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    p = tl.exp2(scores - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def paged_attention_kernel(
    Q, q_stride_t, q_stride_h, O, o_stride_t, o_stride_h,
    anchor, layer_off, kv_off,
    block_off, qb_seq, qb_start, seq_q_start, seq_q_len, seq_ctx_len, seq_blk_start,
    scale, window,
    G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_DIAGONAL: tl.constexpr = False,
):
    """One program = one query block (up to BLOCK_Q tokens of one sequence) x one KV head, with the
    G query heads of that KV head stacked as rows: row r is token r // G, query head kvh * G + r % G.
    Online softmax over the sequence's cached context, causal (and sliding-window) masked."""
    qb = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.load(qb_seq + qb)
    t0 = tl.load(qb_start + qb)
    q_start = tl.load(seq_q_start + s)
    q_len = tl.load(seq_q_len + s)
    ctx_len = tl.load(seq_ctx_len + s)
    blk_start = tl.load(seq_blk_start + s)
    first_pos = ctx_len - q_len  # context position of the sequence's first new token

    r = tl.arange(0, BLOCK_M)
    ti = r // G
    tok = t0 + ti
    row_ok = (ti < BLOCK_Q) & (tok < q_start + q_len)
    q_pos = first_pos + (tok - q_start)
    head = kvh * G + r % G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(Q + tok[:, None] * q_stride_t + head[:, None] * q_stride_h + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # keys this block can see: [kv_lo, kv_hi)
    last_tok = tl.minimum(t0 + BLOCK_Q, q_start + q_len) - 1
    kv_hi = first_pos + (last_tok - q_start) + 1
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(first_pos + (t0 - q_start) - window + 1, 0)
        kv_lo = (kv_lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked rows stay NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    scale = scale * 1.4426950408889634  # log2 e: the tiles use exp2
    # SPLIT_DIAGONAL: [kv_lo, full_hi) are tiles every row of this block sees whole (wholly at or
    # before the first row's position; no window), so they skip the masks; [full_hi, kv_hi): the
    # diagonal, masked. Off: every tile masked (the path measured on GPUs so far)
    full_hi = kv_lo
    if SPLIT_DIAGONAL and not USE_WINDOW:
        full_hi = tl.maximum(((first_pos + (t0 - q_start) + 1) // BLOCK_N) * BLOCK_N, kv_lo)
    if INTERPRET:  # the interpreter cannot take tensor bounds in range() (numpy >= 2 scalars)
        n0 = kv_lo
        while n0 < full_hi:
            m_i, l_i, acc = _attend_tile(
                n0, kv_hi, q, q_pos, m_i, l_i, acc, anchor, layer_off, kv_off, block_off, blk_start,
                kvh, scale, window, HKV, D, BLOCK_D, BS, BLOCK_N, USE_WINDOW, DOT_PRECISION, False)
            n0 += BLOCK_N
        while n0 < kv_hi:
            m_i, l_i, acc = _attend_tile(
                n0, kv_hi, q, q_pos, m_i, l_i, acc, anchor, layer_off, kv_off, block_off, blk_start,
                kvh, scale, window, HKV, D, BLOCK_D, BS, BLOCK_N, USE_WINDOW, DOT_PRECISION, True)
            n0 += BLOCK_N
    else:  # for loops: the compiler pipelines the K/V loads
        for n0 in range(kv_lo, full_hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                n0, kv_hi, q, q_pos, m_i, l_i, acc, anchor, layer_off, kv_off, block_off, blk_start,
                kvh, scale, window, HKV, D, BLOCK_D, BS, BLOCK_N, USE_WINDOW, DOT_PRECISION, False)
        for n0 in range(full_hi, kv_hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                n0, kv_hi, q, q_pos, m_i, l_i, acc, anchor, layer_off, kv_off, block_off, blk_start,
                kvh, scale, window, HKV, D, BLOCK_D, BS, BLOCK_N, USE_WINDOW, DOT_PRECISION, True)
    out = acc / tl.maximum(l_i, 1.0e-30)[:, None]
    tl.store(O + tok[:, None] * o_stride_t + head[:, None] * o_stride_h + d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# Decode-only steps (every sequence has one new token; token row s is sequence s): split-KV.
# Program (s, kvh, j) attends the G query heads of KV head kvh of sequence s to split j of its
# cached keys; the new key (position ctx - 1) is this step's k/v, attended from registers by the
# last split, which also writes it to the cache. So nothing in the launch reads that slot:
#
#   cached keys [lo, ctx - 1): split j gets [lo + j * chunk, lo + (j + 1) * chunk), chunk a multiple
#   of BLOCK_N (one tile per split for contexts up to SPLITS * BLOCK_N) | key ctx - 1: split SPLITS - 1
#
# SPLITS > 1: each split stores its partial (max, sum, unnormalised output) per query head; they
# are merged by the last program of the (sequence, KV head) to arrive (COMBINE_LAST: an arrival
# counter, reset by that program for the next launch) or by decode_combine_kernel.
@triton.jit
def _combine_splits(part_m, part_l, part_acc, row0, O, o_off, o_stride_h, SPLITS: tl.constexpr,
                    G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """O[head kvh * G + g] = sum_j 2^(m_j - M) acc_j / sum_j 2^(m_j - M) l_j over the partials of
    rows [row0, row0 + SPLITS) (M = max_j m_j; m in log2 units). Loads skip L1 (.cg): other
    programs wrote these rows during this launch, and L1 is not coherent."""
    j = tl.arange(0, BLOCK_S)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    jg_ok = (j < SPLITS)[:, None] & (g < G)[None, :]
    jg = (row0 + j)[:, None] * G + g[None, :]
    m = tl.load(part_m + jg, mask=jg_ok, other=-1.0e30, cache_modifier=".cg")
    l = tl.load(part_l + jg, mask=jg_ok, other=0.0, cache_modifier=".cg")
    acc = tl.load(part_acc + jg[:, :, None] * D + d[None, None, :],
                  mask=jg_ok[:, :, None] & (d < D)[None, None, :], other=0.0, cache_modifier=".cg")
    w = tl.exp2(m - tl.max(m, 0)[None, :])  # empty splits: m = -1e30, l = 0, acc = 0 -> weight 0
    out = tl.sum(w[:, :, None] * acc, 0) / tl.maximum(tl.sum(w * l, 0), 1.0e-30)[:, None]
    tl.store(O + o_off + g[:, None] * o_stride_h + d[None, :], out.to(O.dtype.element_ty),
             mask=(g < G)[:, None] & (d < D)[None, :])


@triton.jit
def paged_decode_kernel(
    Q, q_stride_t, q_stride_h, K, k_stride_t, k_stride_h, V, v_stride_t, v_stride_h,
    O, o_stride_t, o_stride_h, anchor, layer_off, kv_off, block_off, seq_ctx_len, seq_blk_start,
    slot_off, n_real, part_m, part_l, part_acc, arrivals, scale, window,
    G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr, USE_WINDOW: tl.constexpr, WRITE_KV: tl.constexpr, COMBINE_LAST: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    j = tl.program_id(2)
    # one round of independent loads: lengths, this token's q/k/v (row s), the new slot
    ctx = tl.load(seq_ctx_len + s)
    blk_start = tl.load(seq_blk_start + s)
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_ok = r < G
    d_ok = d < D
    q = tl.load(Q + s * q_stride_t + (kvh * G + r)[:, None] * q_stride_h + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # the cache's values (what later steps read), attended in q's precision like cached keys
    k_new = tl.load(K + s * k_stride_t + kvh * k_stride_h + d, mask=d_ok, other=0.0).to(anchor.dtype.element_ty)
    v_new = tl.load(V + s * v_stride_t + kvh * v_stride_h + d, mask=d_ok, other=0.0).to(anchor.dtype.element_ty)
    last = j == SPLITS - 1
    if WRITE_KV:  # rows s >= n_real pad a captured graph's batch: they write nothing
        write = last & (s < tl.load(n_real))
        dst = anchor + tl.load(slot_off + s, mask=write, other=0) + layer_off + kvh * D + d
        tl.store(dst, k_new, mask=d_ok & write)
        tl.store(dst + kv_off, v_new, mask=d_ok & write)

    scale = scale * 1.4426950408889634  # log2 e: exp2 below
    hi = tl.maximum(ctx - 1, 0)  # cached keys [lo, hi); padding rows (ctx 0) have none
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    chunk = tl.cdiv(tl.cdiv(hi - lo, SPLITS), BLOCK_N) * BLOCK_N
    n_lo = lo + j * chunk
    n_hi = tl.minimum(n_lo + chunk, hi)
    has_new = last & (ctx > 0)
    s_new = tl.sum(q.to(tl.float32) * k_new.to(q.dtype).to(tl.float32)[None, :], 1) * scale
    zero = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.where(has_new, s_new, -1.0e30)  # finite: empty splits and padding rows stay NaN-free
    l_i = tl.where(has_new, 1.0, 0.0) + tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.where(has_new, zero + v_new.to(tl.float32)[None, :], zero)
    q_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + (ctx - 1)
    if INTERPRET:  # the interpreter cannot take tensor bounds in range()
        n0 = n_lo
        while n0 < n_hi:
            m_i, l_i, acc = _attend_tile(
                n0, n_hi, q, q_pos, m_i, l_i, acc, anchor, layer_off, kv_off, block_off, blk_start,
                kvh, scale, window, HKV, D, BLOCK_D, BS, BLOCK_N, False, DOT_PRECISION, True)
            n0 += BLOCK_N
    else:
        for n0 in range(n_lo, n_hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                n0, n_hi, q, q_pos, m_i, l_i, acc, anchor, layer_off, kv_off, block_off, blk_start,
                kvh, scale, window, HKV, D, BLOCK_D, BS, BLOCK_N, False, DOT_PRECISION, True)

    o_off = s * o_stride_t + kvh * G * o_stride_h
    if SPLITS == 1:
        out = acc / tl.maximum(l_i, 1.0e-30)[:, None]
        tl.store(O + o_off + r[:, None] * o_stride_h + d[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
    else:
        row0 = (s * HKV + kvh) * SPLITS  # partial rows of this (sequence, KV head), one per split
        mine = (row0 + j) * G + r
        tl.store(part_m + mine, m_i, mask=row_ok)
        tl.store(part_l + mine, l_i, mask=row_ok)
        tl.store(part_acc + mine[:, None] * D + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        if COMBINE_LAST:
            tl.debug_barrier()  # all threads' partial stores precede the release below
            count = tl.atomic_add(arrivals + s * HKV + kvh, 1, sem="acq_rel", scope="gpu")
            if count == SPLITS - 1:  # the others have released their partials: merge, reset
                tl.store(arrivals + s * HKV + kvh, 0)
                _combine_splits(part_m, part_l, part_acc, row0, O, o_off, o_stride_h, SPLITS, G, D,
                                BLOCK_S, BLOCK_G, BLOCK_D)


@triton.jit
def decode_combine_kernel(part_m, part_l, part_acc, O, o_stride_t, o_stride_h, SPLITS: tl.constexpr,
                          G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """paged_decode_kernel's merge as its own launch (grid: sequences x KV heads)."""
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    _combine_splits(part_m, part_l, part_acc, (s * HKV + kvh) * SPLITS, O, s * o_stride_t + kvh * G * o_stride_h,
                    o_stride_h, SPLITS, G, D, BLOCK_S, BLOCK_G, BLOCK_D)


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
