"""CUDA IPC between the KV transceivers of one node: the reader maps the peer's VRAM segments into
its own address space once per peer epoch and READs blocks with device copies on its own stream.
NIXL stays the path across nodes, for host memory, and for layer-wise WRITEs (which need its
notifications).

    exporter, when a VRAM segment is added    export_segment() -> CudaIpcSegment (into PeerInfo)
    reader, once per (peer agent, kv_epoch)    CudaIpcReader.open(peer): every segment mapped here
    reader, per KV segment of its own          CudaIpcReader.add_local() / remove_local()
    reader, per READ                           CudaIpcReader.read(): copy_runs on the reader's stream,
                                               synchronized before it returns

Which path a peer gets is select_path() (pure; the transceiver logs the choice once per peer):
transfer.cuda_ipc = off | auto | on (kv_transfer/config.py). CUDA IPC needs the same node (equal
host_id) and the peer's GPU visible in this process (matched by UUID: ordinals differ between
processes with different CUDA_VISIBLE_DEVICES).

Mapping: each segment is opened in the reader's own device context with lazy peer access (what
cudaIpcOpenMemHandle does for torch's _new_shared_cuda), so a segment on another GPU of the node
is read directly over the GPU link; when the two GPUs cannot access each other it is opened on its
own GPU instead and torch copies between the devices.

Lifetime: the exporter releases torch's IPC reference count at export, so freeing a segment on
its side (quota shrink) returns the memory at once, as without IPC. A reader only touches segments
of the epoch it opened, and only blocks a handle says are pinned: a removed segment is never read
(its blocks were retired first, and a newer epoch is re-opened).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from kv_transfer.descriptors import RunTable, missing_segments, segment_mask
from kv_transfer.errors import BackendUnavailableError
from kv_transfer.layout import KVLayout
from workers.protocol import CudaIpcSegment, PeerInfo

log = logging.getLogger(__name__)

# How copy_runs moves a READ (H100, one 2048-token Llama-3.2-1B-shaped request = 32 slices of 2 MiB,
# benchmarks/ipc_copy.py): a copy per slice 0.58 ms (launch-bound), one strided copy per run
# 0.077 ms (a local 64 MiB memcpy: 0.083 ms), gather + scatter 0.17 ms.
MAX_SLICE_COPIES = 4  # up to this many (layer, kv, run) slices: one memcpy each (copy engine, big slices)
MAX_STRIDED_RUNS = 16  # up to this many runs: one strided copy per run (all layers, K and V); more: gather/scatter


def host_id() -> str:
    """This node's identity for CUDA IPC: hostname + kernel boot id (two containers of one host
    with different hostnames count as different nodes: IPC between them is not assumed)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}:{boot}"


def gpu_uuid(device_index: int) -> str:
    return str(torch.cuda.get_device_properties(device_index).uuid)


def visible_gpus() -> dict[str, int]:
    """UUID -> ordinal of every GPU this process can use."""
    if not torch.cuda.is_available():
        return {}
    return {gpu_uuid(i): i for i in range(torch.cuda.device_count())}


def export_segment(index: int, tensor: torch.Tensor) -> CudaIpcSegment:
    """IPC handle of a VRAM segment. torch counts one reference for this export; it is released
    here, so the segment's memory goes back to the allocator when the KV cache drops it (see the
    module docstring: readers never read a removed segment)."""
    storage = tensor.untyped_storage()
    (device, handle, size_bytes, offset_bytes, ref_handle, ref_offset, event_handle,
     event_sync) = storage._share_cuda_()
    torch.UntypedStorage._release_ipc_counter(ref_handle, ref_offset, device=device)
    return CudaIpcSegment(index=index, gpu_uuid=gpu_uuid(device), storage_handle=handle,
                          storage_size_bytes=size_bytes, storage_offset_bytes=offset_bytes,
                          ref_counter_handle=ref_handle, ref_counter_offset=ref_offset,
                          event_handle=event_handle, event_sync_required=bool(event_sync),
                          tensor_offset=tensor.storage_offset())


# -- which path reads from a peer ------------------------------------------------------------
@dataclass(frozen=True)
class PathChoice:
    path: str  # "cuda_ipc" | "nixl"
    reason: str


def select_path(mode: str, local_device_type: str, local_host_id: str, peer: PeerInfo,
                visible: Mapping[str, int]) -> PathChoice:
    """Which path READs from ``peer`` and why. Raises BackendUnavailableError when ``mode`` is
    "on" and the peer is a same-node VRAM peer that CUDA IPC cannot reach from here."""
    if mode not in ("off", "auto", "on"):
        raise ValueError(f"transfer.cuda_ipc must be off | auto | on, not {mode!r}")
    if mode == "off":
        return PathChoice("nixl", "transfer.cuda_ipc is off")
    if local_device_type != "cuda" or peer.memory_kind != "VRAM":
        return PathChoice("nixl", "host memory on one side (CUDA IPC moves VRAM only)")
    if not peer.host_id or peer.host_id != local_host_id:
        return PathChoice("nixl", f"{peer.worker_id} is on another node ({peer.host_id or 'unknown'})")
    exported = {s.index for s in peer.cuda_ipc}
    missing = sorted(s.index for s in peer.segments if s.index not in exported)
    unseen = sorted({s.gpu_uuid for s in peer.cuda_ipc} - set(visible))
    problem = None
    if missing:
        problem = f"{peer.worker_id} exported no CUDA IPC handle for segments {missing}"
    elif unseen:
        problem = (f"GPU(s) {unseen} of {peer.worker_id} are not visible in this process "
                   f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
    if problem is None:
        return PathChoice("cuda_ipc", "same node, VRAM on both sides, its GPU visible here")
    if mode == "on":
        raise BackendUnavailableError(f"transfer.cuda_ipc is 'on' but {problem}: make every GPU of the node "
                                      "visible to both workers, or set transfer.cuda_ipc: auto (NIXL then) or off",
                                      peer=peer.worker_id)
    return PathChoice("nixl", f"{problem}; transfer.cuda_ipc is auto: NIXL")


# -- the copies --------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class _Mapped:
    """One peer agent's segments as this reader holds them, valid for ``epoch`` only."""
    epoch: int
    segments: dict[int, SegmentViews]
    streams: tuple[torch.cuda.Stream, ...]  # the other GPUs' first, ours last; () for CPU tensors


class CudaIpcReader:
    """The peers' segments mapped into this process, per peer agent and epoch, and our own
    segments' views. Every view and stream a READ needs is made before the READ (open,
    add_local): a READ costs O(runs) torch calls plus a fixed number of numpy calls.

    On a CPU ``device`` (tests, benchmarks/read_host_cost.py) the same code copies between CPU
    tensors handed to ``adopt``, synchronously, with no streams."""

    def __init__(self, device: torch.device):
        self.device = device
        self._lock = threading.Lock()
        self._opened: dict[str, _Mapped] = {}  # peer agent -> its segments at one epoch
        self._streams: dict[int, torch.cuda.Stream] = {}
        # ours, replaced (never mutated) on every change so a READ reads them without the lock
        self._local: dict[int, SegmentViews] = {}
        self._local_mask = segment_mask(())

    def open(self, peer: PeerInfo) -> None:
        """Map every segment of ``peer`` (at its epoch). Raises what CUDA/torch raise."""
        local = self._local_index()
        gpus = visible_gpus()
        segments = {}
        for seg in peer.cuda_ipc:
            owner = gpus[seg.gpu_uuid]
            on = local if owner == local or torch.cuda.can_device_access_peer(local, owner) else owner
            storage = torch.UntypedStorage._new_shared_cuda(
                on, seg.storage_handle, seg.storage_size_bytes, seg.storage_offset_bytes, seg.ref_counter_handle,
                seg.ref_counter_offset, seg.event_handle, seg.event_sync_required)
            t = torch.empty(0, dtype=peer.layout.torch_dtype, device=f"cuda:{on}")
            t.set_(storage, seg.tensor_offset, peer.layout.segment_shape)
            segments[seg.index] = t
        self.adopt(peer, segments)

    def adopt(self, peer: PeerInfo, segments: Mapping[int, torch.Tensor]) -> None:
        """Hold ``segments`` (index -> tensor in peer.layout's segment shape, already in this
        process) as ``peer``'s at its epoch: their views, and the streams READs from them use."""
        views = {i: SegmentViews.of(t, peer.layout) for i, t in segments.items()}
        streams: tuple[torch.cuda.Stream, ...] = ()
        if any(t.is_cuda for t in segments.values()):
            ours = torch.device("cuda", self._local_index())
            others = sorted({t.device for t in segments.values()} - {ours}, key=lambda d: d.index)
            streams = tuple(self._stream(d) for d in [*others, ours])  # ours last: the current device
        with self._lock:
            self._opened[peer.agent_name] = _Mapped(peer.kv_epoch, views, streams)

    def is_open(self, peer: PeerInfo) -> bool:
        with self._lock:
            entry = self._opened.get(peer.agent_name)
            return entry is not None and entry.epoch == peer.kv_epoch

    def close(self, agent_name: str) -> None:
        with self._lock:
            self._opened.pop(agent_name, None)

    def close_all(self) -> None:
        with self._lock:
            self._opened.clear()

    # -- our segments (the transceiver forwards the KV cache's segment events) -----------------
    def add_local(self, index: int, tensor: torch.Tensor, layout: KVLayout) -> None:
        with self._lock:
            self._local = {**self._local, index: SegmentViews.of(tensor, layout)}
            self._local_mask = segment_mask(self._local)

    def remove_local(self, index: int) -> None:
        """Drops our views of the segment, so its memory goes back when the cache drops it."""
        with self._lock:
            self._local = {i: v for i, v in self._local.items() if i != index}
            self._local_mask = segment_mask(self._local)

    def _local_index(self) -> int:
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        with self._lock:
            if device.index not in self._streams:
                self._streams[device.index] = torch.cuda.Stream(device)
            return self._streams[device.index]

    def read(self, peer: PeerInfo, runs: RunTable, local_layout: KVLayout) -> int:
        """Copy the runs from the peer's mapped segments into ours; returns once the bytes are in
        place. Returns the number of slices (the IPC counterpart of descriptors). The caller has
        checked that every source block lies in a segment of the peer's epoch (all mapped here)."""
        with self._lock:
            mapped = self._opened.get(peer.agent_name)
            local, local_mask = self._local, self._local_mask
        if mapped is None or mapped.epoch != peer.kv_epoch:
            at = "not mapped" if mapped is None else f"mapped at epoch {mapped.epoch}"
            raise RuntimeError(f"{peer.worker_id}'s segments are {at}, not at epoch {peer.kv_epoch}")
        missing = missing_segments(runs.dst_first // local_layout.blocks_per_segment, local_mask)
        if missing:
            raise ValueError(f"local block ids lie in segments {missing}, which this cache does not have")
        streams = mapped.streams
        if not streams:  # CPU tensors: the copies are done when copy_runs returns
            return copy_runs(mapped.segments, local, peer.layout, local_layout, runs)
        if len(streams) == 1:  # the usual case: every segment mapped on our GPU
            with torch.cuda.stream(streams[0]):
                num = copy_runs(mapped.segments, local, peer.layout, local_layout, runs)
            streams[0].synchronize()
            return num
        contexts = [torch.cuda.stream(s) for s in streams]
        for c in contexts:
            c.__enter__()
        try:
            num = copy_runs(mapped.segments, local, peer.layout, local_layout, runs)
        finally:
            for c in reversed(contexts):
                c.__exit__(None, None, None)
        for s in streams:
            s.synchronize()
        return num
