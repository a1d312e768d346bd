"""Device copies of KV blocks between two sets of segments (a CUDA IPC READ: the peer's segments
mapped here -> ours; kv_transfer/cuda_ipc.py). Pure torch on whatever device the tensors live on,
so the CPU tests run the same code.

    SegmentViews.of(tensor, layout)      the views one segment is copied through, made once
    copy_runs(src, dst, ..., runs)       every run's blocks, all layers, K and V, on the current streams
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from kv_transfer.descriptors import RunTable, segment_mask
from kv_transfer.layout import KVLayout

try:  # ships with CUDA builds of torch; a CPU install copies with torch ops only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # triton reads it once, at import: so do we

# How copy_runs moves a READ (H100, one 2048-token Llama-3.2-1B-shaped request = 32 slices of 2 MiB,
# benchmarks/ipc_copy.py): a copy per slice 0.58 ms (launch-bound), one strided copy per run
# 0.077 ms (a local 64 MiB memcpy: 0.083 ms), gather + scatter 0.17 ms. Every launch also costs
# host time, which a synchronous READ pays in full: the fewest launches win below ~64 MiB.
MAX_SLICE_COPIES = 0  # up to this many (layer, kv, run) slices: one memcpy each (0: never; benchmarks compare)
MAX_STRIDED_RUNS = 16  # up to this many runs: one strided copy per run (all layers, K and V); more: gather/scatter
MAX_STRIDED_RUNS_KERNEL = 2  # the same where the block-table kernel can copy (CUDA + triton): it is one launch



def _word(block_bytes: int) -> tuple[torch.dtype, int]:
    return (torch.int64, 8) if block_bytes % 8 == 0 else (torch.uint8, 1)


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(-1).view(torch.uint8)


@dataclass(frozen=True)
class SegmentViews:
    """One segment as the views a READ copies through. Made once per segment (remote: per peer
    epoch, at open; ours: when the segment is added), never per READ: a view costs microseconds of
    Python, and a READ of many runs would otherwise make several per run.

        flat      uint8 [segment_bytes]
        rows      word  [2 * num_layers, blocks_per_segment * words_per_block]   row = (layer, kv)
        by_block  word  [blocks_per_segment, 2 * num_layers, words_per_block]    (the same bytes, strided)

    word is int64 when a block is a whole number of 8-byte words, else uint8."""
    flat: torch.Tensor
    rows: torch.Tensor
    by_block: torch.Tensor

    @classmethod
    def of(cls, tensor: torch.Tensor, layout: KVLayout) -> SegmentViews:
        flat = flat_bytes(tensor)
        word, w = _word(layout.block_bytes)
        rows = flat.view(word).view(2 * layout.num_layers, layout.blocks_per_segment * (layout.block_bytes // w))
        by_block = rows.view(2 * layout.num_layers, layout.blocks_per_segment, -1).permute(1, 0, 2)
        return cls(flat, rows, by_block)


class SegmentSet(Mapping[int, SegmentViews]):
    """One side's segments (index -> SegmentViews), made when they change (never per READ), with
    what the block-table kernel addresses them by: every segment's ``rows`` as a word offset from
    one anchor segment's (``base_words``; segments are separate allocations, so offsets may be
    negative), and whether they share one device and 16-byte alignment."""

    __slots__ = ("_views", "mask", "anchor", "base_words", "device", "aligned")

    def __init__(self, views: Mapping[int, SegmentViews]):
        self._views = dict(views)
        self.mask = segment_mask(self._views)
        self.base_words = np.zeros(len(self.mask), dtype=np.int64)
        first = next(iter(self._views.values()), None)
        self.anchor = None if first is None else first.rows
        devices = {v.rows.device for v in self._views.values()}
        self.device = devices.pop() if len(devices) == 1 else None  # None: none, or several devices
        self.aligned = True
        if self.anchor is not None:
            size, base = self.anchor.element_size(), self.anchor.data_ptr()
            for i, v in self._views.items():
                self.base_words[i], rest = divmod(v.rows.data_ptr() - base, size)
                self.aligned &= rest == 0 and v.rows.data_ptr() % 16 == 0

    @classmethod
    def of(cls, views: Mapping[int, SegmentViews]) -> SegmentSet:
        """``views`` as a SegmentSet (itself if it is one)."""
        return views if isinstance(views, SegmentSet) else cls(views)

    def __getitem__(self, index: int) -> SegmentViews:
        return self._views[index]

    def __iter__(self):
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    def __contains__(self, index) -> bool:
        return index in self._views


def copy_runs(src: Mapping[int, SegmentViews], dst: Mapping[int, SegmentViews], src_layout: KVLayout,
              dst_layout: KVLayout, runs: RunTable, max_slice_copies: int = MAX_SLICE_COPIES,
              max_strided_runs: int | None = None, kernel: bool | None = None) -> int:
    """Copy src block r.src_first + i -> dst block r.dst_first + i (all layers, K and V) for every
    run. ``src``/``dst`` map segment index -> that segment's views (a SegmentSet, or any mapping,
    made into one here). Returns the number of (layer, kv, run) slices. Asynchronous on the
    current streams of the tensors' devices; nothing is allocated on the device but index arrays
    (and, without the kernel, gather buffers of scattered ids).

    Launches: one strided copy per run (all its layers, K and V; torch makes it a memcpy when the
    run's rows are one range) up to max_strided_runs runs (default MAX_STRIDED_RUNS_KERNEL where
    the block-table kernel is used, else MAX_STRIDED_RUNS); more runs: the block-table kernel
    (``kernel``: None = where both sides are on one CUDA device and triton is installed), one
    index upload + one launch whatever the segments; or, without it, _gather_scatter: one upload
    and one or two torch calls per segment pair. Up to max_slice_copies slices: one memcpy per
    (layer, kv, run) slice instead (0 by default: benchmarks compare). Python work: O(runs) torch
    calls up to max_strided_runs, else a fixed number of numpy calls (+ O(segment pairs) torch
    calls without the kernel)."""
    num_runs = len(runs.count)
    num_slices = 2 * src_layout.num_layers * num_runs
    s_bps, d_bps = src_layout.blocks_per_segment, dst_layout.blocks_per_segment
    if num_slices <= max_slice_copies:  # few big slices: byte offsets by hand
        sb, db = src_layout.block_bytes, dst_layout.block_bytes
        for s_first, d_first, count in zip(runs.src_first.tolist(), runs.dst_first.tolist(), runs.count.tolist()):
            (s_seg, s_local), (d_seg, d_local) = divmod(s_first, s_bps), divmod(d_first, d_bps)
            s_flat, d_flat, n = src[s_seg].flat, dst[d_seg].flat, count * sb
            for lkv in range(2 * src_layout.num_layers):
                a = (lkv * s_bps + s_local) * sb
                b = (lkv * d_bps + d_local) * db
                d_flat[b:b + n].copy_(s_flat[a:a + n], non_blocking=True)
        return num_slices
    if kernel is None and num_runs > 1:
        src, dst = SegmentSet.of(src), SegmentSet.of(dst)
        kernel = _kernel_fits(src, dst) is None
    elif kernel:
        src, dst = SegmentSet.of(src), SegmentSet.of(dst)
        if (why := _kernel_fits(src, dst)) is not None:
            raise ValueError(f"the block-table kernel cannot copy this READ: {why}")
    if max_strided_runs is None:
        max_strided_runs = MAX_STRIDED_RUNS_KERNEL if kernel else MAX_STRIDED_RUNS
    if num_runs > max_strided_runs:
        if kernel:
            _table_copy(src, dst, s_bps, d_bps, runs)
        else:
            _gather_scatter(src, dst, s_bps, d_bps, runs)
        return num_slices
    # (segments on two devices without peer access: torch stages a strided copy between them)
    for s_first, d_first, count in zip(runs.src_first.tolist(), runs.dst_first.tolist(), runs.count.tolist()):
        (s_seg, s_local), (d_seg, d_local) = divmod(s_first, s_bps), divmod(d_first, d_bps)
        _strided(src[s_seg], dst[d_seg], s_local, d_local, count)
    return num_slices


def _strided(s: SegmentViews, d: SegmentViews, s_local: int, d_local: int, count: int) -> None:
    """Blocks [s_local, s_local + count) -> [d_local, ...), all (layer, kv) rows: one copy."""
    w = s.by_block.shape[2]  # words per block
    d.rows.narrow(1, d_local * w, count * w).copy_(s.rows.narrow(1, s_local * w, count * w), non_blocking=True)


def _is_run(local: np.ndarray) -> bool:
    """True iff the block indices step by one (one contiguous range)."""
    return local[-1] - local[0] == len(local) - 1 and bool(((local[1:] - local[:-1]) == 1).all())


def _gather_scatter(src: Mapping[int, SegmentViews], dst: Mapping[int, SegmentViews], s_bps: int, d_bps: int,
                    runs: RunTable) -> None:
    """dst[d_seg].by_block[d_local] = src[s_seg].by_block[s_local] for every block pair, with all
    the index arrays moved to the device in one copy. Torch calls (each a launch on a GPU), the
    fewer of: per (source segment, destination segment) pair, one strided copy when its blocks
    are one run on both sides, one gather straight into the destination when they are one run
    there (index_select into a view), one scatter straight from the source when they are one run
    there (index_copy_ from a view), else a gather + a scatter; or, through a staging buffer, one
    gather per source segment and a gather + scatter per destination segment (one extra device
    pass over the bytes; scattered ids over many segments). Either way the launches grow with the
    segments a READ touches: one launch for any number of segments needs a kernel that takes a
    table of segment addresses."""
    n = runs.num_blocks
    s_seg, s_local = np.divmod(runs.src_ids, s_bps)
    d_seg, d_local = np.divmod(runs.dst_ids, d_bps)
    if s_seg.min() == s_seg.max() and d_seg.min() == d_seg.max():  # the usual case: one segment per side
        s_view, d_view = src[int(s_seg[0])].by_block, dst[int(d_seg[0])].by_block
        s_run, d_run = _is_run(s_local), _is_run(d_local)
        if s_run and d_run:  # (only when the caller set max_strided_runs below the number of runs)
            _strided(src[int(s_seg[0])], dst[int(d_seg[0])], int(s_local[0]), int(d_local[0]), n)
            return
        if s_view.device == d_view.device and (s_run or d_run):  # one side one range: one kernel
            on = _upload(d_local if s_run else s_local, d_view.device)
            _pair(s_view, d_view, int(s_local[0]) if s_run else on, int(d_local[0]) if d_run else on, n)
            return
        on_s, on_d = _to_devices(np.concatenate((s_local, d_local)), s_view.device, d_view.device)
        _scatter(d_view, on_d[n:], s_view.index_select(0, on_s[:n]))
        return
    by_pair, bounds, _ = _groups(s_seg * (int(d_seg.max()) + 1) + d_seg)
    # inside a pair (READ order kept), a side whose blocks step by one is one range there
    ordered_s, ordered_d = s_local[by_pair], d_local[by_pair]
    starts, ends = np.array(bounds[:-1]), np.array(bounds[1:])
    s_run, d_run = _one_range(ordered_s, starts, ends), _one_range(ordered_d, starts, ends)
    heads = by_pair[starts]
    # torch calls per pair: 1 when either side is one range (2 when that pair spans two devices
    # without peer access and only one side is a range: rare, not counted), else 2
    calls = 2 * len(starts) - int(np.count_nonzero(s_run | d_run))
    num_src, num_dst = np.count_nonzero(np.bincount(s_seg)), np.count_nonzero(np.bincount(d_seg))
    if calls <= num_src + 2 * num_dst:  # fewer torch calls per pair than through staging
        on_s = on_d = None
        if not (s_run & d_run).all():
            on_s, on_d = _to_devices(np.concatenate((ordered_s, ordered_d)), src[int(s_seg[heads[0]])].flat.device,
                                     dst[int(d_seg[heads[0]])].flat.device)
        w = src[int(s_seg[heads[0]])].by_block.shape[2]  # words per block
        groups = zip(bounds, bounds[1:], s_seg[heads].tolist(), d_seg[heads].tolist(), ordered_s[starts].tolist(),
                     ordered_d[starts].tolist(), s_run.tolist(), d_run.tolist())
        for lo, hi, ss, ds, sl, dl, s_one, d_one in groups:
            if s_one and d_one:  # one strided copy, as for a run
                dst[ds].rows.narrow(1, dl * w, (hi - lo) * w).copy_(src[ss].rows.narrow(1, sl * w, (hi - lo) * w),
                                                                    non_blocking=True)
                continue
            s_view, d_view = src[ss].by_block, dst[ds].by_block
            if (s_one or d_one) and s_view.device == d_view.device:
                _pair(s_view, d_view, sl if s_one else _on(on_s, s_view.device).narrow(0, lo, hi - lo),
                      dl if d_one else _on(on_d, d_view.device).narrow(0, n + lo, hi - lo), hi - lo)
                continue
            gathered = s_view.index_select(0, _on(on_s, s_view.device).narrow(0, lo, hi - lo))
            _scatter(d_view, _on(on_d, d_view.device).narrow(0, n + lo, hi - lo), gathered)
        return
    # staging row k holds pair by_src[k]; rows[j] is the staging row of pair by_dst[j]
    by_src, s_bounds, s_keys = _groups(s_seg)
    by_dst, d_bounds, d_keys = _groups(d_seg)
    rank = np.empty(n, dtype=np.int64)
    rank[by_src] = np.arange(n)
    first_dst = dst[d_keys[0]].by_block
    on_s, on_d = _to_devices(np.concatenate((s_local[by_src], d_local[by_dst], rank[by_dst])),
                             src[s_keys[0]].by_block.device, first_dst.device)
    staging = torch.empty((n,) + tuple(first_dst.shape[1:]), dtype=first_dst.dtype, device=first_dst.device)
    for lo, hi, ss in zip(s_bounds, s_bounds[1:], s_keys):
        s_view = src[ss].by_block
        idx = _on(on_s, s_view.device).narrow(0, lo, hi - lo)
        if s_view.device == staging.device:
            torch.index_select(s_view, 0, idx, out=staging.narrow(0, lo, hi - lo))
        else:
            staging.narrow(0, lo, hi - lo).copy_(s_view.index_select(0, idx), non_blocking=True)
    for lo, hi, ds in zip(d_bounds, d_bounds[1:], d_keys):
        d_view = dst[ds].by_block
        rows = _on(on_d, staging.device).narrow(0, 2 * n + lo, hi - lo)
        _scatter(d_view, _on(on_d, d_view.device).narrow(0, n + lo, hi - lo), staging.index_select(0, rows))


def _one_range(ordered: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per group [starts[g], ends[g]) of ``ordered``: True iff its entries step by one."""
    breaks = np.zeros(len(ordered), dtype=np.int64)
    np.cumsum(ordered[1:] - ordered[:-1] != 1, out=breaks[1:])
    return breaks[ends - 1] == breaks[starts]


def _pair(s_view: torch.Tensor, d_view: torch.Tensor, s_at: int | torch.Tensor, d_at: int | torch.Tensor,
          count: int) -> None:
    """``count`` blocks of one segment pair on one device, one side at least given as an index
    tensor on that device, the other as an index tensor or the first block of a range: one
    kernel when either side is a range, else a gather + a scatter."""
    if isinstance(d_at, int):  # gather straight into the destination range (a strided view)
        torch.index_select(s_view, 0, s_at, out=d_view.narrow(0, d_at, count))
    elif isinstance(s_at, int):  # scatter straight from the source range
        d_view.index_copy_(0, d_at, s_view.narrow(0, s_at, count))
    else:
        d_view.index_copy_(0, d_at, s_view.index_select(0, s_at))


def _kernel_fits(src: SegmentSet, dst: SegmentSet) -> str | None:
    """Why the block-table kernel cannot copy between these segments, or None when it can."""
    if triton is None:
        return "triton is not installed (it ships with CUDA builds of torch)"
    if src.device is None or src.device != dst.device:
        return f"the segments are not all on one device ({src.device} -> {dst.device})"
    if src.device.type != "cuda" and not _INTERPRET:
        return f"{src.device} tensors run triton kernels only under TRITON_INTERPRET=1"
    if src.anchor.dtype != dst.anchor.dtype:
        return "the two sides' blocks differ in size"
    return None


def _table_copy(src: SegmentSet, dst: SegmentSet, s_bps: int, d_bps: int, runs: RunTable) -> None:
    """Every block pair in one launch: a table of each pair's word offsets (source block, then
    destination block, from each side's anchor) is uploaded, and program (b, r) copies row r
    (a (layer, kv)) of pair b. One device pass over the bytes, whatever the segments."""
    n = runs.num_blocks
    s_seg, s_local = np.divmod(runs.src_ids, s_bps)
    d_seg, d_local = np.divmod(runs.dst_ids, d_bps)
    rows, words = src.anchor.shape[0], src.anchor.shape[1] // s_bps  # (layer, kv) rows; words per block
    table = np.empty(2 * n, dtype=np.int64)
    np.add(src.base_words[s_seg], s_local * words, out=table[:n])
    np.add(dst.base_words[d_seg], d_local * words, out=table[n:])
    per_16_bytes = 16 // src.anchor.element_size()
    aligned = src.aligned and dst.aligned and words % per_16_bytes == 0
    _copy_blocks_kernel[(n, rows)](src.anchor, dst.anchor, _upload(table, dst.device), n, src.anchor.stride(0),
                                   dst.anchor.stride(0), WORDS=words, BLOCK=min(1024, triton.next_power_of_2(words)),
                                   ALIGN=per_16_bytes if aligned else 1)


def warm_up(segments: SegmentSet) -> None:
    """Compile the block-table kernel for these segments' block size, so that no READ pays for
    it (a second or so; triton's disk cache makes later processes quicker): a launch of zero
    blocks, which copies nothing. Where the kernel would not run (no triton, CPU): nothing."""
    if len(segments) and _kernel_fits(segments, segments) is None:
        bps = next(iter(segments.values())).by_block.shape[0]
        empty = np.zeros(0, dtype=np.int64)
        _table_copy(segments, segments, bps, bps, RunTable(empty, empty, empty, empty, empty))


if triton is not None:
    @triton.jit(do_not_specialize=["n"])  # one compiled kernel whatever the number of blocks
    def _copy_blocks_kernel(src, dst, table, n, s_row, d_row, WORDS: tl.constexpr, BLOCK: tl.constexpr,
                            ALIGN: tl.constexpr):
        """Program (b, r): WORDS words from src + table[b] + r * s_row to dst + table[n + b] + r * d_row.
        ALIGN > 1: every such offset is a multiple of ALIGN words (16-byte loads and stores)."""
        b = tl.program_id(0)
        r = tl.program_id(1).to(tl.int64)
        s = tl.load(table + b) + r * s_row
        d = tl.load(table + n + b) + r * d_row
        if ALIGN > 1:
            s = tl.multiple_of(s, ALIGN)
            d = tl.multiple_of(d, ALIGN)
        for c in tl.static_range(0, WORDS, BLOCK):
            offs = c + tl.arange(0, BLOCK)
            if WORDS % BLOCK == 0:
                tl.store(dst + d + offs, tl.load(src + s + offs))
            else:
                mask = offs < WORDS
                tl.store(dst + d + offs, tl.load(src + s + offs, mask=mask), mask=mask)


def _groups(keys: np.ndarray) -> tuple[np.ndarray, list[int], list[int]]:
    """(stable order that groups equal keys, group g = order[bounds[g]:bounds[g + 1]], each group's
    key), groups in ascending key order. Small keys (segment indices) sort by radix."""
    order = np.argsort(keys.astype(np.uint16) if keys.max() < 1 << 16 else keys, kind="stable")
    ordered = keys[order]
    bounds = [0, *(np.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist(), len(keys)]
    return order, bounds, ordered[bounds[:-1]].tolist()


def _upload(idx: np.ndarray, device: torch.device) -> torch.Tensor:
    """Index array -> ``device``: one host-to-device copy (none on the CPU). The host array may go
    once this returns: cudaMemcpyAsync from pageable memory stages the bytes before it returns,
    without waiting for the stream (CUDA's API sync behaviour), so READs queued behind others
    are not held up by it."""
    return torch.from_numpy(idx).to(device, non_blocking=True)


def _to_devices(idx: np.ndarray, src_device: torch.device,
                dst_device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``idx`` on both devices (one host-to-device copy each; one in all when they are the same)."""
    on_s = _upload(idx, src_device)
    return on_s, (on_s if dst_device == src_device else _upload(idx, dst_device))


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device, non_blocking=True)  # a segment on a third GPU: rare


def _scatter(d_view: torch.Tensor, d_idx: torch.Tensor, gathered: torch.Tensor) -> None:
    if gathered.device != d_view.device:
        gathered = gathered.to(d_view.device, non_blocking=True)
    d_view.index_copy_(0, d_idx, gathered)
