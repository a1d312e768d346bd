"""Transfer descriptors: which byte ranges of which segments one request's KV occupies, on both
sides, in the same order.

A transfer moves block ``src[i]`` into block ``dst[i]`` for every i, for every (layer, K/V).
``plan_runs`` cuts the two id arrays into runs where both sides are consecutive and neither crosses
a segment boundary (each side may have its own blocks_per_segment); each run then becomes one
descriptor per (layer, kv), ``count * block_bytes`` long:

    descriptor order:  for layer in layers: for kv in (K, V): for run in runs
    address(side, layer, kv, run) = base[segment(run.first)] + layout.offset(layer, kv, local(run.first))

Both descriptor lists come out of the same loop, so row j of the source list and row j of the
destination list always have the same length.

Cost per READ: the ids are converted to numpy once (``block_id_array``, one C-level pass; an int64
array or a ``range`` costs O(1)); everything after that is a fixed number of numpy calls, so the
Python work does not grow with the number of ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kv_transfer.layout import KVLayout


@dataclass(frozen=True)
class Run:
    src_first: int
    dst_first: int
    count: int


def block_id_array(ids) -> np.ndarray:
    """``ids`` (list, tuple, range, integer array or any iterable of ints) as a 1-D int64 array:
    no copy for an int64 array, O(1) for a range, one C-level pass otherwise (~10 ns an id).
    Raises TypeError/ValueError for anything that is not a flat sequence of integers."""
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu":
            raise TypeError(f"block ids must be integers, not {ids.dtype}")
        arr = ids if ids.dtype == np.int64 else ids.astype(np.int64)
    elif isinstance(ids, range):
        arr = np.arange(ids.start, ids.stop, ids.step, dtype=np.int64)
    elif hasattr(ids, "__len__"):
        arr = np.fromiter(ids, dtype=np.int64, count=len(ids))  # the fastest list -> int64 conversion
    else:
        arr = np.fromiter(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"block ids must be a flat sequence, got shape {arr.shape}")
    return arr


class RunTable(Sequence[Run]):
    """The runs of one transfer as int64 arrays (``src_first``, ``dst_first``, ``count``), next to
    the block pairs they cover (``src_ids``, ``dst_ids``). A Sequence of Run for code that loops
    over runs; the Run objects are made once, on first use."""

    __slots__ = ("src_first", "dst_first", "count", "src_ids", "dst_ids", "_runs")

    def __init__(self, src_first: np.ndarray, dst_first: np.ndarray, count: np.ndarray, src_ids: np.ndarray,
                 dst_ids: np.ndarray):
        self.src_first, self.dst_first, self.count = src_first, dst_first, count
        self.src_ids, self.dst_ids = src_ids, dst_ids
        self._runs: list[Run] | None = None

    @classmethod
    def of(cls, runs: Sequence[Run]) -> RunTable:
        """``runs`` as a RunTable (itself if it is one)."""
        if isinstance(runs, RunTable):
            return runs
        src = np.fromiter((r.src_first for r in runs), dtype=np.int64, count=len(runs))
        dst = np.fromiter((r.dst_first for r in runs), dtype=np.int64, count=len(runs))
        count = np.fromiter((r.count for r in runs), dtype=np.int64, count=len(runs))
        within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)  # index inside its run
        return cls(src, dst, count, np.repeat(src, count) + within, np.repeat(dst, count) + within)

    @property
    def num_blocks(self) -> int:
        return len(self.src_ids)

    def runs(self) -> list[Run]:
        if self._runs is None:
            self._runs = [Run(a, b, c) for a, b, c in
                          zip(self.src_first.tolist(), self.dst_first.tolist(), self.count.tolist())]
        return self._runs

    def __len__(self) -> int:
        return len(self.count)

    def __getitem__(self, i):
        return self.runs()[i]

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs())

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"RunTable({self.runs()!r})"


def plan_runs(src_ids, dst_ids, src_bps: int, dst_bps: int) -> RunTable:
    """Maximal runs over which both id lists advance by one and stay inside one segment per side.
    Vectorised: a fixed number of numpy calls whatever the number of ids.

    >>> list(plan_runs([4, 5, 6, 9], [0, 1, 7, 8], 64, 64))
    [Run(src_first=4, dst_first=0, count=2), Run(src_first=6, dst_first=7, count=1), Run(src_first=9, dst_first=8, count=1)]
    """
    s, d = block_id_array(src_ids), block_id_array(dst_ids)
    n = len(s)
    if n != len(d):
        raise ValueError(f"{n} source blocks but {len(d)} destination blocks")
    if n == 0:
        return RunTable(s, d, np.zeros(0, dtype=np.int64), s, d)
    s_first, s_last, d_first, d_last = s[0].item(), s[-1].item(), d[0].item(), d[-1].item()
    if (s_last - s_first == n - 1 and d_last - d_first == n - 1 and s_first >= 0 and d_first >= 0
            and s_first // src_bps == s_last // src_bps and d_first // dst_bps == d_last // dst_bps):
        # the ends fit one run inside one segment per side (contiguous ids: a READ's usual case);
        # it is one iff the source ids step by one and every pair keeps the same offset
        if n == 1 or ((s[1:] - s[:-1]) == 1).all() and ((d - s) == d_first - s_first).all():
            return RunTable(s[:1], d[:1], np.array([n], dtype=np.int64), s, d)
    if s.min() < 0 or d.min() < 0:
        i = int(np.flatnonzero((s < 0) | (d < 0))[0])
        raise ValueError(f"negative block id in transfer ({s[i]} -> {d[i]})")
    # a run starts at 0, at a gap on either side, or where either side starts a segment
    starts = np.empty(n, dtype=bool)
    starts[0] = True
    brk, tail_s, tail_d = starts[1:], s[1:], d[1:]
    np.not_equal(tail_s - s[:-1], 1, out=brk)
    brk |= tail_d - d[:-1] != 1
    brk |= tail_s % src_bps == 0
    brk |= tail_d % dst_bps == 0
    first = starts.nonzero()[0]
    count = np.empty_like(first)
    np.subtract(first[1:], first[:-1], out=count[:-1])
    count[-1] = n - first[-1]
    return RunTable(s[first], d[first], count, s, d)


def pair_runs(src_ids: Sequence[int], dst_ids: Sequence[int], src_bps: int, dst_bps: int) -> list[Run]:
    """plan_runs as a list of Run.

    >>> pair_runs([4, 5, 6, 9], [0, 1, 7, 8], 64, 64)
    [Run(src_first=4, dst_first=0, count=2), Run(src_first=6, dst_first=7, count=1), Run(src_first=9, dst_first=8, count=1)]
    """
    return plan_runs(src_ids, dst_ids, src_bps, dst_bps).runs()


def segment_mask(indices) -> np.ndarray:
    """Boolean array: mask[i] is True iff segment i is in ``indices``."""
    indices = list(indices)
    mask = np.zeros(max(indices, default=-1) + 1, dtype=bool)
    mask[indices] = True
    return mask


def missing_segments(segments: np.ndarray, mask: np.ndarray) -> list[int]:
    """The sorted distinct entries of ``segments`` that ``mask`` lacks. ``segments`` must be
    non-negative (they come from ids plan_runs checked): then none missing costs two numpy calls."""
    try:
        if mask[segments].all():
            return []
    except IndexError:  # some segment lies past the mask
        pass
    inside = segments < len(mask)
    known = np.zeros(len(segments), dtype=bool)
    known[inside] = mask[segments[inside]]
    return np.unique(segments[~known]).tolist()


class MissingSegmentError(LookupError):
    """A block id lies in a segment that the address table does not have."""

    def __init__(self, segment: int):
        super().__init__(f"segment {segment} is not known")
        self.segment = segment


class SegmentTable:
    """One side's segments by index: base address, device id, presence. Built when the segments
    change (ours: on add/remove; a peer's: once per PeerInfo), read per READ with numpy lookups."""

    __slots__ = ("bases", "devices", "mask")

    def __init__(self, bases: Mapping[int, int], device_ids: Mapping[int, int]):
        size = max(bases, default=-1) + 1
        self.bases = np.zeros(size, dtype=np.uint64)
        self.devices = np.zeros(size, dtype=np.uint64)
        self.bases[list(bases)] = list(bases.values())
        self.devices[list(device_ids)] = list(device_ids.values())
        self.mask = segment_mask(bases)

    def lookup(self, segs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(base address, device id) of every entry of ``segs``; MissingSegmentError names the
        smallest segment the table lacks."""
        if len(segs) and segs.min() < 0:
            raise MissingSegmentError(int(segs.min()))
        missing = missing_segments(segs, self.mask)
        if missing:
            raise MissingSegmentError(missing[0])
        return self.bases[segs], self.devices[segs]


def descriptor_array(
    layout: KVLayout,
    bases: Mapping[int, int],
    device_ids: Mapping[int, int],
    firsts: Sequence[int],
    counts: Sequence[int],
    layers: Sequence[int] | None = None,
) -> np.ndarray:
    """descriptor_rows with the table built from ``bases``/``device_ids`` (segment index -> base
    address / device of that side)."""
    return descriptor_rows(layout, SegmentTable(bases, device_ids), firsts, counts, layers)


def descriptor_rows(layout: KVLayout, table: SegmentTable, firsts: Sequence[int], counts: Sequence[int],
                    layers: Sequence[int] | None = None) -> np.ndarray:
    """Nx3 uint64 rows (address, num_bytes, device_id) in the order of the module docstring."""
    firsts_np = np.asarray(firsts, dtype=np.int64)
    counts_np = np.asarray(counts, dtype=np.int64)
    segs, locals_ = np.divmod(firsts_np, layout.blocks_per_segment)
    seg_base, seg_dev = table.lookup(segs)
    layer_ids = np.arange(layout.num_layers) if layers is None else np.asarray(layers, dtype=np.int64)
    # address(lkv, run) = [base(run) + local(run) * block_bytes] + lkv * blocks_per_segment * block_bytes,
    # lkv = layer * 2 + kv; written straight into the output (one allocation of the rows' size)
    lkv = (layer_ids[:, None] * 2 + np.arange(2)[None, :]).reshape(-1)
    run_address = seg_base + (locals_ * layout.block_bytes).astype(np.uint64)
    out = np.empty((len(lkv), len(firsts_np), 3), dtype=np.uint64)
    np.add((lkv * (layout.blocks_per_segment * layout.block_bytes)).astype(np.uint64)[:, None], run_address[None, :],
           out=out[:, :, 0])
    out[:, :, 1] = (counts_np * layout.block_bytes).astype(np.uint64)[None, :]
    out[:, :, 2] = seg_dev[None, :]
    return out.reshape(-1, 3)


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
