"""The fast attention backend (CUDA; also runs on CPU tensors under TRITON_INTERPRET=1 for tests).

Per step, every integer the GPU needs is packed on the host and sent with one asynchronous copy
(step_metadata.py has the layout). KV addresses are element offsets from an anchor tensor,
computed on the host from each segment's address (kv_cache.py may hold several segments):
block_off[j] is where block j of the step starts in layer 0's K; slot_off[t] where token t's K/V
go. Offsets may be negative (segments can lie below the anchor). A kernel adds the layer's and V's
fixed strides, so KV can live in any segment and nothing on the device needs rewriting when
segments come and go.
"""

from __future__ import annotations

import os
import weakref
from itertools import chain
from typing import NamedTuple

import numpy as np
import torch

from workers.engine.attention import AttentionBackend, SeqSlice
from workers.engine.cuda_graphs import capture_sizes
from workers.engine.kv_cache import KVCache
from workers.engine.step_metadata import StepMetadata

try:
    import triton

    from workers.engine.triton_kernels import (decode_combine_kernel, paged_attention_kernel, paged_decode_kernel,
                                               write_kv_kernel)
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "attention_backend 'triton' needs the triton package (pip install triton; it ships with CUDA "
        "builds of torch); or set engine.attention_backend: torch") from e

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_SEGMENTS = 4096  # capacity of the segment offset table
MAX_DECODE_SPLITS = 64  # split-KV decode: most programs per (decode row, KV head)
# split decode partials of max_num_seqs rows at most this big (checked when split is chosen): also
# keeps the kernels' int32 element offsets into them in range
MAX_DECODE_SCRATCH_BYTES = 2 << 30
DECODE_KERNELS = ("split", "general")
DEFAULT_DECODE_KERNEL = "split"  # a new backend's decode_kernel (see __init__); checks set it before engines capture
# a new backend's (decode_chunk_keys, decode_split_block_n); checks shrink them before engines
# capture, so that short test prompts span several chunks
DEFAULT_DECODE_CHUNKING = (256, 128)
DECODE_COMBINES = ("last", "kernel")


_BACKENDS: "weakref.WeakValueDictionary[int, TritonPagedAttention]" = weakref.WeakValueDictionary()


@torch.library.custom_op("pdserve::paged_attention", mutates_args=())
def _paged_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend_id: int, layer: int,
                        scaling: float, window: int) -> torch.Tensor:
    """Writes this step's K/V into the paged cache and attends; the backend holds the step's metadata."""
    return _BACKENDS[backend_id]._forward(layer, q, k, v, scaling, window or None)


@_paged_attention_op.register_fake
def _(q, k, v, backend_id, layer, scaling, window):
    return q.new_empty((1, q.shape[2], q.shape[1], q.shape[3]))


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


class TritonPagedAttention(AttentionBackend):
    def __init__(self, kv_cache: KVCache, num_q_heads: int, max_num_batched_tokens: int = 512,
                 max_num_seqs: int = 64, max_model_len: int = 2048):
        super().__init__(kv_cache)
        layout = kv_cache.layout
        if num_q_heads % layout.num_kv_heads:
            raise ValueError(f"{num_q_heads} query heads are not a multiple of {layout.num_kv_heads} KV heads")
        self.group = num_q_heads // layout.num_kv_heads
        self.bs, self.bps = layout.block_size, layout.blocks_per_segment
        self.H, self.D = layout.num_kv_heads, layout.head_dim
        self.block_elems = self.bs * self.H * self.D
        self.kv_off = self.bps * self.block_elems
        self.layer_stride = 2 * self.kv_off
        device = kv_cache.device
        self.max_tokens = max(max_num_batched_tokens, max_num_seqs)
        self.max_seqs = max_num_seqs
        self.max_model_len = max_model_len
        blocks_per_seq = -(-max_model_len // self.bs)
        self.meta = StepMetadata(self.max_tokens, max_num_seqs, max_num_seqs * blocks_per_seq, device)
        self.anchor = torch.empty(1, dtype=layout.torch_dtype, device=device)  # lives as long as we do
        self.seg_off = np.zeros(MAX_SEGMENTS, dtype=np.int64)  # segment index -> element offset from anchor
        self._epoch = -1
        self.backend_id = id(self)
        _BACKENDS[self.backend_id] = self  # for the compiled op; weakly held: the engine owns us
        # prefill tiles: rows (query tokens x the group's heads) and keys per program, warps, stages
        # (None: Triton's default). Tunable per instance (benchmarks/profile_prefill.py --tiles).
        # H100, Llama-3.2-1B shape (head_dim 64), 2048-token prefill: 128x128x8x2 with the diagonal
        # split 2.38 ms of attention per step, 64x64x4 2.87 ms (unsplit: no tile beat 64x64x4);
        # wider heads keep 64x64x4 (128x128 tiles of them were not timed)
        tiles = (128, 128, 8, 2) if self.D <= 64 else (64, 64, 4, None)
        self.prefill_rows, self.prefill_block_n, self.prefill_warps, self.prefill_stages = tiles
        self.decode_block_n = 128  # decode: one long tile sweep per program (fewer dependent load rounds)
        # tiles below the causal diagonal without masks (FlashAttention's split): gpu_check.py's
        # kernels check on an H100 (both ways, relative error 1.9e-3) and 6-17 % faster there
        self.split_diagonal = True
        # decode rows (one new token that is not a prompt token, SeqSlice.prompt): "split" attends
        # them with paged_decode_kernel in every step, decode-only or beside prefill chunks (the
        # context cut into chunks of decode_chunk_keys keys, spread over several programs per (row,
        # KV head) when rows x KV heads leave SMs idle; in decode-only steps this step's K/V written
        # in the same launch); "general": paged_attention_kernel, as every other row. One kernel per
        # kind of row, whatever the step's composition, so a sequence's tokens do not depend on
        # what it was batched with (the general path has that property; with "split" chosen per
        # step, decodes beside prefill chunks took the general kernel and the others the split
        # one, whose bits differ: the same bf16 engine run twice, prefix hits the second time,
        # gave other tokens on an H100). The knobs are read at each step (a captured graph keeps
        # the launches it was captured with): swept by benchmarks/profile_decode.py
        # --decode-variants. "split" with 256-key chunks of 128-key tiles by default: on an H200
        # (Llama-3.2-1B shape, graph replay per decode step) it beat the general kernel at 128- and
        # 2048-token contexts for batch 1 and 8 (2048 tokens, batch 1: 1.18 vs 1.96 ms) and at 128
        # tokens for batch 32; it lost only at batch 32 x 2048 tokens (2.45 vs 2.30 ms). 64-key
        # tiles were slower than general everywhere but batch 1 x 2048 tokens (benchmarks/README.md,
        # "Split decode")
        self.decode_kernel = DEFAULT_DECODE_KERNEL
        self._graph_sizes = capture_sizes(max_num_seqs)
        self.decode_splits: int | None = None  # None: ~decode_programs programs in all (splits_for)
        # keys per chunk (a multiple of the tile): a row of n keys has ceil(n / decode_chunk_keys)
        # chunks, one program's serial work each; one chunk is attended like the general kernel
        # does (no partials, no merge). Fixed per backend, not per step: the chunking fixes the
        # output's bits. decode_split_block_n: keys per tile
        self.decode_chunk_keys, self.decode_split_block_n = DEFAULT_DECODE_CHUNKING
        self.decode_programs = (torch.cuda.get_device_properties(device).multi_processor_count
                                if device.type == "cuda" else 4)
        self.decode_warps = 4
        self.decode_stages: int | None = None  # software pipelining depth (None: Triton's default)
        self.decode_combine = "last"  # merge the splits in the last program to finish, or "kernel": a second launch
        self.decode_fuse_write = True  # False: write_kv_kernel writes the new K/V first
        self.block_q = 1
        self.num_qblocks = 0
        self.num_tokens = 0
        self.step_splits = 1
        self.step_decode: DecodeLaunch | None = None  # set: this step runs paged_decode_kernel
        self.num_split_steps = 0  # steps prepared with step_decode set (tests check the path ran)
        self.decode_staging = True  # decode-only steps staged by _prepare_decode (False: tests compare the two)
        self._arange = np.arange(max(self.max_tokens, max_num_seqs), dtype=np.int32)
        self._dev_views: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}  # (tokens, logits rows) -> prepare's outputs
        self._retired_scratch: list[tuple[torch.Tensor, ...]] = []
        self._scratch: tuple[torch.Tensor, ...] = ()  # allocated by the first split step's prepare
        if self.decode_kernel == "split":
            self.max_chunks()  # a config the split path cannot run fails here, not at the first decode

    # -- split-KV decode ---------------------------------------------------------------------------
    def max_chunks(self) -> int:
        """Most chunks a decode row can have, ceil(max_model_len / decode_chunk_keys): scratch rows
        per (row, KV head). Checks the chunking knobs and the scratch's size for max_num_seqs rows."""
        keys, block_n = int(self.decode_chunk_keys), int(self.decode_split_block_n)
        if block_n < 16 or block_n & (block_n - 1):
            raise ValueError(f"decode_split_block_n={block_n}: want a power of two >= 16")
        if keys < block_n or keys % block_n:
            raise ValueError(f"decode_chunk_keys={keys}: want a multiple of decode_split_block_n={block_n}")
        n = -(-self.max_model_len // keys)
        nbytes = self.max_seqs * self.H * n * self.group * (self.D + 2) * 4
        if nbytes > MAX_DECODE_SCRATCH_BYTES:
            raise ValueError(
                f"split decode partials need {nbytes / 2**30:.1f} GiB (max_num_seqs {self.max_seqs} x {self.H} KV "
                f"heads x {n} chunks of max_model_len {self.max_model_len}), over {MAX_DECODE_SCRATCH_BYTES >> 30} "
                f"GiB: raise decode_chunk_keys (now {keys}), lower max_model_len or max_num_seqs, or use "
                f"decode_kernel 'general'")
        return n

    def splits_for(self, num_rows: int) -> int:
        """Programs per (decode row, KV head) of a step of ``num_rows`` (padded) decode rows. Only
        speed depends on it: the chunks, and so the output's bits, do not. Fixed per graph size
        (a graph replays for any context up to max_model_len), so it cannot follow the step's
        contexts: ~decode_programs programs in all, at most one per chunk a row can have."""
        max_chunks = self.max_chunks()
        if self.decode_splits is not None:
            n = int(self.decode_splits)
            if not 1 <= n <= MAX_DECODE_SPLITS:
                raise ValueError(f"decode_splits={n}: want 1..{MAX_DECODE_SPLITS}")
            return min(n, max_chunks)
        # counted at the decode graph's padded size: a step and its graph replay launch alike
        bucket = next((b for b in self._graph_sizes if b >= num_rows), num_rows)
        return max(1, min(MAX_DECODE_SPLITS, max_chunks, self.decode_programs // max(1, bucket * self.H)))

    def _ensure_scratch(self, rows: int) -> None:
        """Partial (max, sum, output) rows, one per chunk of each (decode row, KV head); arrival
        counters per (decode row, KV head), zero between launches. Grows only outside graph capture
        (prepare runs before it); buffers it replaces stay alive, so graphs captured with them
        still replay."""
        if self._scratch and self._scratch[0].shape[0] >= rows:
            return
        device = self.anchor.device
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split decode scratch must grow before graph capture (call prepare first)")
        if self._scratch:
            self._retired_scratch.append(self._scratch)
        rows = max(rows, 1)
        f32 = dict(dtype=torch.float32, device=device)
        self._scratch = (torch.empty(rows, self.group, **f32), torch.empty(rows, self.group, **f32),
                         torch.empty(rows, self.group, self.D, **f32),
                         torch.zeros(rows, dtype=torch.int32, device=device))  # (rows >= counters)

    # -- per step --------------------------------------------------------------------------------
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
    def forward(self, layer, q, k, v, scaling, sliding_window):
        """q [1, Hq, T, D], k/v [1, Hkv, T, D] -> out [1, T, Hq, D]."""
        if torch.compiler.is_compiling():
            # under torch.compile the kernels are one opaque op (they touch the cache through raw
            # pointers, which the compiler cannot trace); outside it, a direct call is cheaper
            return torch.ops.pdserve.paged_attention(q, k, v, self.backend_id, layer, float(scaling),
                                                     int(sliding_window or 0))
        return self._forward(layer, q, k, v, scaling, sliding_window)

    def _forward(self, layer, q, k, v, scaling, sliding_window):
        m, T = self.meta, self.num_tokens
        q, k, v = q[0], k[0], v[0]  # [H, T, D]
        if q.stride(-1) != 1:
            q = q.contiguous()
        if k.stride(-1) != 1:
            k = k.contiguous()
        if v.stride(-1) != 1:
            v = v.contiguous()
        layer_off = layer * self.layer_stride
        block_h, block_d = _pow2(self.H), _pow2(self.D)
        decode, split = self.block_q == 1, self.step_decode
        fused_write = split is not None and split.fuse_write  # decode-only steps: the split kernel writes
        if not fused_write:
            write_kv_kernel[(T,)](
                k, v, k.stride(1), k.stride(0), v.stride(1), v.stride(0),
                self.anchor, m.dev_slot_off, m.dev_view("n_real"), layer_off, self.kv_off,
                H=self.H, D=self.D, BLOCK_H=block_h, BLOCK_D=block_d,
            )
            self._layer_written(layer)
        Hq, G = q.shape[0], self.group
        out = torch.empty((1, T, Hq, self.D), dtype=q.dtype, device=q.device)
        o = out[0]
        # fp32 models: exact fp32 products (not tf32), so fp32 output matches the torch reference
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        if split is not None:
            self._decode(split, layer_off, q, k, v, o, scaling, sliding_window, precision)
            if fused_write:
                self._layer_written(layer)
        if not self.num_qblocks:
            return out
        block_m = max(16, _pow2(self.block_q * G))
        launch = {} if decode else {"num_warps": self.prefill_warps}
        if not decode and self.prefill_stages is not None:
            launch["num_stages"] = self.prefill_stages
        paged_attention_kernel[(self.num_qblocks, self.H)](
            q, q.stride(1), q.stride(0), o, o.stride(0), o.stride(1),
            self.anchor, layer_off, self.kv_off,
            m.dev_block_off, m.dev_view("qb_seq"), m.dev_view("qb_start"), m.dev_view("q_start"),
            m.dev_view("q_len"), m.dev_view("ctx"), m.dev_view("blk_start"),
            float(scaling), int(sliding_window or 0),
            G=G, HKV=self.H, D=self.D, BLOCK_D=block_d, BS=self.bs,
            BLOCK_Q=self.block_q, BLOCK_M=block_m, BLOCK_N=self.decode_block_n if decode else self.prefill_block_n,
            USE_WINDOW=bool(sliding_window), INTERPRET=INTERPRET, SPLIT_DIAGONAL=self.split_diagonal,
            DOT_PRECISION=precision, **launch,
        )
        return out

    def _decode(self, launch: DecodeLaunch, layer_off, q, k, v, o, scaling, sliding_window, precision) -> None:
        """Split-KV attention of the step's decode rows (q, k, v [H, T, D]; o [T, Hq, D])."""
        m, G = self.meta, self.group
        part_m, part_l, part_acc, arrivals = self._scratch
        block_g, block_d = _pow2(G), _pow2(self.D)
        stages = {} if launch.stages is None else {"num_stages": int(launch.stages)}
        window = int(sliding_window or 0)
        paged_decode_kernel[(launch.rows, self.H, launch.splits)](
            q, q.stride(1), q.stride(0), k, k.stride(1), k.stride(0), v, v.stride(1), v.stride(0),
            o, o.stride(0), o.stride(1), self.anchor, layer_off, self.kv_off, m.dev_block_off,
            m.dev_view("dec_seq"), m.dev_view("q_start"), m.dev_view("ctx"), m.dev_view("blk_start"),
            m.dev_slot_off, m.dev_view("n_real"), part_m, part_l, part_acc, arrivals, float(scaling), window,
            launch.max_chunks, G=G, HKV=self.H, D=self.D, BLOCK_D=block_d, BS=self.bs, BLOCK_M=max(16, block_g),
            BLOCK_N=launch.block_n, CHUNK_KEYS=launch.chunk_keys, BLOCK_G=block_g, USE_WINDOW=bool(sliding_window),
            WRITE_KV=launch.fuse_write, COMBINE_LAST=launch.merge_last, ALL_DECODE=launch.all_decode,
            INTERPRET=INTERPRET, DOT_PRECISION=precision, num_warps=launch.warps, **stages,
        )
        if not launch.merge_last:
            decode_combine_kernel[(launch.rows, self.H)](
                part_m, part_l, part_acc, o, o.stride(0), o.stride(1), m.dev_view("dec_seq"), m.dev_view("q_start"),
                m.dev_view("ctx"), window, launch.max_chunks, G=G, HKV=self.H, D=self.D,
                CHUNK_KEYS=launch.chunk_keys, BLOCK_G=block_g, BLOCK_D=block_d, USE_WINDOW=bool(sliding_window),
                ALL_DECODE=launch.all_decode, INTERPRET=INTERPRET, num_warps=launch.warps,
            )
