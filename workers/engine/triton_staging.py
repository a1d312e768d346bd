"""The host side of a TritonPagedAttention step: stage every integer the GPU needs into the
pinned buffer of step_metadata.py and upload it (one copy), and plan the step's kernel launches.
A mixin of TritonPagedAttention (triton_attention.py), which owns the state it reads: the KV
cache's segments and their offsets from the anchor, the step metadata, the decode knobs."""

from __future__ import annotations

from itertools import chain
from typing import NamedTuple

import numpy as np

from workers.engine.attention import SeqSlice

MAX_SEGMENTS = 4096  # capacity of the segment offset table
DECODE_KERNELS = ("split", "general")
DECODE_COMBINES = ("last", "kernel")


class DecodeLaunch(NamedTuple):
    """A step's paged_decode_kernel launch, fixed by prepare() (knobs changed later wait for the next step)."""

    rows: int  # decode rows (programs along the grid's first axis)
    all_decode: bool  # every row of the step is one (row i = sequence i = token i); else dec_seq maps them
    splits: int  # programs per (row, KV head); they stride over the row's chunks
    chunk_keys: int
    max_chunks: int  # scratch rows per (row, KV head): ceil(max_model_len / chunk_keys)
    merge_last: bool
    fuse_write: bool
    block_n: int
    warps: int
    stages: int | None


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class StepStaging:
    def _sync_segments(self) -> None:
        """Recompute the segments' offsets from the anchor when segments changed (host only)."""
        kv = self.kv_cache
        if kv.epoch == self._epoch:
            return
        if kv.segments and max(kv.segments) >= MAX_SEGMENTS:
            raise RuntimeError(f"segment index {max(kv.segments)} >= {MAX_SEGMENTS}: raise MAX_SEGMENTS")
        esize = self.anchor.element_size()
        self.seg_off[:] = 0
        for index, seg in kv.segments.items():
            delta = seg.data_ptr() - self.anchor.data_ptr()
            if delta % esize:
                raise RuntimeError("KV segment is not element-aligned with the anchor tensor")
            self.seg_off[index] = delta // esize
        self._epoch = kv.epoch

    def prepare(self, seqs: list[SeqSlice], input_ids: list[int], positions: list[int],
                logits_indices: list[int] | None = None, pad_to: int | None = None):
        """Stage and upload the step; returns device (ids [1, T], positions [1, T], keep [n]).
        pad_to: decode-only graph steps, padded with empty one-token sequences up to this many."""
        self._sync_segments()
        m, bs = self.meta, self.bs
        m.begin()
        T, S = len(input_ids), len(seqs)
        n_pad = T if pad_to is None else pad_to
        S_pad = S if pad_to is None else S + (pad_to - T)
        if n_pad > m.T or S_pad > m.S:
            raise ValueError(f"step of {n_pad} tokens / {S_pad} sequences exceeds the backend's capacity")
        if self.decode_kernel not in DECODE_KERNELS or self.decode_combine not in DECODE_COMBINES:
            raise ValueError(f"decode_kernel {self.decode_kernel!r} / decode_combine {self.decode_combine!r}: "
                             f"want one of {DECODE_KERNELS} / {DECODE_COMBINES}")
        # the SeqSlices' columns (they are tuples), transposed in one call
        q_starts, q_lens, ctx_lens, block_ids, prompts = zip(*seqs) if S else ((), (), (), (), ())
        if (self.decode_staging and S == T and self.decode_kernel == "split" and q_lens.count(1) == S
                and not any(prompts) and q_starts == tuple(range(S))):
            return self._prepare_decode(ctx_lens, block_ids, input_ids, positions, logits_indices, S_pad)
        # per sequence, vectorised: [0, S) real | [S, S_pad) padding (no context, write nothing)
        q_start, q_len, ctx, blk_start = (m.host_view(n)[:S_pad] for n in ("q_start", "q_len", "ctx", "blk_start"))
        q_start[:S] = q_starts
        q_len[:S] = q_lens
        ctx[:S] = ctx_lens
        block_off, nb = self._stage_blocks(ctx[:S], blk_start[:S], block_ids)
        if S_pad > S:
            q_start[S:] = np.arange(T, n_pad)
            q_len[S:], ctx[S:], blk_start[S:] = 1, 0, 0
        # per token
        ids, pos, slot = m.host_view("ids")[:n_pad], m.host_view("pos")[:n_pad], m.host_i64("slot_off")[:n_pad]
        ids[:T] = input_ids
        pos[:T] = positions
        one_token = q_len[:S] == 1
        all_one_token = bool(one_token.all())
        # token t's sequence's first block: with one token per sequence, token i is sequence i's
        tok_blk_start = blk_start[:S] if all_one_token else blk_start[np.repeat(np.arange(S), q_len[:S])]
        p = pos[:T]
        slot[:T] = block_off[tok_blk_start + p // bs] + (p % bs) * (self.H * self.D)
        if n_pad > T:
            ids[T:], pos[T:], slot[T:] = 0, 0, 0
        m.host_view("n_real")[0] = T  # rows [T, n_pad) are padding: no KV write
        # decode rows (split): one token, not a prompt token; padding rows too when every real row
        # is one (a decode-only graph step). The general kernel takes every other sequence.
        is_dec = np.zeros(S_pad, dtype=bool)
        self.step_decode = None
        if self.decode_kernel == "split":
            is_dec[:S] = one_token & ~np.array(prompts, dtype=bool)
            all_dec = bool(is_dec[:S].all())
            is_dec[S:] = all_dec
            n_dec = int(is_dec.sum())
            if n_dec:
                if all_dec and not np.array_equal(q_start[:S_pad], np.arange(S_pad)):
                    raise ValueError("a decode step's sequences must be packed in order, one token each")
                m.host_view("dec_seq")[:n_dec] = np.flatnonzero(is_dec)
                longest = int(ctx[:S_pad][is_dec].max())
                if longest > self.max_model_len:  # its chunks would spill into the next row's scratch
                    raise ValueError(f"a decode row of {longest} keys: over max_model_len {self.max_model_len}")
                self._plan_decode(n_dec, all_dec)
        # query blocks of the general kernel: ceil(q_len / block_q) per other sequence
        rest = ~is_dec
        if not rest.any():  # every row is a decode row: no query blocks
            self.block_q, nq = 1, 0
        else:
            self.block_q = bq = (1 if int(q_len[rest].max(initial=1)) == 1
                                 else max(1, self.prefill_rows // _pow2(self.group)))
            per_seq = np.where(rest, (q_len + (bq - 1)) // bq, 0)
            nq = int(per_seq.sum())
            qb_seq = np.repeat(np.arange(S_pad), per_seq)
            first_qb = np.cumsum(per_seq) - per_seq
            m.host_view("qb_seq")[:nq] = qb_seq
            m.host_view("qb_start")[:nq] = q_start[qb_seq] + (np.arange(nq) - first_qb[qb_seq]) * bq
        return self._upload(nb, nq, n_pad, logits_indices)

    def _prepare_decode(self, ctx_lens, block_ids, input_ids, positions, logits_indices, S_pad: int):
        """prepare() of a decode-only step (sequence i = token i, one non-prompt token each, split
        kernel): the same metadata as the general staging, in fewer array operations."""
        m, bs, S = self.meta, self.bs, len(ctx_lens)
        longest = max(ctx_lens, default=0)  # no real row: an all-padding step (graph capture, warm-up)
        if longest > self.max_model_len:  # its chunks would spill into the next row's scratch
            raise ValueError(f"a decode row of {longest} keys: over max_model_len {self.max_model_len}")
        rows = self._arange[:S_pad]
        m.host_view("q_start")[:S_pad] = rows
        m.host_view("q_len")[:S_pad] = 1
        m.host_view("dec_seq")[:S_pad] = rows  # every row, padding too, is a decode row
        ctx, blk_start = m.host_view("ctx")[:S_pad], m.host_view("blk_start")[:S_pad]
        ctx[:S] = ctx_lens
        ctx[S:], blk_start[S:] = 0, 0
        block_off, nb = self._stage_blocks(ctx[:S], blk_start[:S], block_ids)
        ids, pos, slot = m.host_view("ids")[:S_pad], m.host_view("pos")[:S_pad], m.host_i64("slot_off")[:S_pad]
        ids[:S] = input_ids
        pos[:S] = positions
        p = pos[:S]
        slot[:S] = block_off[blk_start[:S] + p // bs] + (p % bs) * (self.H * self.D)
        ids[S:], pos[S:], slot[S:] = 0, 0, 0
        m.host_view("n_real")[0] = S
        self._plan_decode(S_pad, True)
        self.block_q = 1
        return self._upload(nb, 0, S_pad, logits_indices)

    def _stage_blocks(self, ctx: np.ndarray, blk_start: np.ndarray, block_ids: tuple) -> tuple[np.ndarray, int]:
        """Each real sequence's first block row (blk_start, written) and the step's block offsets
        from the anchor: (block_off [nb] int64, nb). ctx: the sequences' context lengths."""
        m, bs = self.meta, self.bs
        nblk = (ctx + (bs - 1)) // bs
        nb = int(nblk.sum())
        if nb > m.max_blocks:
            raise ValueError("step's block ids exceed the backend's capacity (max_model_len)")
        blk_start[:] = np.cumsum(nblk) - nblk
        if np.array_equal(np.fromiter(map(len, block_ids), np.int64, len(block_ids)), nblk):
            # every sequence holds exactly its context's blocks (the engine's steps): one flat copy
            ids_ = np.fromiter(chain.from_iterable(block_ids), np.int64, nb)
        else:
            ids_ = np.fromiter((b for blocks, k in zip(block_ids, nblk.tolist()) for b in blocks[:k]), np.int64, nb)
        block_off = m.host_i64("blocks")[:nb]
        block_off[:] = self.seg_off[ids_ // self.bps] + (ids_ % self.bps) * self.block_elems
        return block_off, nb

    def _plan_decode(self, n_dec: int, all_dec: bool) -> None:
        """The step's paged_decode_kernel launch over n_dec decode rows (dec_seq staged)."""
        self.step_splits = self.splits_for(n_dec)
        self._ensure_scratch(n_dec * self.H * self.max_chunks())
        # one program per (row, KV head) holds every chunk: it merges them itself
        merge_last = self.decode_combine == "last" or self.step_splits == 1
        self.step_decode = DecodeLaunch(n_dec, all_dec, self.step_splits, int(self.decode_chunk_keys),
                                        self.max_chunks(), merge_last, all_dec and bool(self.decode_fuse_write),
                                        int(self.decode_split_block_n), int(self.decode_warps), self.decode_stages)
        self.num_split_steps += 1

    def _upload(self, nb: int, nq: int, n_pad: int, logits_indices: list[int] | None):
        """Stage the logits rows, send the step's metadata; the device (ids [1, T], pos [1, T], keep)."""
        m = self.meta
        n_keep = 0
        if logits_indices is not None:
            n_keep = len(logits_indices)
            m.host_view("keep")[:n_keep] = logits_indices
        m.upload(nb)
        self.num_qblocks, self.num_tokens = nq, n_pad
        views = self._dev_views.get((n_pad, n_keep))
        if views is None:  # views of the fixed device buffer: valid for the backend's life
            if len(self._dev_views) > 1024:
                self._dev_views.clear()
            views = self._dev_views[n_pad, n_keep] = (m.dev_view("ids", n_pad)[None], m.dev_view("pos", n_pad)[None],
                                                      m.dev_view("keep", n_keep))
        return views

    # -- per layer -------------------------------------------------------------------------------
