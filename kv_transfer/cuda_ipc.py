"""CUDA IPC between the KV transceivers of one node: the reader maps the peer's VRAM segments into
its own address space once per peer epoch and READs blocks with device copies on its own stream.
NIXL stays the path across nodes, for host memory, and for layer-wise WRITEs (which need its
notifications).

    exporter, when a VRAM segment is added    export_segment() -> CudaIpcSegment (into PeerInfo)
    reader, once per (peer agent, kv_epoch)    CudaIpcReader.open(peer): every segment mapped here
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kv_transfer.descriptors import Run, segment_slices
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


def _run_view(flat: torch.Tensor, layout: KVLayout, first_local: int, count: int) -> torch.Tensor:
    """The (layer, kv) slices of one run of a segment as one strided 2-D view: row = (layer, kv),
    ``count`` blocks long; rows lie ``blocks_per_segment`` blocks apart (kv_transfer/layout.py)."""
    dtype, w = _word(layout.block_bytes)
    bb = layout.block_bytes // w
    rows = flat.view(dtype).view(2 * layout.num_layers, layout.blocks_per_segment * bb)
    return rows[:, first_local * bb:(first_local + count) * bb]


def copy_runs(src: Mapping[int, torch.Tensor], dst: Mapping[int, torch.Tensor], src_layout: KVLayout,
              dst_layout: KVLayout, runs: Sequence[Run], max_slice_copies: int = MAX_SLICE_COPIES,
              max_strided_runs: int = MAX_STRIDED_RUNS) -> int:
    """Copy src block r.src_first + i -> dst block r.dst_first + i (all layers, K and V) for every
    run. ``src``/``dst`` map segment index -> that segment as a flat uint8 tensor. Returns the
    number of (layer, kv, run) slices. Asynchronous on the current streams of the tensors' devices.

    Few slices: one copy each (a memcpy at copy-engine speed). Few runs: one strided copy per run
    (one kernel for all its layers). Many runs (scattered blocks): per (source segment, destination
    segment) pair, one gather of whole blocks and one scatter."""
    num_slices = 2 * src_layout.num_layers * len(runs)
    if num_slices <= max_slice_copies:  # few big slices: offsets by hand (numpy costs more here)
        sb, db = src_layout.block_bytes, dst_layout.block_bytes
        for r in runs:
            s_seg, s_local = divmod(r.src_first, src_layout.blocks_per_segment)
            d_seg, d_local = divmod(r.dst_first, dst_layout.blocks_per_segment)
            n = r.count * sb
            for lkv in range(2 * src_layout.num_layers):
                a = (lkv * src_layout.blocks_per_segment + s_local) * sb
                b = (lkv * dst_layout.blocks_per_segment + d_local) * db
                dst[d_seg][b:b + n].copy_(src[s_seg][a:a + n], non_blocking=True)
        return num_slices
    if len(runs) <= max_strided_runs:
        # (segments on two devices without peer access: torch stages a strided copy between them)
        s_bps, d_bps = src_layout.blocks_per_segment, dst_layout.blocks_per_segment
        for r in runs:
            s_seg, s_local = divmod(r.src_first, s_bps)
            d_seg, d_local = divmod(r.dst_first, d_bps)
            _run_view(dst[d_seg], dst_layout, d_local, r.count).copy_(
                _run_view(src[s_seg], src_layout, s_local, r.count), non_blocking=True)
        return num_slices
    s_seg, s_off, nbytes = segment_slices(src_layout, [r.src_first for r in runs], [r.count for r in runs])
    d_seg, d_off, _ = segment_slices(dst_layout, [r.dst_first for r in runs], [r.count for r in runs])
    bb = src_layout.block_bytes
    rows = nbytes // bb  # blocks per slice
    first = np.repeat(np.cumsum(rows) - rows, rows)
    within = np.arange(int(rows.sum())) - first  # block index inside its slice
    s_rows = np.repeat(s_off // bb, rows) + within  # row = block-sized piece of the flat segment
    d_rows = np.repeat(d_off // bb, rows) + within
    s_segs, d_segs = np.repeat(s_seg, rows), np.repeat(d_seg, rows)
    word, w = _word(bb)
    for ss, ds in sorted(set(zip(s_segs.tolist(), d_segs.tolist()))):
        pick = (s_segs == ss) & (d_segs == ds)
        src_view = src[ss].view(word).view(-1, bb // w)
        dst_view = dst[ds].view(word).view(-1, src_view.shape[1])
        s_idx = torch.from_numpy(s_rows[pick]).to(src_view.device, non_blocking=True)
        d_idx = torch.from_numpy(d_rows[pick]).to(dst_view.device, non_blocking=True)
        gathered = src_view.index_select(0, s_idx)
        if gathered.device != dst_view.device:
            gathered = gathered.to(dst_view.device, non_blocking=True)
        dst_view.index_copy_(0, d_idx, gathered)
    return num_slices


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(-1).view(torch.uint8)


class CudaIpcReader:
    """The peers' segments mapped into this process, per peer agent and epoch."""

    def __init__(self, device: torch.device):
        self.device = device
        self._lock = threading.Lock()
        # agent -> (epoch, segments, the GPUs other than ours that some of them are mapped on)
        self._opened: dict[str, tuple[int, dict[int, torch.Tensor], tuple[torch.device, ...]]] = {}
        self._streams: dict[int, torch.cuda.Stream] = {}

    def open(self, peer: PeerInfo) -> None:
        """Map every segment of ``peer`` (at its epoch). Raises what CUDA/torch raise."""
        local = self.device.index if self.device.index is not None else torch.cuda.current_device()
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
            segments[seg.index] = flat_bytes(t)
        others = tuple(sorted({t.device for t in segments.values()} - {torch.device("cuda", local)},
                              key=lambda d: d.index))
        with self._lock:
            self._opened[peer.agent_name] = (peer.kv_epoch, segments, others)

    def is_open(self, peer: PeerInfo) -> bool:
        with self._lock:
            entry = self._opened.get(peer.agent_name)
            return entry is not None and entry[0] == peer.kv_epoch

    def close(self, agent_name: str) -> None:
        with self._lock:
            self._opened.pop(agent_name, None)

    def close_all(self) -> None:
        with self._lock:
            self._opened.clear()

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        with self._lock:
            if device.index not in self._streams:
                self._streams[device.index] = torch.cuda.Stream(device)
            return self._streams[device.index]

    def read(self, peer: PeerInfo, runs: Sequence[Run], local_layout: KVLayout,
             local_segments: Mapping[int, torch.Tensor]) -> int:
        """Copy the runs from the peer's mapped segments into ours; returns once the bytes are in
        place. Returns the number of slices (the IPC counterpart of descriptors)."""
        with self._lock:
            epoch, remote, others = self._opened[peer.agent_name]
        if epoch != peer.kv_epoch:
            raise RuntimeError(f"{peer.worker_id}'s segments are mapped at epoch {epoch}, not {peer.kv_epoch}")
        dst = {i: flat_bytes(t) for i, t in local_segments.items()}
        local = self._stream(self.device if self.device.index is not None
                             else torch.device("cuda", torch.cuda.current_device()))
        if not others:  # the usual case: every segment mapped on our GPU
            with torch.cuda.stream(local):
                num = copy_runs(remote, dst, peer.layout, local_layout, runs)
            local.synchronize()
            return num
        streams = [self._stream(d) for d in others] + [local]  # ours last: the current device
        contexts = [torch.cuda.stream(s) for s in streams]
        for c in contexts:
            c.__enter__()
        try:
            num = copy_runs(remote, dst, peer.layout, local_layout, runs)
        finally:
            for c in reversed(contexts):
                c.__exit__(None, None, None)
        for s in streams:
            s.synchronize()
        return num
