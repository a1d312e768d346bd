"""Triton kernels of decode rows: split-KV attention (FlashDecoding) that also writes the step's
K/V (paged_decode_kernel), and its merge as a launch of its own (decode_combine_kernel). Addressing
and step metadata as in triton_kernels.py, whose online-softmax update they share.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from workers.engine.triton_kernels import _capped, _normalized, _softmax_update


# Decode rows (one new token that is not a prompt token: SeqSlice.prompt), in decode-only steps
# and beside prefill chunks alike: split-KV (FlashDecoding). A row's keys [lo, ctx) (lo: the
# window's start, else 0; ctx - 1 is this step's token) are cut into chunks of CHUNK_KEYS keys:
#
#   chunk c: [lo + c * CHUNK_KEYS, min(lo + (c + 1) * CHUNK_KEYS, ctx)),  c < n_chunks = ceil((ctx - lo) / CHUNK_KEYS)
#
# so the chunking depends on the row's context alone. Each chunk is its own online softmax over
# BLOCK_N-key tiles from the chunk's start. One chunk (short contexts; none: a padding row): program
# j = 0 computes it and stores the output, no partials. More: the SPLITS programs of the (row, KV
# head) stride over the chunks (program j: chunks j, j + SPLITS, ...), each chunk's partial (max,
# sum, unnormalised output per query head) is stored in the row's scratch rows, and
# _combine_chunks merges the n_chunks partials in chunk order (the last program of the (row, KV
# head) to arrive: COMBINE_LAST, an arrival counter it resets; or decode_combine_kernel). SPLITS
# is the grid's third axis, read at run time (one binary for every split count); only the sharing
# of chunks depends on it. So the output's bits depend on the row's own q/k/v, cache and context,
# never on the split count or on the step's other rows: a sequence decodes bit-alike in any
# batch, eager or padded, decode-only or beside prefill chunks.
# The new key (position ctx - 1) is this step's k/v from registers, scored by the same dot as the
# cached keys; its slot is never read (WRITE_KV: program 0 writes it during this launch).
# Scratch: partial row (i * HKV + kvh) * max_chunks + c, max_chunks = ceil(max_model_len / CHUNK_KEYS)
# (the host sizes it and keeps element offsets under 2^31).
@triton.jit
def _decode_chunking(ctx, window, CHUNK_KEYS: tl.constexpr, USE_WINDOW: tl.constexpr):
    """(lo, number of chunks) of a decode row with ``ctx`` keys (0 for padding rows)."""
    lo = ctx * 0
    if USE_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    return lo, tl.cdiv(tl.maximum(ctx - lo, 0), CHUNK_KEYS)


@triton.jit
def _cached_kv(n0, n_end, new_pos, anchor, layer_off, kv_off, block_off, blk_start, kvh, HKV: tl.constexpr,
               D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The cached K and V rows of keys [n0, min(n0 + BLOCK_N, n_end)) but ``new_pos`` (zeros there
    and past the end): written by earlier steps, never by this step's kernels."""
    n = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    cached = (n < n_end) & (n != new_pos)
    base = (tl.load(block_off + blk_start + n // BS, mask=cached, other=0) + layer_off
            + (n % BS) * (HKV * D) + kvh * D)
    kv_mask = cached[:, None] & (d < D)[None, :]
    k = tl.load(anchor + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(anchor + kv_off + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _decode_tile(n0, n_end, new_pos, q, k_new, v_new, m_i, l_i, acc, anchor, layer_off, kv_off, block_off,
                 blk_start, kvh, scale, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 BS: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    """Keys [n0, min(n0 + BLOCK_N, n_end)) of a decode row into its running (max, sum, output);
    key ``new_pos`` from registers (k_new/v_new, in the cache's dtype), the others from the cache."""
    k, v = _cached_kv(n0, n_end, new_pos, anchor, layer_off, kv_off, block_off, blk_start, kvh, HKV, D, BLOCK_D,
                      BS, BLOCK_N)
    return _attend_kv(n0, n_end, new_pos, q, k, v, k_new, v_new, m_i, l_i, acc, scale, BLOCK_N, DOT_PRECISION,
                      SOFTCAP)


@triton.jit
def _attend_kv(n0, n_end, new_pos, q, k, v, k_new, v_new, m_i, l_i, acc, scale, BLOCK_N: tl.constexpr,
               DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    """_decode_tile on the tile's cached rows already loaded (_cached_kv)."""
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < n_end
    is_new = n == new_pos
    k = tl.where(is_new[:, None], k_new[None, :], k)
    v = tl.where(is_new[:, None], v_new[None, :], v)
    scores = _capped(tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale, SOFTCAP)
    scores = tl.where(n_ok[None, :], scores, float("-inf"))
    return _softmax_update(scores, v, m_i, l_i, acc, DOT_PRECISION)


@triton.jit
def _decode_chunk(n_lo, n_hi, new_pos, q, k_new, v_new, anchor, layer_off, kv_off, block_off, blk_start, kvh,
                  scale, k_first, v_first, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, FIRST_LOADED: tl.constexpr, SOFTCAP: tl.constexpr):
    """(max, sum, unnormalised output) of keys [n_lo, n_hi), from a fresh state (max in log2 units).
    FIRST_LOADED: the first tile's cached rows are k_first / v_first (_cached_kv of n_lo, n_hi)."""
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start = n_lo
    if FIRST_LOADED:
        if n_lo < n_hi:
            m_i, l_i, acc = _attend_kv(n_lo, n_hi, new_pos, q, k_first, v_first, k_new, v_new, m_i, l_i, acc, scale,
                                       BLOCK_N, DOT_PRECISION, SOFTCAP)
        start = n_lo + BLOCK_N
    if INTERPRET:  # the interpreter cannot take tensor bounds in range()
        n0 = start
        while n0 < n_hi:
            m_i, l_i, acc = _decode_tile(n0, n_hi, new_pos, q, k_new, v_new, m_i, l_i, acc, anchor, layer_off,
                                         kv_off, block_off, blk_start, kvh, scale, HKV, D, BLOCK_D, BS, BLOCK_N,
                                         DOT_PRECISION, SOFTCAP)
            n0 += BLOCK_N
    else:
        for n0 in range(start, n_hi, BLOCK_N):
            m_i, l_i, acc = _decode_tile(n0, n_hi, new_pos, q, k_new, v_new, m_i, l_i, acc, anchor, layer_off,
                                         kv_off, block_off, blk_start, kvh, scale, HKV, D, BLOCK_D, BS, BLOCK_N,
                                         DOT_PRECISION, SOFTCAP)
    return m_i, l_i, acc


@triton.jit
def _combine_chunks(part_m, part_l, part_acc, row0, n_chunks, O, o_off, o_stride_h, head_sinks, G: tl.constexpr,
                    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr,
                    HAS_SINKS: tl.constexpr):
    """O[head kvh * G + g] = sum_c 2^(m_c - M) acc_c / sum_c 2^(m_c - M) l_c over the partials of
    scratch rows [row0, row0 + n_chunks) (M = max_c m_c; m in log2 units), merged one chunk at a
    time in chunk order: the bits depend on n_chunks and the partials alone, the cost on n_chunks.
    Loads skip L1 (.cg): other programs wrote these rows during this launch, and L1 is not coherent.
    head_sinks: the G heads' sinks (HAS_SINKS), counted once, in the merged sum."""
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    gd_ok = g_ok[:, None] & (d < D)[None, :]
    m_run = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_run = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    if INTERPRET:  # the interpreter cannot take tensor bounds in range()
        c = 0
        while c < n_chunks:
            m_run, l_run, acc = _combine_one(part_m, part_l, part_acc, (row0 + c) * G + g, g_ok, gd_ok, d, m_run,
                                             l_run, acc, D)
            c += 1
    else:
        for c in range(0, n_chunks):
            m_run, l_run, acc = _combine_one(part_m, part_l, part_acc, (row0 + c) * G + g, g_ok, gd_ok, d, m_run,
                                             l_run, acc, D)
    out = _normalized(acc, m_run, l_run, head_sinks, g, g_ok, HAS_SINKS)
    tl.store(O + o_off + g[:, None] * o_stride_h + d[None, :], out.to(O.dtype.element_ty), mask=gd_ok)


@triton.jit
def _combine_one(part_m, part_l, part_acc, rows, g_ok, gd_ok, d, m_run, l_run, acc, D: tl.constexpr):
    """One chunk's partial (scratch rows ``rows``, one per query head) into the running merge."""
    m_c = tl.load(part_m + rows, mask=g_ok, other=-1.0e30, cache_modifier=".cg")
    l_c = tl.load(part_l + rows, mask=g_ok, other=0.0, cache_modifier=".cg")
    acc_c = tl.load(part_acc + rows[:, None] * D + d[None, :], mask=gd_ok, other=0.0, cache_modifier=".cg")
    m_new = tl.maximum(m_run, m_c)
    a = tl.exp2(m_run - m_new)
    b = tl.exp2(m_c - m_new)
    return m_new, l_run * a + l_c * b, acc * a[:, None] + acc_c * b[:, None]


@triton.jit
def paged_decode_kernel(
    Q, q_stride_t, q_stride_h, K, k_stride_t, k_stride_h, V, v_stride_t, v_stride_h,
    O, o_stride_t, o_stride_h, anchor, layer_off, kv_off, block_off, dec_seq, seq_q_start, seq_ctx_len,
    seq_blk_start, slot_off, n_real, part_m, part_l, part_acc, arrivals, scale, window, max_chunks, sinks,
    G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_KEYS: tl.constexpr, BLOCK_G: tl.constexpr,
    USE_WINDOW: tl.constexpr, WRITE_KV: tl.constexpr, COMBINE_LAST: tl.constexpr, ALL_DECODE: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = False,
    PREFETCH_LINES: tl.constexpr = 0, PRELOAD: tl.constexpr = False, SOFTCAP: tl.constexpr = 0.0,
    HAS_SINKS: tl.constexpr = False,
):
    """Program (i, kvh, j) of a (rows, HKV, SPLITS) grid: decode row i (ALL_DECODE: sequence i,
    token i; else sequence dec_seq[i], token seq_q_start[s]), the G query heads of KV head kvh,
    chunks j, j + SPLITS, ... of the row (programs past its chunks do nothing). PDL (launched with
    programmatic dependent launch, engine.fused_decode): the next kernel may launch at once (its
    weights load meanwhile); this one waits for the previous kernel's writes before reading. With
    PREFETCH_LINES (> 0: 128-byte lines per cached key row), it first asks L2 for its first chunk's
    cached K/V, which earlier steps wrote, not the kernels it waits for. The step's metadata (block
    tables, context lengths: uploaded before the step's first kernel) is read before that wait;
    with PRELOAD so is the first tile of the program's first chunk (its cached K/V rows, into
    registers): under PDL those loads overlap the kernel before (the q|k|v projection), and what
    is left after the wait is q, this step's k/v and the arithmetic. The same tiles in the same
    order either way: the output's bits do not depend on PRELOAD or PDL."""
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    j = tl.program_id(2)
    splits = tl.num_programs(2)
    if PDL:
        gdc_launch_dependents()
        if PREFETCH_LINES > 0:
            _prefetch_chunk(i, kvh, j, anchor, layer_off, kv_off, block_off, dec_seq, seq_ctx_len, seq_blk_start,
                            window, HKV, D, BS, CHUNK_KEYS, USE_WINDOW, ALL_DECODE, PREFETCH_LINES)
    if ALL_DECODE:  # a decode-only step: one round of independent loads
        s = i
        t = i
    else:
        s = tl.load(dec_seq + i)
        t = tl.load(seq_q_start + s)
    ctx = tl.load(seq_ctx_len + s)
    lo, n_chunks = _decode_chunking(ctx, window, CHUNK_KEYS, USE_WINDOW)
    blk_start = tl.load(seq_blk_start + s)
    first = lo + j * CHUNK_KEYS  # this program's first chunk: c = j (one chunk: [lo, ctx))
    k_first = ctx  # stand-ins, unread without PRELOAD
    v_first = ctx
    if PRELOAD:
        k_first, v_first = _cached_kv(first, tl.minimum(first + CHUNK_KEYS, ctx), ctx - 1, anchor, layer_off, kv_off,
                                      block_off, blk_start, kvh, HKV, D, BLOCK_D, BS, BLOCK_N)
    if PDL:
        gdc_wait()
    if j < tl.maximum(n_chunks, 1):  # program 0 always runs: it writes K/V and one-chunk outputs
        r = tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        row_ok = r < G
        d_ok = d < D
        o_off = t * o_stride_t + kvh * G * o_stride_h
        o_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + t * q_stride_t + (kvh * G + r)[:, None] * q_stride_h + d[None, :],
                    mask=o_mask, other=0.0)
        # the cache's values (what later steps read), attended in q's precision like cached keys
        k_new = tl.load(K + t * k_stride_t + kvh * k_stride_h + d, mask=d_ok, other=0.0).to(anchor.dtype.element_ty)
        v_new = tl.load(V + t * v_stride_t + kvh * v_stride_h + d, mask=d_ok, other=0.0).to(anchor.dtype.element_ty)
        if WRITE_KV:  # rows t >= n_real pad a captured graph's batch: they write nothing
            write = (j == 0) & (t < tl.load(n_real))
            dst = anchor + tl.load(slot_off + t, mask=write, other=0) + layer_off + kvh * D + d
            tl.store(dst, k_new, mask=d_ok & write)
            tl.store(dst + kv_off, v_new, mask=d_ok & write)
        scale = scale * 1.4426950408889634  # log2 e: exp2 below
        if n_chunks <= 1:  # the whole context (none: a padding row, zeros) straight to the output
            m_i, l_i, acc = _decode_chunk(lo, ctx, ctx - 1, q, k_new, v_new, anchor, layer_off, kv_off, block_off,
                                          blk_start, kvh, scale, k_first, v_first, HKV, D, BLOCK_D, BS, BLOCK_M,
                                          BLOCK_N, INTERPRET, DOT_PRECISION, PRELOAD, SOFTCAP)
            out = _normalized(acc, m_i, l_i, sinks, kvh * G + r, row_ok, HAS_SINKS)
            tl.store(O + o_off + r[:, None] * o_stride_h + d[None, :], out.to(O.dtype.element_ty), mask=o_mask)
        else:
            row0 = (i * HKV + kvh) * max_chunks  # scratch rows of this (row, KV head), one per chunk
            # chunk j (< n_chunks here) first: its first tile may be loaded already
            _decode_partial(j, lo, ctx, row0, q, k_new, v_new, anchor, layer_off, kv_off, block_off, blk_start, kvh,
                            scale, part_m, part_l, part_acc, r, d, row_ok, o_mask, k_first, v_first, G, HKV, D,
                            BLOCK_D, BS, BLOCK_M, BLOCK_N, CHUNK_KEYS, INTERPRET, DOT_PRECISION, PRELOAD, SOFTCAP)
            if INTERPRET:  # the interpreter cannot take tensor bounds in range()
                c = j + splits
                while c < n_chunks:
                    _decode_partial(c, lo, ctx, row0, q, k_new, v_new, anchor, layer_off, kv_off, block_off,
                                    blk_start, kvh, scale, part_m, part_l, part_acc, r, d, row_ok, o_mask, ctx, ctx,
                                    G, HKV, D, BLOCK_D, BS, BLOCK_M, BLOCK_N, CHUNK_KEYS, INTERPRET, DOT_PRECISION,
                                    False, SOFTCAP)
                    c += splits
            else:
                for c in range(j + splits, n_chunks, splits):
                    _decode_partial(c, lo, ctx, row0, q, k_new, v_new, anchor, layer_off, kv_off, block_off,
                                    blk_start, kvh, scale, part_m, part_l, part_acc, r, d, row_ok, o_mask, ctx, ctx,
                                    G, HKV, D, BLOCK_D, BS, BLOCK_M, BLOCK_N, CHUNK_KEYS, INTERPRET, DOT_PRECISION,
                                    False, SOFTCAP)
            if COMBINE_LAST:
                tl.debug_barrier()  # all threads' partial stores precede the merge / the release below
                parts = tl.minimum(splits, n_chunks)  # programs holding chunks: j < parts
                if parts == 1:  # this program wrote every partial
                    _combine_chunks(part_m, part_l, part_acc, row0, n_chunks, O, o_off, o_stride_h, sinks + kvh * G,
                                    G, D, BLOCK_G, BLOCK_D, INTERPRET, HAS_SINKS)
                else:
                    count = tl.atomic_add(arrivals + i * HKV + kvh, 1, sem="acq_rel", scope="gpu")
                    if count == parts - 1:  # the others have released their partials: merge, reset
                        tl.store(arrivals + i * HKV + kvh, 0)
                        _combine_chunks(part_m, part_l, part_acc, row0, n_chunks, O, o_off, o_stride_h,
                                        sinks + kvh * G, G, D, BLOCK_G, BLOCK_D, INTERPRET, HAS_SINKS)


_L2_PREFETCH = tl.constexpr("{ .reg .pred p; setp.ne.u32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }")


@triton.jit
def _prefetch_chunk(i, kvh, j, anchor, layer_off, kv_off, block_off, dec_seq, seq_ctx_len, seq_blk_start, window,
                    HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, CHUNK_KEYS: tl.constexpr,
                    USE_WINDOW: tl.constexpr, ALL_DECODE: tl.constexpr, LINES: tl.constexpr):
    """L2 prefetch of the cached K and V rows of chunk j of decode row i, KV head kvh (the new key,
    the last position, is not in the cache yet)."""
    if ALL_DECODE:
        s = i
    else:
        s = tl.load(dec_seq + i)
    ctx = tl.load(seq_ctx_len + s)
    lo, n_chunks = _decode_chunking(ctx, window, CHUNK_KEYS, USE_WINDOW)
    n = lo + j * CHUNK_KEYS + tl.arange(0, CHUNK_KEYS)
    live = (j < n_chunks) & (n < ctx - 1)
    base = (tl.load(block_off + tl.load(seq_blk_start + s) + n // BS, mask=live, other=0) + layer_off
            + (n % BS) * (HKV * D) + kvh * D)
    lines = tl.arange(0, LINES) * (1024 // anchor.dtype.element_ty.primitive_bitwidth)  # elements a 128-byte line
    at = anchor + base[:, None] + lines[None, :]
    on = tl.broadcast_to(live[:, None], at.shape).to(tl.int32)
    k = tl.inline_asm_elementwise(_L2_PREFETCH, "=r,l,r", [at, on], dtype=tl.int32, is_pure=False, pack=1)
    v = tl.inline_asm_elementwise(_L2_PREFETCH, "=r,l,r", [at + kv_off, on], dtype=tl.int32, is_pure=False, pack=1)
    return tl.sum(k + v)


@triton.jit
def _decode_partial(c, lo, ctx, row0, q, k_new, v_new, anchor, layer_off, kv_off, block_off, blk_start, kvh, scale,
                    part_m, part_l, part_acc, r, d, row_ok, o_mask, k_first, v_first, G: tl.constexpr,
                    HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_KEYS: tl.constexpr,
                    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr, FIRST_LOADED: tl.constexpr,
                    SOFTCAP: tl.constexpr):
    """Chunk c of a decode row into its scratch row row0 + c (FIRST_LOADED: see _decode_chunk)."""
    n_lo = lo + c * CHUNK_KEYS
    m_i, l_i, acc = _decode_chunk(n_lo, tl.minimum(n_lo + CHUNK_KEYS, ctx), ctx - 1, q, k_new, v_new, anchor,
                                  layer_off, kv_off, block_off, blk_start, kvh, scale, k_first, v_first, HKV, D,
                                  BLOCK_D, BS, BLOCK_M, BLOCK_N, INTERPRET, DOT_PRECISION, FIRST_LOADED, SOFTCAP)
    mine = (row0 + c) * G + r
    tl.store(part_m + mine, m_i, mask=row_ok)
    tl.store(part_l + mine, l_i, mask=row_ok)
    tl.store(part_acc + mine[:, None] * D + d[None, :], acc, mask=o_mask)


@triton.jit
def decode_combine_kernel(part_m, part_l, part_acc, O, o_stride_t, o_stride_h, dec_seq, seq_q_start, seq_ctx_len,
                          window, max_chunks, sinks, G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                          CHUNK_KEYS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                          USE_WINDOW: tl.constexpr, ALL_DECODE: tl.constexpr, INTERPRET: tl.constexpr,
                          HAS_SINKS: tl.constexpr = False):
    """paged_decode_kernel's merge as its own launch (grid: decode rows x KV heads); one-chunk rows
    were stored by paged_decode_kernel."""
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    if ALL_DECODE:
        s = i
        t = i
    else:
        s = tl.load(dec_seq + i)
        t = tl.load(seq_q_start + s)
    _, n_chunks = _decode_chunking(tl.load(seq_ctx_len + s), window, CHUNK_KEYS, USE_WINDOW)
    if n_chunks > 1:
        _combine_chunks(part_m, part_l, part_acc, (i * HKV + kvh) * max_chunks, n_chunks, O,
                        t * o_stride_t + kvh * G * o_stride_h, o_stride_h, sinks + kvh * G, G, D, BLOCK_G, BLOCK_D,
                        INTERPRET, HAS_SINKS)
