"""Triton kernels of the paged attention: the KV cache write and one attention kernel for every
step (prefill chunks, decodes, and mixes of both), over blocks that may live in any segment. The
split-KV kernel of decode rows (paged_decode_kernel) is in triton_decode_kernels.py.

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
def _softmax_update(scores, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """One tile's (log2-unit) scores and values into the running (max, sum, unnormalised output):
    the online-softmax step shared by the general and the split decode kernels' tiles."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    p = tl.exp2(scores - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _capped(scores, SOFTCAP: tl.constexpr):
    """Gemma 2's logit cap, SOFTCAP * tanh(scores / SOFTCAP), in the caller's (log2) units; tanh as
    1 - 2 / (e^2x + 1), which saturates to +-1 without NaN; 0.0: scores as they are."""
    if SOFTCAP > 0:
        e2x = tl.exp2(scores * (2.0 * 1.4426950408889634 / SOFTCAP))
        scores = SOFTCAP * (1.0 - 2.0 / (e2x + 1.0))
    return scores


@triton.jit
def _normalized(acc, m_i, l_i, sinks, head, row_ok, HAS_SINKS: tl.constexpr):
    """A row's output: its unnormalised output over the softmax's sum. HAS_SINKS (gpt-oss): each
    query head's learned sink logit is one more term of that sum, 2^(sink - m) in the running
    max's log2 units, and adds nothing to the output (a row with no key left stays 0)."""
    if HAS_SINKS:
        sink = tl.load(sinks + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        l_i = l_i + tl.exp2(sink - m_i)
    return acc / tl.maximum(l_i, 1.0e-30)[:, None]


@triton.jit
def _attend_tile(n0, kv_hi, q, q_pos, m_i, l_i, acc, anchor, layer_off, kv_off, block_off, blk_start,
                 kvh, scale, window, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
                 BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 MASKED: tl.constexpr, SOFTCAP: tl.constexpr):
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
    scores = _capped(tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale, SOFTCAP)
    if MASKED:
        visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        if USE_WINDOW:
            visible = visible & ((q_pos[:, None] - n[None, :]) < window)
        scores = tl.where(visible, scores, float("-inf"))
    return _softmax_update(scores, v, m_i, l_i, acc, DOT_PRECISION)


@triton.jit
def paged_attention_kernel(
    Q, q_stride_t, q_stride_h, O, o_stride_t, o_stride_h,
    anchor, layer_off, kv_off,
    block_off, qb_seq, qb_start, seq_q_start, seq_q_len, seq_ctx_len, seq_blk_start,
    scale, window, sinks,
    G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_DIAGONAL: tl.constexpr = False,
    SOFTCAP: tl.constexpr = 0.0, HAS_SINKS: tl.constexpr = False,
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
                kvh, scale, window, HKV, D, BLOCK_D, BS, BLOCK_N, USE_WINDOW, DOT_PRECISION, False, SOFTCAP)
            n0 += BLOCK_N
        while n0 < kv_hi:
            m_i, l_i, acc = _attend_tile(
                n0, kv_hi, q, q_pos, m_i, l_i, acc, anchor, layer_off, kv_off, block_off, blk_start,
                kvh, scale, window, HKV, D, BLOCK_D, BS, BLOCK_N, USE_WINDOW, DOT_PRECISION, True, SOFTCAP)
            n0 += BLOCK_N
    else:  # for loops: the compiler pipelines the K/V loads
        for n0 in range(kv_lo, full_hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                n0, kv_hi, q, q_pos, m_i, l_i, acc, anchor, layer_off, kv_off, block_off, blk_start,
                kvh, scale, window, HKV, D, BLOCK_D, BS, BLOCK_N, USE_WINDOW, DOT_PRECISION, False, SOFTCAP)
        for n0 in range(full_hi, kv_hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                n0, kv_hi, q, q_pos, m_i, l_i, acc, anchor, layer_off, kv_off, block_off, blk_start,
                kvh, scale, window, HKV, D, BLOCK_D, BS, BLOCK_N, USE_WINDOW, DOT_PRECISION, True, SOFTCAP)
    out = _normalized(acc, m_i, l_i, sinks, head, row_ok, HAS_SINKS)
    tl.store(O + tok[:, None] * o_stride_t + head[:, None] * o_stride_h + d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
