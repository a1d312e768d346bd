"""Transfer descriptors: which byte ranges of which segments one request's KV occupies, on both
sides, in the same order.

A transfer moves block ``src[i]`` into block ``dst[i]`` for every i, for every (layer, K/V).
``pair_runs`` cuts the two id lists into runs where both sides are consecutive and neither crosses
a segment boundary (each side may have its own blocks_per_segment); each run then becomes one
descriptor per (layer, kv), ``count * block_bytes`` long:

    descriptor order:  for layer in layers: for kv in (K, V): for run in runs
    address(side, layer, kv, run) = base[segment(run.first)] + layout.offset(layer, kv, local(run.first))

Both descriptor lists come out of the same loop, so row j of the source list and row j of the
destination list always have the same length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kv_transfer.layout import KVLayout


@dataclass(frozen=True)
class Run:
    src_first: int
    dst_first: int
    count: int


def pair_runs(src_ids: Sequence[int], dst_ids: Sequence[int], src_bps: int, dst_bps: int) -> list[Run]:
    """Maximal runs over which both id lists advance by one and stay inside one segment per side.

    >>> pair_runs([4, 5, 6, 9], [0, 1, 7, 8], 64, 64)
    [Run(src_first=4, dst_first=0, count=2), Run(src_first=6, dst_first=7, count=1), Run(src_first=9, dst_first=8, count=1)]
    """
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    if len(src_ids) > 32:  # vectorised: a request's thousands of ids cost microseconds, not a loop
        return _pair_runs_np(np.asarray(src_ids, dtype=np.int64), np.asarray(dst_ids, dtype=np.int64), src_bps, dst_bps)
    runs: list[Run] = []
    for s, d in zip(src_ids, dst_ids):
        if s < 0 or d < 0:
            raise ValueError(f"negative block id in transfer ({s} -> {d})")
        if runs:
            last = runs[-1]
            extends = s == last.src_first + last.count and d == last.dst_first + last.count
            if extends and s % src_bps != 0 and d % dst_bps != 0:
                runs[-1] = Run(last.src_first, last.dst_first, last.count + 1)
                continue
        runs.append(Run(s, d, 1))
    return runs


def _pair_runs_np(s: np.ndarray, d: np.ndarray, src_bps: int, dst_bps: int) -> list[Run]:
    if (s < 0).any() or (d < 0).any():
        i = int(np.flatnonzero((s < 0) | (d < 0))[0])
        raise ValueError(f"negative block id in transfer ({s[i]} -> {d[i]})")
    starts = np.ones(len(s), dtype=bool)  # a run starts at a gap on either side or at a segment start
    starts[1:] = (s[1:] != s[:-1] + 1) | (d[1:] != d[:-1] + 1) | (s[1:] % src_bps == 0) | (d[1:] % dst_bps == 0)
    first = np.flatnonzero(starts)
    counts = np.diff(np.append(first, len(s)))
    return [Run(a, b, c) for a, b, c in zip(s[first].tolist(), d[first].tolist(), counts.tolist())]


class MissingSegmentError(LookupError):
    """A block id lies in a segment that the address table does not have."""

    def __init__(self, segment: int):
        super().__init__(f"segment {segment} is not known")
        self.segment = segment


def descriptor_array(
    layout: KVLayout,
    bases: Mapping[int, int],
    device_ids: Mapping[int, int],
    firsts: Sequence[int],
    counts: Sequence[int],
    layers: Sequence[int] | None = None,
) -> np.ndarray:
    """Nx3 uint64 rows (address, num_bytes, device_id) in the order of the module docstring.
    ``bases``/``device_ids`` map segment index -> base address / device of that side."""
    firsts_np = np.asarray(firsts, dtype=np.int64)
    counts_np = np.asarray(counts, dtype=np.int64)
    segs, locals_ = np.divmod(firsts_np, layout.blocks_per_segment)
    try:
        seg_base = np.array([bases[int(s)] for s in segs], dtype=np.uint64)
        seg_dev = np.array([device_ids[int(s)] for s in segs], dtype=np.uint64)
    except KeyError as e:
        raise MissingSegmentError(int(e.args[0])) from None
    layer_ids = np.arange(layout.num_layers) if layers is None else np.asarray(layers, dtype=np.int64)
    # row index (layer, kv) -> (layer * 2 + kv); offsets broadcast to [layers, 2, runs]
    lkv = (layer_ids[:, None] * 2 + np.arange(2)[None, :])[:, :, None]
    offsets = ((lkv * layout.blocks_per_segment + locals_[None, None, :]) * layout.block_bytes).astype(np.uint64)
    n_rows = offsets.size
    out = np.empty((n_rows, 3), dtype=np.uint64)
    out[:, 0] = (seg_base[None, None, :] + offsets).reshape(-1)
    out[:, 1] = np.broadcast_to((counts_np * layout.block_bytes).astype(np.uint64), offsets.shape).reshape(-1)
    out[:, 2] = np.broadcast_to(seg_dev, offsets.shape).reshape(-1)
    return out


def segment_slices(layout: KVLayout, firsts: Sequence[int], counts: Sequence[int],
                   layers: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(segment index, byte offset inside that segment, num_bytes) per row, rows in the order of
    the module docstring: what descriptor_array addresses, for a reader that holds each segment as
    a tensor (CUDA IPC) rather than as a base address."""
    firsts_np = np.asarray(firsts, dtype=np.int64)
    counts_np = np.asarray(counts, dtype=np.int64)
    segs, locals_ = np.divmod(firsts_np, layout.blocks_per_segment)
    layer_ids = np.arange(layout.num_layers) if layers is None else np.asarray(layers, dtype=np.int64)
    lkv = (layer_ids[:, None] * 2 + np.arange(2)[None, :])[:, :, None]  # [layers, 2, 1]
    offsets = (lkv * layout.blocks_per_segment + locals_[None, None, :]) * layout.block_bytes
    shape = offsets.shape
    return (np.broadcast_to(segs, shape).reshape(-1), offsets.reshape(-1),
            np.broadcast_to(counts_np * layout.block_bytes, shape).reshape(-1))


def split_rows(local: np.ndarray, remote: np.ndarray, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut paired rows longer than max_bytes into max_bytes pieces (same cuts on both sides), so a
    multi-threaded backend has enough descriptors to spread one large run over its threads."""
    lengths = local[:, 1].astype(np.int64)
    pieces = np.maximum(1, -(-lengths // max_bytes))
    if (pieces == 1).all():
        return local, remote
    row = np.repeat(np.arange(len(local)), pieces)
    k = np.arange(len(row)) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # piece index within its row
    offset = (k * max_bytes).astype(np.uint64)
    length = np.minimum(lengths[row] - k * max_bytes, max_bytes).astype(np.uint64)
    out = []
    for rows in (local, remote):
        split = np.empty((len(row), 3), dtype=np.uint64)
        split[:, 0] = rows[row, 0] + offset
        split[:, 1] = length
        split[:, 2] = rows[row, 2]
        out.append(split)
    return out[0], out[1]


def run_offsets(layout: KVLayout, first: int, count: int, layer: int, kv: int) -> tuple[int, int, int]:
    """(segment index, byte offset inside it, num_bytes) of one run of one (layer, kv)."""
    seg, local = layout.locate(first)
    return seg, layout.offset(layer, kv, local), count * layout.block_bytes


def check_num_tokens(layout: KVLayout, num_blocks: int, num_tokens: int | None) -> None:
    """A request's KV is whole blocks: the last one may be partial (only its first
    ``num_tokens - (num_blocks - 1) * block_size`` slots are meaningful), but it is moved whole."""
    if num_tokens is None:
        return
    expected = -(-num_tokens // layout.block_size)
    if num_tokens <= 0 or expected != num_blocks:
        raise ValueError(f"{num_tokens} tokens need {expected} blocks of {layout.block_size}, got {num_blocks} block ids")
