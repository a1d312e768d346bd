"""NixlTransceiver: the default backend. One-sided NIXL (UCX) READs from the prefill worker's KV
segments straight into the decode worker's, no serialization, no copy through Python.

- One NIXL agent per transceiver, named ``<worker_id>-<random>`` so that a restarted worker is a
  new agent for its peers. No listener thread: metadata travels in PeerInfo through Ray.
- Each KV segment tensor is registered whole (register_memory) when the KVCache announces it and
  deregistered when it is removed; peers learn about the change through a newer kv_epoch.
- A read is one initialize_xfer("READ") over two descriptor lists (descriptors.py), posted, then
  polled until DONE/ERR or the deadline. The agent runs in NIXL_THREAD_SYNC_STRICT mode because
  reads of different requests run on different threads.
- Layer-wise streaming (layerwise.py) WRITEs with NIXL notifications through the same agent.
- Whole-request READs between VRAM caches of one node go through CUDA IPC instead (cuda_ipc.py)
  when transfer.cuda_ipc allows it; the path chosen for each peer, and why, is logged once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence

import numpy as np
import torch

from kv_transfer.cuda_ipc import CudaIpcReader, PathChoice, export_segment, select_path, visible_gpus
from kv_transfer.descriptors import MissingSegmentError, Run, RunTable, SegmentTable, descriptor_rows, split_rows
from kv_transfer.errors import (BackendUnavailableError, CompatMismatchError, DeadlineExceededError, PeerGoneError,
                                StalePeerError, TransferError, TransportError, UnknownPeerError)
from kv_transfer.layerwise import LayerWriter, LayerwiseReceiver, LayerwiseSender
from kv_transfer.metrics import TransferMetrics
from kv_transfer.nixl_agent import INSTALL_HINT, load_nixl, start_agent
from kv_transfer.transceiver import KVTransceiver, TransferResult
from kv_transfer.ucx_transports import UcxTransportLog
from workers.protocol import CudaIpcSegment, KVSegmentInfo, LayerwiseTarget, PeerInfo

log = logging.getLogger(__name__)

_THREAD_PIECE_BYTES = 4 << 20  # with num_threads: descriptors are cut to at most this


def _poll_sleep(num_polls: int) -> None:
    """Back off from spinning to 1 ms: completions of small reads come in microseconds, and
    spinning on a 2-core host starves the progress thread doing the copy."""
    if num_polls < 50:
        time.sleep(0)
    else:
        time.sleep(min(0.001, 0.00002 * (num_polls - 49)))


class NixlTransceiver(KVTransceiver):
    backend = "nixl"

    def __init__(self, worker_id: str, kv_cache, *, metrics: TransferMetrics | None = None, num_threads: int = 0,
                 cuda_ipc: str = "auto", progress_delay_us: int = 100):
        super().__init__(worker_id, kv_cache, metrics)
        if cuda_ipc not in ("off", "auto", "on"):
            raise ValueError(f"transfer.cuda_ipc must be off | auto | on, not {cuda_ipc!r}")
        self._cuda_ipc_mode = cuda_ipc
        self._ipc = CudaIpcReader(kv_cache.device) if kv_cache.device.type == "cuda" else None
        self._ipc_exports: dict[int, CudaIpcSegment] = {}
        self._paths: dict[str, tuple[int, PathChoice]] = {}  # peer agent -> (epoch, path chosen)
        self._peer_tables: dict[str, tuple[PeerInfo, SegmentTable]] = {}  # peer agent -> its segment addresses
        self._logged_paths: dict[str, str] = {}  # peer worker -> path last logged
        self.transports = UcxTransportLog()  # before the agent: UCX reads its log settings at load
        if kv_cache.device.type == "cuda":
            # UCX turns cuda_ipc GET (our READ) off when it finds no NVLink (one GPU, or PCIe only)
            # and then emulates the READ over TCP at ~0.5 GB/s; GET over CUDA IPC works there too.
            os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
        api = load_nixl()
        self._api = api
        from nixl._bindings import nixlRemoteDisconnectError

        self._disconnect_error = nixlRemoteDisconnectError
        self.agent_name = f"{worker_id}-{uuid.uuid4().hex[:8]}"
        config = api.nixl_agent_config(enable_prog_thread=True, enable_listen_thread=False, backends=[],
                                       sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        # num_threads > 0: NIXL's thread-pool UCX engine, which splits a request of at least
        # split_batch_size descriptors over its threads; large runs are cut into pieces
        # (split_rows) so that even a few contiguous runs spread over the threads.
        self._num_threads = num_threads
        ucx_params = {"num_threads": str(num_threads), "split_batch_size": str(num_threads)} if num_threads else {}
        try:
            self._agent = start_agent(api, self.agent_name, config, progress_delay_us)
            if "UCX" in self._agent.get_plugin_list():
                self._agent.create_backend("UCX", ucx_params)
        except Exception as e:
            raise BackendUnavailableError(f"NIXL agent could not start ({type(e).__name__}: {e}): {INSTALL_HINT}") from e
        if "UCX" not in self._agent.backends:
            raise BackendUnavailableError(f"NIXL has no UCX plugin (plugins: {self._agent.get_plugin_list()}): "
                                          f"{INSTALL_HINT}")
        self._memory_kind = "VRAM" if kv_cache.device.type == "cuda" else "DRAM"
        self._registrations: dict[int, object] = {}
        self._reported_peers: set[str] = set()
        self._notif_lock = threading.Lock()
        self._receiver = LayerwiseReceiver(self)
        self._notif_sinks = [self._receiver]  # callables(agent_name, message bytes) -> bool (consumed)
        self._layer_writer: LayerWriter | None = None
        self._cancelled: set[str] = set()  # receives the caller gave up on (cancel_layers)
        log.info("%s: NIXL agent %s, UCX backend params %s, plugin params %s, UCX env %s", worker_id,
                 self.agent_name, self._agent.get_backend_params("UCX"), self._agent.get_plugin_params("UCX"),
                 UcxTransportLog.effective_env())
        self._attach()

    # -- memory registration -------------------------------------------------------------------
    def _register_segment(self, info: KVSegmentInfo, tensor: torch.Tensor) -> None:
        self._registrations[info.index] = self._agent.register_memory(tensor)
        if self._ipc is not None:
            self._ipc.add_local(info.index, tensor, self.layout)
        if tensor.is_cuda:
            try:
                self._ipc_exports[info.index] = export_segment(info.index, tensor)
            except Exception as e:  # readers then see the missing handle and decide (cuda_ipc: on/auto)
                log.warning("%s: KV segment %d cannot be exported for CUDA IPC (%s: %s); same-node readers "
                            "use NIXL (transfer.cuda_ipc: auto) or fail (on)", self.worker_id, info.index,
                            type(e).__name__, e)

    def _cuda_ipc_exports(self) -> tuple[CudaIpcSegment, ...]:
        return tuple(self._ipc_exports[i] for i in sorted(self._ipc_exports))

    def _deregister_segment(self, info: KVSegmentInfo, tensor: torch.Tensor) -> None:
        self._ipc_exports.pop(info.index, None)
        if self._ipc is not None:
            self._ipc.remove_local(info.index)
        reg = self._registrations.pop(info.index, None)
        if reg is not None:
            self._agent.deregister_memory(reg)

    # -- peers ---------------------------------------------------------------------------------
    def _connection_metadata(self) -> bytes:
        return self._agent.get_agent_metadata()

    def _connect_peer(self, info: PeerInfo) -> None:
        try:
            name = self._agent.add_remote_agent(info.agent_metadata)
        except Exception as e:
            raise TransportError(f"NIXL could not load {info.worker_id}'s agent metadata: {e}", peer=info.worker_id) from e
        name = name.decode() if isinstance(name, bytes) else name
        if name != info.agent_name:
            self._agent.remove_remote_agent(name)
            raise TransferError(f"{info.worker_id}'s metadata names agent {name!r}, PeerInfo says {info.agent_name!r}",
                                peer=info.worker_id)

    def _disconnect_peer(self, info: PeerInfo) -> None:
        self._paths.pop(info.agent_name, None)
        self._peer_tables.pop(info.agent_name, None)
        if self._ipc is not None:
            self._ipc.close(info.agent_name)
        try:
            self._agent.remove_remote_agent(info.agent_name)
        except Exception as e:  # already gone or never loaded: nothing left to drop
            log.debug("remove_remote_agent(%s): %s", info.agent_name, e)

    # -- descriptors ---------------------------------------------------------------------------
    def descriptor_lists(self, peer: PeerInfo, runs: Sequence[Run], layers=None) -> tuple[np.ndarray, np.ndarray]:
        """(local Nx3, remote Nx3) rows for the runs (a RunTable, or a list of Run);
        StalePeerError if the peer's segment is unknown."""
        runs = RunTable.of(runs)
        try:
            local = descriptor_rows(self.layout, self._local_table, runs.dst_first, runs.count, layers)
        except MissingSegmentError as e:
            raise ValueError(f"local block ids lie in segment {e.segment}, which this cache does not have") from None
        cached = self._peer_tables.get(peer.agent_name)
        if cached is None or cached[0] is not peer:  # a PeerInfo is immutable: one table per handshake
            cached = self._peer_tables[peer.agent_name] = (peer, SegmentTable(
                {s.index: s.base_address for s in peer.segments}, {s.index: s.device_id for s in peer.segments}))
        try:
            remote = descriptor_rows(peer.layout, cached[1], runs.src_first, runs.count, layers)
        except MissingSegmentError as e:
            raise StalePeerError(f"block ids of {peer.worker_id} lie in segment {e.segment}, unknown at epoch "
                                 f"{peer.kv_epoch}: re-handshake", peer=peer.worker_id) from None
        return local, remote

    # -- transfers -----------------------------------------------------------------------------
    def post(self, op: str, peer: PeerInfo, local: np.ndarray, remote: np.ndarray, notif: bytes = b""):
        """Create and post one NIXL transfer; returns (handle, state)."""
        handle = None
        try:
            local_dl = self._agent.get_xfer_descs(local, self._memory_kind)
            remote_dl = self._agent.get_xfer_descs(remote, peer.memory_kind)
            handle = self._agent.initialize_xfer(op, local_dl, remote_dl, peer.agent_name, notif)
            return handle, self._agent.transfer(handle)
        except Exception as e:
            if handle is not None:
                self.release(handle)
            raise self._map_error(e, peer) from e

    def wait(self, handle, state: str, peer: PeerInfo, deadline: float, what: str) -> None:
        """Poll until DONE; raise DeadlineExceededError / PeerGoneError / TransportError."""
        polls = 0
        try:
            while state == "PROC":
                if time.monotonic() >= deadline:
                    raise DeadlineExceededError(f"{what} from {peer.worker_id} not done by its deadline",
                                                peer=peer.worker_id)
                _poll_sleep(polls)
                polls += 1
                state = self._agent.check_xfer_state(handle)
        except TransferError:
            raise
        except Exception as e:
            raise self._map_error(e, peer) from e
        if state != "DONE":
            raise TransportError(f"NIXL reported {state} for {what} with {peer.worker_id}", peer=peer.worker_id)

    def release(self, handle) -> None:
        try:
            self._agent.release_xfer_handle(handle)
        except Exception as e:
            # An active transfer that cannot be cancelled keeps its handle (NIXL keeps it alive and
            # retries on agent teardown); the caller's blocks may still be written: it frees them only
            # after the peer is gone or the agent is closed.
            log.error("%s: could not release a NIXL transfer handle: %s", self.worker_id, e)

    def _map_error(self, e: Exception, peer: PeerInfo) -> TransferError:
        if isinstance(e, TransferError):
            return e
        if isinstance(e, self._disconnect_error):
            return PeerGoneError(f"{peer.worker_id} ({peer.agent_name}) disconnected: {e}", peer=peer.worker_id)
        return TransportError(f"NIXL error with {peer.worker_id}: {type(e).__name__}: {e}", peer=peer.worker_id)

    def _read(self, peer: PeerInfo, runs: RunTable, deadline: float, request_id: str) -> int:
        if self._ipc is not None and self._path(peer) == "cuda_ipc":
            # device copies: done in microseconds to milliseconds, waited for without a deadline
            return self._ipc.read(peer, runs, self.layout)
        local, remote = self.descriptor_lists(peer, runs)
        if self._num_threads:
            local, remote = split_rows(local, remote, _THREAD_PIECE_BYTES)
        handle, state = self.post("READ", peer, local, remote)
        try:
            self.wait(handle, state, peer, deadline, f"READ of request {request_id or '?'}")
        finally:
            self.release(handle)
        self._report_transports(peer)
        return len(local)

    def _reads_on_loop(self, peer: str) -> bool:
        """CUDA IPC READs from a peer whose segments are mapped (its path chosen at its epoch)."""
        with self._lock:
            info = self._peers.get(peer)
            known = self._paths.get(info.agent_name) if info is not None else None
        return known is not None and known[0] == info.kv_epoch and known[1].path == "cuda_ipc"

    def _device_read_events(self, info: PeerInfo, runs: RunTable) -> tuple[int, list]:
        return self._ipc.issue_events(info, runs, self.layout)

    def _path(self, peer: PeerInfo) -> str:
        """cuda_ipc | nixl for READs from ``peer`` at its epoch (segments mapped on first use);
        logged when first chosen for a peer and whenever it changes."""
        with self._lock:
            known = self._paths.get(peer.agent_name)
        if known is not None and known[0] == peer.kv_epoch:
            return known[1].path
        choice = select_path(self._cuda_ipc_mode, self.kv_cache.device.type, self.host_id, peer, visible_gpus())
        level = logging.INFO
        if choice.path == "cuda_ipc" and not self._ipc.is_open(peer):
            try:
                self._ipc.open(peer)
            except Exception as e:
                problem = f"CUDA IPC could not map {peer.worker_id}'s KV segments ({type(e).__name__}: {e})"
                if self._cuda_ipc_mode == "on":
                    raise BackendUnavailableError(f"transfer.cuda_ipc is 'on' but {problem}; set transfer.cuda_ipc: "
                                                  "auto (NIXL then) or off", peer=peer.worker_id) from e
                choice, level = PathChoice("nixl", f"{problem}; transfer.cuda_ipc is auto: NIXL"), logging.WARNING
        with self._lock:
            self._paths[peer.agent_name] = (peer.kv_epoch, choice)
            changed = self._logged_paths.get(peer.worker_id) != choice.path
            self._logged_paths[peer.worker_id] = choice.path
        if changed:
            log.log(level, "%s: KV READs from %s (epoch %d) use %s: %s", self.worker_id, peer.worker_id,
                    peer.kv_epoch, choice.path, choice.reason)
        return choice.path

    def _report_transports(self, peer: PeerInfo) -> None:
        if peer.agent_name not in self._reported_peers:
            self._reported_peers.add(peer.agent_name)
            self.transports.report(peer.worker_id)

    def transport_info(self) -> dict[str, object]:
        with self._lock:
            paths = {name: {"epoch": epoch, "path": c.path, "reason": c.reason} for name, (epoch, c) in self._paths.items()}
        return {"backend": self.backend, "agent": self.agent_name, "nixl_backends": list(self._agent.backends),
                "nixl_ucx_params": self._agent.get_backend_params("UCX"), "cuda_ipc": self._cuda_ipc_mode,
                "read_paths": paths, **self.transports.summary()}

    # -- notifications (layer-wise streaming) --------------------------------------------------
    def send_notification(self, peer: PeerInfo, message: dict) -> None:
        try:
            self._agent.send_notif(peer.agent_name, json.dumps(message).encode())
        except Exception as e:
            raise self._map_error(e, peer) from e

    def poll_notifications(self) -> None:
        """Drain NIXL notifications and hand each to the sinks (thread-safe)."""
        with self._notif_lock:
            new = self._agent.get_new_notifs()
            for agent_name, messages in new.items():
                name = agent_name.decode() if isinstance(agent_name, bytes) else agent_name
                for msg in messages:
                    if not any(sink(name, msg) for sink in self._notif_sinks):
                        log.debug("%s: unrouted NIXL notification from %s: %r", self.worker_id, name, msg[:80])

    # -- layer-wise streaming (layerwise.py) ---------------------------------------------------
    def layer_writer(self) -> LayerWriter:
        with self._lock:
            if self._layer_writer is None:
                self._layer_writer = LayerWriter(self.worker_id)
            return self._layer_writer

    def layerwise_sender(self, target: LayerwiseTarget, src_block_ids, deadline_s: float) -> LayerwiseSender:
        """Prefill side: a sender for one request. The decode worker must be a known peer at
        target.kv_epoch or newer (ensure_peer with its PeerInfo first)."""
        with self._lock:
            peer = self._peers.get(target.worker_id)
        if target.compat_hash != self.compat_hash:
            diff = (self.layout.compat_diff(peer.layout) if peer else {}) or {
                "compat_hash": (self.compat_hash, target.compat_hash)}
            raise CompatMismatchError.from_diff(diff, target.worker_id)
        if peer is None:
            raise UnknownPeerError(f"no handshake with {target.worker_id!r}", peer=target.worker_id,
                                   request_id=target.request_id)
        if peer.kv_epoch < target.kv_epoch:
            raise StalePeerError(f"{target.worker_id} is at epoch {target.kv_epoch}, we know {peer.kv_epoch}",
                                 peer=target.worker_id, request_id=target.request_id)
        return LayerwiseSender(self, peer, target, src_block_ids, deadline_s)

    def expect_layers(self, request_id: str) -> None:
        """Decode side: start collecting layer notifications for request_id (call before the
        prefill request goes out; early notifications are kept anyway)."""
        self._receiver.expect(request_id)

    def cancel_layers(self, request_id: str, reason: str) -> None:
        """Decode side: make a pending receive_layers(request_id) fail now (TransferAbortedError,
        not counted as a failed transfer: the caller counts what made it give up)."""
        with self._lock:
            self._cancelled.add(request_id)
        if not self._receiver.cancel(request_id, reason):  # nobody waits (any more)
            with self._lock:
                self._cancelled.discard(request_id)

    def receive_layers_blocking(self, request_id: str, deadline_s: float, num_blocks: int = 0) -> TransferResult:
        """Decode side: wait until every layer of request_id has been written into our blocks."""
        start = time.perf_counter()
        try:
            arrived = self._receiver.wait(request_id, self.layout.num_layers, deadline_s)
        except TransferError as e:
            with self._lock:
                cancelled = request_id in self._cancelled
            if not cancelled:
                self.metrics.transfer_failed(e.kind)
            raise
        finally:
            with self._lock:
                self._cancelled.discard(request_id)
        seconds = time.perf_counter() - start
        num_bytes = num_blocks * self.layout.bytes_per_block_all_layers
        self.metrics.transfer_done(num_bytes, seconds, "layerwise_receive")
        return TransferResult(num_bytes, seconds, 0, tuple(arrived[layer] for layer in sorted(arrived)))

    async def receive_layers(self, request_id: str, deadline_s: float, num_blocks: int = 0) -> TransferResult:
        return await asyncio.to_thread(self.receive_layers_blocking, request_id, deadline_s, num_blocks)

    def _shutdown(self) -> None:
        if self._layer_writer is not None:
            self._layer_writer.close()
        if self._ipc is not None:
            self._ipc.close_all()
