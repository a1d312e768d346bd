"""KVTransceiver: moves KV blocks between engines in different processes. One per worker.

Contract (both backends):
- It is a SegmentListener of the worker's KVCache: every segment's memory is registered when added
  and deregistered when removed. It never allocates or frees engine blocks.
- Handshake: ``peer_info()`` on one side, ``add_peer(info)`` on the other, carried by our own
  channel (a Ray call). A PeerInfo is valid for its ``kv_epoch``; ``ensure_peer`` re-handshakes
  when a KVHandle names a newer epoch and refuses peers whose KV layout differs
  (CompatMismatchError names the fields).
- ``read(peer, remote_block_ids, local_block_ids, deadline_s)`` pulls remote block i into local
  block i, all layers, K and V, as ONE backend request, and returns only once the bytes are in
  place, or raises a TransferError subclass. After an error the local blocks hold undefined bytes
  and the caller frees them; the remote side's blocks are the remote side's business (its lease).
- Partial blocks: with ``num_tokens``, the block count must be ceil(num_tokens / block_size). Whole
  blocks are moved; slots past num_tokens in the last block carry whatever the sender had there
  and mean nothing (the reader's engine overwrites them as it appends tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kv_transfer.cuda_ipc import host_id
from kv_transfer.descriptors import (RunTable, SegmentTable, block_id_array, check_num_tokens, missing_segments,
                                     plan_runs, segment_mask)
from kv_transfer.errors import (CompatMismatchError, DeadlineExceededError, StalePeerError, TransferError,
                                UnknownPeerError)
from kv_transfer.layout import KVLayout
from kv_transfer.metrics import TransferMetrics
from workers.protocol import CudaIpcSegment, KVSegmentInfo, PeerInfo

log = logging.getLogger(__name__)
_LOOP_POLLS = 64  # a READ on the loop polls its events this many times, yielding between, then waits on a thread


def _synchronize(events) -> None:
    for e in events:
        e.synchronize()


@dataclass(frozen=True)
class TransferResult:
    num_bytes: int
    seconds: float
    num_descriptors: int  # per side: (layers * 2 * runs) for a whole-request read
    layer_times: tuple[float, ...] = ()  # layer-wise receive: unix time layer i was seen here


class KVTransceiver(ABC):
    backend: str = ""

    def __init__(self, worker_id: str, kv_cache, metrics: TransferMetrics | None = None):
        self.worker_id = worker_id
        self.kv_cache = kv_cache
        self.layout: KVLayout = kv_cache.layout
        self.compat_hash = self.layout.compat_hash()
        self.metrics = metrics or TransferMetrics(worker_id, self.backend)
        self._lock = threading.RLock()
        self._segments: dict[int, tuple[KVSegmentInfo, torch.Tensor]] = {}
        self._peers: dict[str, PeerInfo] = {}
        self._peer_segments: dict[str, np.ndarray] = {}  # worker -> segment_mask of its PeerInfo
        self._local_table = SegmentTable({}, {})  # our segments' addresses, replaced on every change
        self._closed = False
        self.host_id = host_id()

    def _attach(self) -> None:
        """Subclasses call this last in __init__: registers existing segments right away."""
        self.kv_cache.add_listener(self)

    # -- SegmentListener -----------------------------------------------------------------------
    def on_segment_added(self, index: int, tensor: torch.Tensor) -> None:
        if not tensor.is_contiguous():
            raise ValueError(f"KV segment {index} is not contiguous; cannot register it")
        info = KVSegmentInfo(index=index, base_address=tensor.data_ptr(),
                             num_bytes=tensor.numel() * tensor.element_size(),
                             device_id=(tensor.device.index or 0) if tensor.is_cuda else 0)
        with self._lock:
            self._register_segment(info, tensor)
            self._segments[index] = (info, tensor)
            self._local_table = self._segment_table()

    def on_segment_removed(self, index: int) -> None:
        with self._lock:
            info, tensor = self._segments.pop(index)
            self._local_table = self._segment_table()
            self._deregister_segment(info, tensor)

    # -- handshake -----------------------------------------------------------------------------
    def peer_info(self) -> PeerInfo:
        """Our handshake. Its kv_epoch always describes exactly its segments: KVCache bumps the
        epoch and tells listeners in separate steps, so we snapshot only when our registrations
        match the cache's segment set and the epoch did not move meanwhile."""
        memory_kind = "VRAM" if self.kv_cache.device.type == "cuda" else "DRAM"
        for _ in range(1000):
            epoch = self.kv_cache.epoch
            with self._lock:
                segments = tuple(info for info, _ in sorted(self._segments.values(), key=lambda it: it[0].index))
                metadata = self._connection_metadata()
                exports = self._cuda_ipc_exports()
            try:
                cache_indices = set(list(self.kv_cache.segments))
            except RuntimeError:  # resized while we looked
                continue
            if cache_indices == {s.index for s in segments} and self.kv_cache.epoch == epoch:
                return PeerInfo(worker_id=self.worker_id, backend=self.backend, agent_name=self.agent_name,
                                agent_metadata=metadata, memory_kind=memory_kind, segments=segments,
                                layout=self.layout, compat_hash=self.compat_hash, kv_epoch=epoch,
                                tcp_address=self._tcp_address(), host_id=self.host_id, cuda_ipc=exports)
            time.sleep(0.001)
        raise TransferError(f"{self.worker_id}: KV segments kept changing; no consistent handshake")

    def add_peer(self, info: PeerInfo) -> None:
        """Accept a peer's handshake (replacing an older one from the same worker)."""
        diff = self.layout.compat_diff(info.layout)
        if info.backend != self.backend:
            diff["backend"] = (self.backend, info.backend)
        if info.compat_hash != info.layout.compat_hash():
            diff["compat_hash"] = (info.layout.compat_hash(), info.compat_hash)
        if diff:
            self.metrics.transfer_failed(CompatMismatchError.kind)
            raise CompatMismatchError.from_diff(diff, info.worker_id)
        with self._lock:
            old = self._peers.pop(info.worker_id, None)
            if old is not None:
                self._disconnect_peer(old)
            self._connect_peer(info)
            self._peers[info.worker_id] = info
            self._peer_segments[info.worker_id] = segment_mask(s.index for s in info.segments)
        log.info("%s: handshake with %s (%s, epoch %d, %d segments)", self.worker_id, info.worker_id,
                 info.agent_name, info.kv_epoch, len(info.segments))

    def remove_peer(self, worker_id: str) -> None:
        with self._lock:
            info = self._peers.pop(worker_id, None)
            self._peer_segments.pop(worker_id, None)
            if info is not None:
                self._disconnect_peer(info)

    def known_epoch(self, worker_id: str) -> int | None:
        with self._lock:
            info = self._peers.get(worker_id)
            return None if info is None else info.kv_epoch

    def needs_handshake(self, worker_id: str, kv_epoch: int) -> bool:
        known = self.known_epoch(worker_id)
        return known is None or known < kv_epoch

    async def ensure_peer(self, worker_id: str, kv_epoch: int, compat_hash: str,
                          fetch_peer_info: Callable[[], object]) -> None:
        """Handshake with ``worker_id`` unless we hold its PeerInfo for ``kv_epoch`` or newer.
        ``fetch_peer_info()`` returns a PeerInfo or an awaitable of one (e.g. a Ray ObjectRef).
        A compat hash that differs from ours is refused after fetching the PeerInfo, so the
        error can name the differing fields."""
        if compat_hash == self.compat_hash and not self.needs_handshake(worker_id, kv_epoch):
            return
        info = fetch_peer_info()
        if inspect.isawaitable(info):
            info = await info
        self._accept_fetched(worker_id, kv_epoch, info)

    def ensure_peer_blocking(self, worker_id: str, kv_epoch: int, compat_hash: str,
                             fetch_peer_info: Callable[[], PeerInfo]) -> None:
        if compat_hash == self.compat_hash and not self.needs_handshake(worker_id, kv_epoch):
            return
        self._accept_fetched(worker_id, kv_epoch, fetch_peer_info())

    def _accept_fetched(self, worker_id: str, kv_epoch: int, info: PeerInfo) -> None:
        if not isinstance(info, PeerInfo) or info.worker_id != worker_id:
            raise TransferError(f"handshake with {worker_id!r} returned {type(info).__name__} "
                                f"for {getattr(info, 'worker_id', '?')!r}", peer=worker_id)
        if info.kv_epoch < kv_epoch:
            raise StalePeerError(f"{worker_id} sent PeerInfo of epoch {info.kv_epoch}, older than the handle's "
                                 f"{kv_epoch}", peer=worker_id)
        self.add_peer(info)

    # -- reads ---------------------------------------------------------------------------------
    async def read(self, peer: str, remote_block_ids: Sequence[int], local_block_ids: Sequence[int],
                   deadline_s: float, *, num_tokens: int | None = None, request_id: str = "") -> TransferResult:
        """``read_blocking`` on a worker thread, so the caller's event loop keeps running; except a
        READ that is device copies (``_device_read_events``: CUDA IPC from a mapped peer), which is
        issued on the loop itself and awaited by polling its events, yielding to the loop between
        polls (a thread per READ made 8 concurrent same-GPU READs 0.12-0.28 of a device copy on an
        H200 host: each thread waits to take the GIL back after every wait; benchmarks/README.md)."""
        if self._reads_on_loop(peer):
            info, runs, num_bytes = self._prepare_read(peer, remote_block_ids, local_block_ids, deadline_s, num_tokens,
                                                       request_id)
            start = time.perf_counter()
            with self._counting_failures(peer, request_id):
                num_descs, events = self._device_read_events(info, runs)
                polls = 0
                while not all(e.query() for e in events):
                    polls += 1  # copies take microseconds to a few milliseconds: poll, then wait off the loop
                    await (asyncio.sleep(0) if polls < _LOOP_POLLS else asyncio.to_thread(_synchronize, events))
            return self._read_done(num_bytes, time.perf_counter() - start, num_descs)
        return await asyncio.to_thread(self.read_blocking, peer, remote_block_ids, local_block_ids, deadline_s,
                                       num_tokens=num_tokens, request_id=request_id)

    def read_blocking(self, peer: str, remote_block_ids: Sequence[int], local_block_ids: Sequence[int],
                      deadline_s: float, *, num_tokens: int | None = None, request_id: str = "") -> TransferResult:
        """Copy remote block i -> local block i (all layers, K and V) as one backend request.
        The ids may be lists, tuples, ranges or integer numpy arrays; they are converted once
        (descriptors.block_id_array) and the rest of the planning is a fixed number of numpy calls."""
        info, runs, num_bytes = self._prepare_read(peer, remote_block_ids, local_block_ids, deadline_s, num_tokens,
                                                   request_id)
        start = time.perf_counter()
        with self._counting_failures(peer, request_id):
            num_descs = self._read(info, runs, time.monotonic() + deadline_s, request_id)
        return self._read_done(num_bytes, time.perf_counter() - start, num_descs)

    def _prepare_read(self, peer: str, remote_block_ids, local_block_ids, deadline_s: float, num_tokens: int | None,
                      request_id: str) -> tuple[PeerInfo, RunTable, int]:
        """The READ's checks and plan: (the peer, its runs, its bytes); raises before anything moves."""
        remote_ids, local_ids = block_id_array(remote_block_ids), block_id_array(local_block_ids)
        if len(remote_ids) == 0:
            raise ValueError("read of zero blocks")
        if deadline_s <= 0:
            self.metrics.transfer_failed(DeadlineExceededError.kind)
            raise DeadlineExceededError(f"read from {peer} has no time left (deadline_s={deadline_s:.3f})",
                                        peer=peer, request_id=request_id)
        check_num_tokens(self.layout, len(remote_ids), num_tokens)
        with self._lock:
            info = self._peers.get(peer)
            known = self._peer_segments.get(peer)
        if info is None:
            self.metrics.transfer_failed(UnknownPeerError.kind)
            raise UnknownPeerError(f"no handshake with {peer!r}: ensure_peer/add_peer first", peer=peer,
                                   request_id=request_id)
        runs = plan_runs(remote_ids, local_ids, info.layout.blocks_per_segment, self.layout.blocks_per_segment)
        unknown = missing_segments(runs.src_first // info.layout.blocks_per_segment, known)  # runs stay in a segment
        if unknown:  # blocks of a segment added after our handshake: its memory is unknown to us
            self.metrics.transfer_failed(StalePeerError.kind)
            raise StalePeerError(f"blocks of {peer} lie in segments {unknown}, unknown at its epoch "
                                 f"{info.kv_epoch}: re-handshake", peer=peer, request_id=request_id)
        return info, runs, len(remote_ids) * self.layout.bytes_per_block_all_layers

    @contextlib.contextmanager
    def _counting_failures(self, peer: str, request_id: str):
        """A TransferError out of the READ names its peer and request and is counted."""
        try:
            yield
        except TransferError as e:
            e.peer, e.request_id = e.peer or peer, e.request_id or request_id
            self.metrics.transfer_failed(e.kind)
            raise

    def _read_done(self, num_bytes: int, seconds: float, num_descs: int) -> TransferResult:
        self.metrics.transfer_done(num_bytes, seconds, "read")
        return TransferResult(num_bytes, seconds, num_descs)

    def _reads_on_loop(self, peer: str) -> bool:
        """Whether READs from ``peer`` are device copies that ``read`` issues on the caller's loop."""
        return False

    def _device_read_events(self, info: PeerInfo, runs: RunTable) -> tuple[int, list]:
        """Issue the READ as device copies: (slices, events that complete with them)."""
        raise NotImplementedError

    # -- observability and shutdown ------------------------------------------------------------
    def counters(self) -> dict[str, float]:
        return self.metrics.counters()

    def transport_info(self) -> dict[str, object]:
        return {"backend": self.backend}

    def close(self) -> None:
        """Stop listening to the cache, drop peers, deregister memory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.kv_cache.remove_listener(self)
            except ValueError:
                pass
            for info in list(self._peers.values()):
                self._disconnect_peer(info)
            self._peers.clear()
            self._peer_segments.clear()
            for index in list(self._segments):
                info, tensor = self._segments.pop(index)
                self._deregister_segment(info, tensor)
            self._shutdown()

    # -- what a backend provides ---------------------------------------------------------------
    agent_name: str = ""

    def _segment_table(self) -> SegmentTable:
        """Our segments' addresses (caller holds the lock)."""
        return SegmentTable({i: s.base_address for i, (s, _) in self._segments.items()},
                            {i: s.device_id for i, (s, _) in self._segments.items()})

    @abstractmethod
    def _register_segment(self, info: KVSegmentInfo, tensor: torch.Tensor) -> None: ...

    @abstractmethod
    def _deregister_segment(self, info: KVSegmentInfo, tensor: torch.Tensor) -> None: ...

    @abstractmethod
    def _connection_metadata(self) -> bytes: ...

    def _tcp_address(self) -> str:
        return ""

    def _cuda_ipc_exports(self) -> tuple[CudaIpcSegment, ...]:
        """VRAM segments exported for same-node readers (caller holds the lock)."""
        return ()

    @abstractmethod
    def _connect_peer(self, info: PeerInfo) -> None: ...

    @abstractmethod
    def _disconnect_peer(self, info: PeerInfo) -> None: ...

    @abstractmethod
    def _read(self, peer: PeerInfo, runs: RunTable, deadline: float, request_id: str) -> int:
        """Move the runs (deadline is time.monotonic()); return descriptors per side."""

    def _shutdown(self) -> None:
        pass
