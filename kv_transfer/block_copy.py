"""Device copies of KV blocks between two sets of segments (a CUDA IPC READ: the peer's segments
mapped here -> ours; kv_transfer/cuda_ipc.py). Pure torch on whatever device the tensors live on,
so the CPU tests run the same code.

    SegmentViews.of(tensor, layout)      the views one segment is copied through, made once
    copy_runs(src, dst, ..., runs)       every run's blocks, all layers, K and V, on the current streams
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from kv_transfer.descriptors import RunTable
from kv_transfer.layout import KVLayout

# How copy_runs moves a READ (H100, one 2048-token Llama-3.2-1B-shaped request = 32 slices of 2 MiB,
# benchmarks/ipc_copy.py): a copy per slice 0.58 ms (launch-bound), one strided copy per run
# 0.077 ms (a local 64 MiB memcpy: 0.083 ms), gather + scatter 0.17 ms.
MAX_SLICE_COPIES = 4  # up to this many (layer, kv, run) slices: one memcpy each (copy engine, big slices)
MAX_STRIDED_RUNS = 16  # up to this many runs: one strided copy per run (all layers, K and V); more: gather/scatter



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


def copy_runs(src: Mapping[int, SegmentViews], dst: Mapping[int, SegmentViews], src_layout: KVLayout,
              dst_layout: KVLayout, runs: RunTable, max_slice_copies: int = MAX_SLICE_COPIES,
              max_strided_runs: int = MAX_STRIDED_RUNS) -> int:
    """Copy src block r.src_first + i -> dst block r.dst_first + i (all layers, K and V) for every
    run. ``src``/``dst`` map segment index -> that segment's views. Returns the number of
    (layer, kv, run) slices. Asynchronous on the current streams of the tensors' devices.

    Few slices: one copy each (a memcpy at copy-engine speed). Few runs: one strided copy per run
    (one kernel for all its layers). Many runs (scattered blocks): gathers and scatters of whole
    blocks, a few per segment the READ touches (_gather_scatter). Python work: O(runs) torch calls
    up to max_strided_runs; above it a fixed number of numpy calls plus O(segments touched)."""
    num_slices = 2 * src_layout.num_layers * len(runs)
    s_bps, d_bps = src_layout.blocks_per_segment, dst_layout.blocks_per_segment
    triples = zip(runs.src_first.tolist(), runs.dst_first.tolist(), runs.count.tolist())
    if num_slices <= max_slice_copies:  # few big slices: byte offsets by hand
        sb, db = src_layout.block_bytes, dst_layout.block_bytes
        for s_first, d_first, count in triples:
            (s_seg, s_local), (d_seg, d_local) = divmod(s_first, s_bps), divmod(d_first, d_bps)
            s_flat, d_flat, n = src[s_seg].flat, dst[d_seg].flat, count * sb
            for lkv in range(2 * src_layout.num_layers):
                a = (lkv * s_bps + s_local) * sb
                b = (lkv * d_bps + d_local) * db
                d_flat[b:b + n].copy_(s_flat[a:a + n], non_blocking=True)
        return num_slices
    if len(runs) <= max_strided_runs:
        # (segments on two devices without peer access: torch stages a strided copy between them)
        w = src_layout.block_bytes // _word(src_layout.block_bytes)[1]  # words per block
        for s_first, d_first, count in triples:
            (s_seg, s_local), (d_seg, d_local) = divmod(s_first, s_bps), divmod(d_first, d_bps)
            dst[d_seg].rows.narrow(1, d_local * w, count * w).copy_(
                src[s_seg].rows.narrow(1, s_local * w, count * w), non_blocking=True)
        return num_slices
    _gather_scatter(src, dst, s_bps, d_bps, runs)
    return num_slices


def _gather_scatter(src: Mapping[int, SegmentViews], dst: Mapping[int, SegmentViews], s_bps: int, d_bps: int,
                    runs: RunTable) -> None:
    """dst[d_seg].by_block[d_local] = src[s_seg].by_block[s_local] for every block pair, with all
    the index arrays moved to the device in one copy. Torch calls (each a launch on a GPU), the
    fewer of: per (source segment, destination segment) pair, one strided copy when its blocks
    are one run (contiguous ids over many segments) else a gather + a scatter; or, through a
    staging buffer, one gather per source segment and a gather + scatter per destination segment
    (one extra device pass over the bytes; scattered ids over many segments). Either way the
    launches grow with the segments a READ touches: one launch for any number of segments needs
    a kernel that takes a table of segment addresses."""
    n = runs.num_blocks
    s_seg, s_local = np.divmod(runs.src_ids, s_bps)
    d_seg, d_local = np.divmod(runs.dst_ids, d_bps)
    if s_seg.min() == s_seg.max() and d_seg.min() == d_seg.max():  # the usual case: one segment per side
        s_view, d_view = src[int(s_seg[0])].by_block, dst[int(d_seg[0])].by_block
        on_s, on_d = _to_devices(np.concatenate((s_local, d_local)), s_view.device, d_view.device)
        _scatter(d_view, on_d[n:], s_view.index_select(0, on_s[:n]))
        return
    by_pair, bounds, _ = _groups(s_seg * (int(d_seg.max()) + 1) + d_seg)
    # a pair whose blocks are one run (adjacent in the READ, +1 on both sides) is one strided copy
    ordered_s, ordered_d = s_local[by_pair], d_local[by_pair]
    breaks = np.zeros(n, dtype=np.int64)
    np.cumsum((np.diff(by_pair) != 1) | (np.diff(ordered_s) != 1) | (np.diff(ordered_d) != 1), out=breaks[1:])
    starts, ends = np.array(bounds[:-1]), np.array(bounds[1:])
    one_run = breaks[ends - 1] == breaks[starts]
    calls = 2 * len(starts) - int(np.count_nonzero(one_run))
    num_src, num_dst = np.count_nonzero(np.bincount(s_seg)), np.count_nonzero(np.bincount(d_seg))
    if calls <= num_src + 2 * num_dst:  # fewer torch calls per pair than through staging
        heads = by_pair[starts]
        w = src[int(s_seg[heads[0]])].by_block.shape[-1]  # words per block
        on_s = on_d = None
        if not one_run.all():
            on_s, on_d = _to_devices(np.concatenate((ordered_s, ordered_d)), src[int(s_seg[heads[0]])].flat.device,
                                     dst[int(d_seg[heads[0]])].flat.device)
        groups = zip(bounds, bounds[1:], s_seg[heads].tolist(), d_seg[heads].tolist(), ordered_s[starts].tolist(),
                     ordered_d[starts].tolist(), one_run.tolist())
        for lo, hi, ss, ds, sl, dl, one in groups:
            if one:
                dst[ds].rows.narrow(1, dl * w, (hi - lo) * w).copy_(src[ss].rows.narrow(1, sl * w, (hi - lo) * w),
                                                                    non_blocking=True)
                continue
            s_view, d_view = src[ss].by_block, dst[ds].by_block
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


def _groups(keys: np.ndarray) -> tuple[np.ndarray, list[int], list[int]]:
    """(stable order that groups equal keys, group g = order[bounds[g]:bounds[g + 1]], each group's
    key), groups in ascending key order. Small keys (segment indices) sort by radix."""
    order = np.argsort(keys.astype(np.uint16) if keys.max() < 1 << 16 else keys, kind="stable")
    ordered = keys[order]
    bounds = [0, *(np.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist(), len(keys)]
    return order, bounds, ordered[bounds[:-1]].tolist()


def _to_devices(idx: np.ndarray, src_device: torch.device,
                dst_device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``idx`` on both devices (one host-to-device copy each; one in all when they are the same)."""
    on_s = torch.from_numpy(idx).to(src_device, non_blocking=True)
    return on_s, (on_s if dst_device == src_device else torch.from_numpy(idx).to(dst_device, non_blocking=True))


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device, non_blocking=True)  # a segment on a third GPU: rare


def _scatter(d_view: torch.Tensor, d_idx: torch.Tensor, gathered: torch.Tensor) -> None:
    if gathered.device != d_view.device:
        gathered = gathered.to(d_view.device, non_blocking=True)
    d_view.index_copy_(0, d_idx, gathered)
