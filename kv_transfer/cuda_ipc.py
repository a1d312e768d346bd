"""CUDA IPC between the KV transceivers of one node: the reader maps the peer's VRAM segments into
its own address space once per peer epoch and READs blocks with device copies on its own stream.
NIXL stays the path across nodes, for host memory, and for layer-wise WRITEs (which need its
notifications).

    exporter, when a VRAM segment is added    export_segment() -> CudaIpcSegment (into PeerInfo)
    reader, once per (peer agent, kv_epoch)    CudaIpcReader.open(peer): every segment mapped here
    reader, per KV segment of its own          CudaIpcReader.add_local() / remove_local()
    reader, per READ                           CudaIpcReader.read(): copy_runs on the reader's stream,
                                               synchronized before it returns; or issue() for several
                                               READs in flight, then synchronize() once

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

import torch

from kv_transfer.block_copy import SegmentSet, SegmentViews, copy_runs, warm_up
from kv_transfer.descriptors import RunTable, missing_segments
from kv_transfer.errors import BackendUnavailableError
from kv_transfer.layout import KVLayout
from workers.protocol import CudaIpcSegment, PeerInfo

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class _Mapped:
    """One peer agent's segments as this reader holds them, valid for ``epoch`` only."""
    epoch: int
    layout: KVLayout  # the peer's
    segments: SegmentSet
    streams: tuple[torch.cuda.Stream, ...]  # the other GPUs' first, ours last; () for CPU tensors
    stream_ids: tuple[tuple[int, int, int], ...]  # each stream as (stream_id, device_index, device_type)


def _enter_streams(stream_ids: tuple[tuple[int, int, int], ...]) -> tuple[int, list]:
    """Make each stream current on its device (ours last, so ours is the current device after);
    returns what _exit_streams needs to put the previous state back. torch.cuda.stream() does the
    same through Python that costs several microseconds a READ; these are the C calls it makes
    (torch._C._cuda_setStream also makes the stream's device current)."""
    device = torch._C._cuda_getDevice()
    previous = [torch._C._cuda_getCurrentStream(dev) for _, dev, _ in stream_ids]
    for sid, dev, kind in stream_ids:
        torch._C._cuda_setStream(stream_id=sid, device_index=dev, device_type=kind)
    return device, previous


def _exit_streams(state: tuple[int, list]) -> None:
    device, previous = state
    for sid, dev, kind in reversed(previous):
        torch._C._cuda_setStream(stream_id=sid, device_index=dev, device_type=kind)
    if torch._C._cuda_getDevice() != device:
        torch._C._cuda_setDevice(device)


class CudaIpcReader:
    """The peers' segments mapped into this process, per peer agent and epoch, and our own
    segments' views. Every view and stream a READ needs is made before the READ (open,
    add_local); a READ takes no lock and, for one run of blocks, makes one copy launch.

        read(peer, runs, layout)      copies issued on the reader's streams, waited for
        issue(peer, runs, layout)     copies issued, not waited for (several READs in flight) ...
        synchronize(peer)             ... until this returns: every READ issued from ``peer`` is done

    On a CPU ``device`` (tests, benchmarks/read_host_cost.py) the same code copies between CPU
    tensors handed to ``adopt``, synchronously, with no streams."""

    def __init__(self, device: torch.device):
        self.device = device
        self._lock = threading.Lock()  # serialises changes; READs read the immutable snapshots
        self._opened: dict[str, _Mapped] = {}  # peer agent -> its segments at one epoch
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._ours = SegmentSet({})  # replaced whole on every change: a READ reads one snapshot, no lock

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
        views = SegmentSet({i: SegmentViews.of(t, peer.layout) for i, t in segments.items()})
        streams: tuple[torch.cuda.Stream, ...] = ()
        if any(t.is_cuda for t in segments.values()):
            ours = torch.device("cuda", self._local_index())
            others = sorted({t.device for t in segments.values()} - {ours}, key=lambda d: d.index)
            streams = tuple(self._stream(d) for d in [*others, ours])  # ours last: the current device
        ids = tuple((s.stream_id, s.device_index, s.device_type) for s in streams)
        with self._lock:
            self._opened = {**self._opened, peer.agent_name: _Mapped(peer.kv_epoch, peer.layout, views, streams, ids)}

    def is_open(self, peer: PeerInfo) -> bool:
        entry = self._opened.get(peer.agent_name)
        return entry is not None and entry.epoch == peer.kv_epoch

    def close(self, agent_name: str) -> None:
        with self._lock:
            self._opened = {k: v for k, v in self._opened.items() if k != agent_name}

    def close_all(self) -> None:
        with self._lock:
            self._opened = {}

    # -- our segments (the transceiver forwards the KV cache's segment events) -----------------
    def add_local(self, index: int, tensor: torch.Tensor, layout: KVLayout) -> None:
        with self._lock:
            first = not len(self._ours)
            self._ours = SegmentSet({**self._ours, index: SegmentViews.of(tensor, layout)})
            ours = self._ours
        if first and tensor.is_cuda:  # at start-up, not in the first READ that needs the kernel
            try:
                warm_up(ours)
            except Exception as e:  # the first such READ compiles it instead (and raises if it cannot)
                log.warning("block-table copy kernel did not compile at start-up: %s: %s", type(e).__name__, e)

    def remove_local(self, index: int) -> None:
        """Drops our views of the segment, so its memory goes back when the cache drops it."""
        with self._lock:
            self._ours = SegmentSet({i: v for i, v in self._ours.items() if i != index})

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
        mapped = self._mapped(peer)
        num = self._issue(mapped, runs, local_layout)
        for s in mapped.streams:
            s.synchronize()
        return num

    def issue(self, peer: PeerInfo, runs: RunTable, local_layout: KVLayout) -> int:
        """``read`` without the wait: the copies are queued on the reader's streams behind every
        READ issued before, and the bytes are in place once ``synchronize(peer)`` returns (on CPU
        tensors, already when this returns). The caller keeps the blocks of both sides pinned
        until then. Errors are raised before any copy is queued, as in ``read``."""
        return self._issue(self._mapped(peer), runs, local_layout)

    def issue_events(self, peer: PeerInfo, runs: RunTable, local_layout: KVLayout) -> tuple[int, list]:
        """``issue``, and an event recorded on each of the reader's streams after the copies:
        (slices, events); the bytes are in place once every event has completed (no events:
        CPU tensors, already copied)."""
        mapped = self._mapped(peer)
        num = self._issue(mapped, runs, local_layout)
        return num, [s.record_event() for s in mapped.streams]

    def synchronize(self, peer: PeerInfo) -> None:
        """Wait for every copy issued from ``peer``'s segments (its streams are shared with every
        peer mapped on the same GPUs: this waits for their READs too)."""
        for s in self._mapped(peer).streams:
            s.synchronize()

    def _mapped(self, peer: PeerInfo) -> _Mapped:
        mapped = self._opened.get(peer.agent_name)  # one dict lookup in a snapshot: no lock needed
        if mapped is None or mapped.epoch != peer.kv_epoch:
            at = "not mapped" if mapped is None else f"mapped at epoch {mapped.epoch}"
            raise RuntimeError(f"{peer.worker_id}'s segments are {at}, not at epoch {peer.kv_epoch}")
        return mapped

    def _issue(self, mapped: _Mapped, runs: RunTable, local_layout: KVLayout) -> int:
        ours = self._ours
        if len(runs.dst_first) == 1:  # one run (contiguous ids): its one segment, without numpy
            seg = runs.dst_first[0].item() // local_layout.blocks_per_segment
            missing = [] if seg in ours else [seg]
        else:
            missing = missing_segments(runs.dst_first // local_layout.blocks_per_segment, ours.mask)
        if missing:
            raise ValueError(f"local block ids lie in segments {missing}, which this cache does not have")
        if not mapped.streams:  # CPU tensors: the copies are done when copy_runs returns
            return copy_runs(mapped.segments, ours, mapped.layout, local_layout, runs)
        state = _enter_streams(mapped.stream_ids)
        try:
            return copy_runs(mapped.segments, ours, mapped.layout, local_layout, runs)
        finally:
            _exit_streams(state)
