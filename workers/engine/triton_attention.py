"""The fast attention backend (CUDA; also runs on CPU tensors under TRITON_INTERPRET=1 for tests).

Per step, every integer the GPU needs is packed on the host and sent with one asynchronous copy
(step_metadata.py has the layout, triton_staging.py stages it). KV addresses are element offsets
from an anchor tensor, computed on the host from each segment's address (kv_cache.py may hold
several segments):
block_off[j] is where block j of the step starts in layer 0's K; slot_off[t] where token t's K/V
go. Offsets may be negative (segments can lie below the anchor). A kernel adds the layer's and V's
fixed strides, so KV can live in any segment and nothing on the device needs rewriting when
segments come and go.
"""

from __future__ import annotations

import os
import weakref

import numpy as np
import torch

from workers.engine.attention import AttentionBackend
from workers.engine.cuda_graphs import capture_sizes
from workers.engine.kv_cache import KVCache
from workers.engine.step_metadata import StepMetadata
from workers.engine.triton_staging import (DECODE_COMBINES, DECODE_KERNELS, MAX_SEGMENTS, DecodeLaunch,  # noqa: F401
                                           StepStaging, _pow2)

try:
    import triton  # noqa: F401 (here so that its absence gets the message below)

    from workers.engine.triton_decode_kernels import decode_combine_kernel, paged_decode_kernel
    from workers.engine.triton_kernels import paged_attention_kernel, write_kv_kernel
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "attention_backend 'triton' needs the triton package (pip install triton; it ships with CUDA "
        "builds of torch); or set engine.attention_backend: torch") from e

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_DECODE_SPLITS = 64  # split-KV decode: most programs per (decode row, KV head)
# split decode partials of max_num_seqs rows at most this big (checked when split is chosen): also
# keeps the kernels' int32 element offsets into them in range
MAX_DECODE_SCRATCH_BYTES = 2 << 30
DEFAULT_DECODE_KERNEL = "split"  # a new backend's decode_kernel (see __init__); checks set it before engines capture
# a new backend's (decode_chunk_keys, decode_split_block_n); checks shrink them before engines
# capture, so that short test prompts span several chunks
DEFAULT_DECODE_CHUNKING = (256, 128)


_BACKENDS: "weakref.WeakValueDictionary[int, TritonPagedAttention]" = weakref.WeakValueDictionary()


@torch.library.custom_op("pdserve::paged_attention", mutates_args=())
def _paged_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend_id: int, layer: int,
                        scaling: float, window: int, softcap: float, sinks: torch.Tensor | None) -> torch.Tensor:
    """Writes this step's K/V into the paged cache and attends; the backend holds the step's metadata."""
    return _BACKENDS[backend_id]._forward(layer, q, k, v, scaling, window or None, softcap or None, sinks)


@_paged_attention_op.register_fake
def _(q, k, v, backend_id, layer, scaling, window, softcap, sinks):
    return q.new_empty((1, q.shape[2], q.shape[1], q.shape[3]))


def _log2_cap(softcap: float | None) -> float:
    """Gemma 2's attention logit cap in the kernels' log2 units (they scale scores by log2 e for
    exp2; cap * tanh(s / cap) commutes with that scaling); 0.0: no cap (a kernel constant: the
    uncapped kernels compile as before)."""
    return float(softcap) * 1.4426950408889634 if softcap else 0.0


def _sinks_arg(sinks: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """The kernels' sinks pointer: gpt-oss's per-head sinks, else any tensor (HAS_SINKS off: unread)."""
    return stand_in if sinks is None else sinks


class TritonPagedAttention(StepStaging, AttentionBackend):
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
        self.decode_pdl = False  # set by engine.fused_decode around its calls: the split kernel under PDL
        # Load the first tile of each program's first chunk (cached K/V rows, earlier steps' writes)
        # before anything this step's kernels write: under PDL (the fused batch-1 step) before the
        # wait for q|k|v, so those loads overlap the projection; and under PDL ask L2 for the rest of
        # the first chunk too. The same bits either way (gpu_check kernels). One H200, Llama-1B
        # shape, ~240 keys, decode graph: batch 1 0.891 -> 0.859 ms (preload) -> 0.850 (+ prefetch);
        # batch 8 1.179 -> 1.163; batch 32 1.262 -> 1.258 (benchmarks/README.md)
        self.decode_preload = True
        self.decode_prefetch = True  # the L2 prefetch of the first chunk, under PDL only
        # Measured and removed (one H200, decode graph replay under the profiler, batch 1 / 8 / 32,
        # benchmarks/results/engine_gpu1_h200_r20_preload3.jsonl; as is: 1.0276 / 1.3407 / 1.6166 ms):
        # the second tile's block ids before the wait too, 1.0476 / 1.3531 / 1.6353 (slower at each);
        # the prefetch in every decode launch, not only under PDL, 1.026 / 1.3527 / 1.6363 (equal, slower)
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

    def forward(self, layer, q, k, v, scaling, sliding_window, softcap=None, sinks=None):
        """q [1, Hq, T, D], k/v [1, Hkv, T, D] -> out [1, T, Hq, D]."""
        if torch.compiler.is_compiling():
            # under torch.compile the kernels are one opaque op (they touch the cache through raw
            # pointers, which the compiler cannot trace); outside it, a direct call is cheaper
            return torch.ops.pdserve.paged_attention(q, k, v, self.backend_id, layer, float(scaling),
                                                     int(sliding_window or 0), float(softcap or 0.0), sinks)
        return self._forward(layer, q, k, v, scaling, sliding_window, softcap, sinks)

    def _forward(self, layer, q, k, v, scaling, sliding_window, softcap=None, sinks=None):
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
            self._decode(split, layer_off, q, k, v, o, scaling, sliding_window, precision, softcap, sinks)
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
            float(scaling), int(sliding_window or 0), _sinks_arg(sinks, q),
            G=G, HKV=self.H, D=self.D, BLOCK_D=block_d, BS=self.bs,
            BLOCK_Q=self.block_q, BLOCK_M=block_m, BLOCK_N=self.decode_block_n if decode else self.prefill_block_n,
            USE_WINDOW=bool(sliding_window), INTERPRET=INTERPRET, SPLIT_DIAGONAL=self.split_diagonal,
            DOT_PRECISION=precision, SOFTCAP=_log2_cap(softcap), HAS_SINKS=sinks is not None, **launch,
        )
        return out

    def _prefetch_lines(self, q) -> int:
        """128-byte lines per cached key row the decode kernel asks L2 for (0: no prefetch)."""
        if self.decode_prefetch and self.decode_pdl:
            return _pow2(-(-self.D * q.element_size() // 128))
        return 0

    def _decode(self, launch: DecodeLaunch, layer_off, q, k, v, o, scaling, sliding_window, precision,
                softcap=None, sinks=None) -> None:
        """Split-KV attention of the step's decode rows (q, k, v [H, T, D]; o [T, Hq, D])."""
        m, G = self.meta, self.group
        part_m, part_l, part_acc, arrivals = self._scratch
        block_g, block_d = _pow2(G), _pow2(self.D)
        stages = {} if launch.stages is None else {"num_stages": int(launch.stages)}
        if self.decode_pdl:
            stages["launch_pdl"] = True
        window = int(sliding_window or 0)
        paged_decode_kernel[(launch.rows, self.H, launch.splits)](
            q, q.stride(1), q.stride(0), k, k.stride(1), k.stride(0), v, v.stride(1), v.stride(0),
            o, o.stride(0), o.stride(1), self.anchor, layer_off, self.kv_off, m.dev_block_off,
            m.dev_view("dec_seq"), m.dev_view("q_start"), m.dev_view("ctx"), m.dev_view("blk_start"),
            m.dev_slot_off, m.dev_view("n_real"), part_m, part_l, part_acc, arrivals, float(scaling), window,
            launch.max_chunks, _sinks_arg(sinks, q), G=G, HKV=self.H, D=self.D, BLOCK_D=block_d, BS=self.bs,
            BLOCK_M=max(16, block_g),
            BLOCK_N=launch.block_n, CHUNK_KEYS=launch.chunk_keys, BLOCK_G=block_g, USE_WINDOW=bool(sliding_window),
            WRITE_KV=launch.fuse_write, COMBINE_LAST=launch.merge_last, ALL_DECODE=launch.all_decode,
            INTERPRET=INTERPRET, DOT_PRECISION=precision, PDL=self.decode_pdl,
            PREFETCH_LINES=self._prefetch_lines(q), PRELOAD=self.decode_preload, SOFTCAP=_log2_cap(softcap),
            HAS_SINKS=sinks is not None, num_warps=launch.warps, **stages,
        )
        if not launch.merge_last:
            decode_combine_kernel[(launch.rows, self.H)](
                part_m, part_l, part_acc, o, o.stride(0), o.stride(1), m.dev_view("dec_seq"), m.dev_view("q_start"),
                m.dev_view("ctx"), window, launch.max_chunks, _sinks_arg(sinks, q), G=G, HKV=self.H, D=self.D,
                CHUNK_KEYS=launch.chunk_keys, BLOCK_G=block_g, BLOCK_D=block_d, USE_WINDOW=bool(sliding_window),
                ALL_DECODE=launch.all_decode, INTERPRET=INTERPRET, HAS_SINKS=sinks is not None, num_warps=launch.warps,
            )
