"""TcpTransceiver: the backend that needs no NIXL, chosen only by ``transfer.backend: tcp``.

Why TCP sockets rather than Ray's object store: the reader pulls exactly like a NIXL READ (the
prefill worker's engine and event loop are not involved: a server thread streams straight from
the segment tensors, and the reader ``recv_into``s straight into its own blocks: one kernel copy
per side, no pickling, no object-store put/get copies, nothing left to garbage-collect), it works
in plain processes without Ray, and socket timeouts give the same deadline semantics.

Wire protocol (one connection per read; the server serves in descriptor order, descriptors.py):
    reader -> server   u32 length, JSON {"token": hex, "runs": [[first_block, count], ...]}
    server -> reader   u8 status; 0: then exactly sum(count) * bytes_per_block_all_layers bytes
                       in (layer, kv, run) order; else u32 length + UTF-8 error message
The token (PeerInfo.agent_metadata) keeps other local processes from reading KV memory.
CUDA segments are staged through host memory on both sides.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import socket
import struct
import threading
import time
import uuid

import torch

from kv_transfer.descriptors import Run
from kv_transfer.errors import DeadlineExceededError, PeerGoneError, StalePeerError, TransportError
from kv_transfer.metrics import TransferMetrics
from kv_transfer.transceiver import KVTransceiver
from workers.protocol import KVSegmentInfo, PeerInfo

log = logging.getLogger(__name__)

_OK, _ERROR, _STALE = 0, 1, 2
_MAX_REQUEST_BYTES = 16 << 20


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes (same memory)."""
    return tensor.view(torch.uint8).reshape(-1)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while len(view):
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionResetError("peer closed the connection")
        view = view[n:]


class TcpTransceiver(KVTransceiver):
    backend = "tcp"

    def __init__(self, worker_id: str, kv_cache, *, host: str = "127.0.0.1", port: int = 0,
                 metrics: TransferMetrics | None = None):
        super().__init__(worker_id, kv_cache, metrics)
        self.agent_name = f"tcp-{worker_id}-{uuid.uuid4().hex[:8]}"
        self._token = secrets.token_bytes(16)
        self._server = socket.create_server((host, port), backlog=64)
        self._address = f"{host}:{self._server.getsockname()[1]}"
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"kv-tcp-{worker_id}", daemon=True)
        self._accept_thread.start()
        log.info("%s: TCP KV block server on %s", worker_id, self._address)
        self._attach()

    # -- registration: nothing to register, the server reads the tensors directly --------------
    def _register_segment(self, info: KVSegmentInfo, tensor: torch.Tensor) -> None:
        pass

    def _deregister_segment(self, info: KVSegmentInfo, tensor: torch.Tensor) -> None:
        pass

    def _connection_metadata(self) -> bytes:
        return self._token

    def _tcp_address(self) -> str:
        return self._address

    def _connect_peer(self, info: PeerInfo) -> None:
        if not info.tcp_address:
            raise TransportError(f"{info.worker_id} sent no tcp_address", peer=info.worker_id)

    def _disconnect_peer(self, info: PeerInfo) -> None:
        pass

    def transport_info(self) -> dict[str, object]:
        return {"backend": self.backend, "address": self._address}

    # -- reader --------------------------------------------------------------------------------
    def _read(self, peer: PeerInfo, runs: list[Run], deadline: float, request_id: str) -> int:
        with self._lock:
            segments = {i: t for i, (_, t) in self._segments.items()}
        # destination byte ranges in wire order: (layer, kv, run)
        dests = []
        for layer in range(self.layout.num_layers):
            for kv in (0, 1):
                for run in runs:
                    seg, local = self.layout.locate(run.dst_first)
                    if seg not in segments:
                        raise ValueError(f"local block {run.dst_first} lies in segment {seg}, which this cache does not have")
                    start = self.layout.offset(layer, kv, local)
                    dests.append((segments[seg], start, run.count * self.layout.block_bytes))
        body = json.dumps({"token": self._peer_token(peer).hex(), "runs": [[r.src_first, r.count] for r in runs]}).encode()
        host, port = peer.tcp_address.rsplit(":", 1)
        what = f"TCP read of request {request_id or '?'} from {peer.worker_id}"
        try:
            with socket.create_connection((host, int(port)), timeout=self._remaining(deadline, what)) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(struct.pack("!I", len(body)) + body)
                status = bytearray(1)
                self._recv(sock, memoryview(status), deadline, what)
                if status[0] != _OK:
                    size = bytearray(4)
                    self._recv(sock, memoryview(size), deadline, what)
                    message = bytearray(struct.unpack("!I", size)[0])
                    self._recv(sock, memoryview(message), deadline, what)
                    cls = StalePeerError if status[0] == _STALE else TransportError
                    raise cls(f"{peer.worker_id} refused the read: {message.decode()}", peer=peer.worker_id)
                for tensor, start, num_bytes in dests:
                    if tensor.is_cuda:
                        staging = torch.empty(num_bytes, dtype=torch.uint8)
                        self._recv(sock, memoryview(staging.numpy()), deadline, what)
                        _byte_view(tensor)[start:start + num_bytes].copy_(staging)
                    else:
                        dst = _byte_view(tensor)[start:start + num_bytes].numpy()
                        self._recv(sock, memoryview(dst), deadline, what)
        except (ConnectionError, EOFError) as e:
            raise PeerGoneError(f"{what}: connection lost ({type(e).__name__}: {e})", peer=peer.worker_id) from e
        except socket.timeout as e:
            raise DeadlineExceededError(f"{what} not done by its deadline", peer=peer.worker_id) from e
        except OSError as e:
            raise TransportError(f"{what}: {type(e).__name__}: {e}", peer=peer.worker_id) from e
        return len(dests)

    def _peer_token(self, peer: PeerInfo) -> bytes:
        return peer.agent_metadata

    @staticmethod
    def _remaining(deadline: float, what: str) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout(what)
        return remaining

    def _recv(self, sock: socket.socket, view: memoryview, deadline: float, what: str) -> None:
        while len(view):
            sock.settimeout(self._remaining(deadline, what))
            n = sock.recv_into(view)
            if n == 0:
                raise ConnectionResetError("peer closed the connection")
            view = view[n:]

    # -- server --------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # server socket closed
            threading.Thread(target=self._serve, args=(conn,), name="kv-tcp-serve", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(30)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                size = bytearray(4)
                _recv_exact(conn, memoryview(size))
                length = struct.unpack("!I", size)[0]
                if length > _MAX_REQUEST_BYTES:
                    return self._refuse(conn, _ERROR, f"request of {length} bytes is too large")
                body = bytearray(length)
                _recv_exact(conn, memoryview(body))
                request = json.loads(body)
                if not hmac.compare_digest(bytes.fromhex(request.get("token", "")), self._token):
                    return self._refuse(conn, _ERROR, "bad token")
                runs = [(int(first), int(count)) for first, count in request["runs"]]
                with self._lock:  # references keep the segments' memory alive while we send
                    segments = {i: t for i, (_, t) in self._segments.items()}
                sources = []
                for layer in range(self.layout.num_layers):
                    for kv in (0, 1):
                        for first, count in runs:
                            seg, local = self.layout.locate(first)
                            if seg not in segments or count < 1 or local + count > self.layout.blocks_per_segment:
                                return self._refuse(conn, _STALE, f"blocks {first}..{first + count - 1} are not in "
                                                                  f"one live segment (epoch {self.kv_cache.epoch})")
                            start = self.layout.offset(layer, kv, local)
                            sources.append(_byte_view(segments[seg])[start:start + count * self.layout.block_bytes])
                conn.sendall(bytes([_OK]))
                for src in sources:
                    conn.sendall(memoryview((src.cpu() if src.is_cuda else src).numpy()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("%s: TCP KV read request failed: %s: %s", self.worker_id, type(e).__name__, e)

    @staticmethod
    def _refuse(conn: socket.socket, status: int, message: str) -> None:
        data = message.encode()
        conn.sendall(bytes([status]) + struct.pack("!I", len(data)) + data)

    def _shutdown(self) -> None:
        # close() alone does not wake a thread blocked in accept() on Linux (close waited out the
        # join's 5 s every time); shutdown() does: accept() raises and the loop returns
        try:
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not listening any more
        self._server.close()
        self._accept_thread.join(timeout=5)
        if self._accept_thread.is_alive():
            log.warning("%s: the TCP KV server thread did not stop within 5 s", self.worker_id)
