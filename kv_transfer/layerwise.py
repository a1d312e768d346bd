"""Layer-wise streaming over NIXL: the prefill side WRITEs layer L of a request's KV into the
decode worker's blocks as soon as its forward pass has finished layer L, so moving early layers
overlaps computing later ones.

    decode                                     prefill
    allocate blocks, expect_layers(rid)
    --PrefillRequest + LayerwiseTarget-->      ensure_peer(decode)   (reverse handshake)
                                               sender = layerwise_sender(target, src_block_ids)
                                               forward: after layer L -> sender.layer_done(L)
                                                   writer thread: WRITE layer L (K and V, all runs)
                                                   with notification {"rid", "layer": L}
    receive_layers(rid, deadline) <--notif---  ...
    returns when all num_layers arrived        sender.finish() -> every WRITE completed
                                               (then frees its own blocks as usual)

Ownership: the decode worker owns its blocks throughout. After a failed receive (deadline) it must
not free them until the prefill side's ``sender.abort()`` returned (no WRITE in flight any more)
or the prefill worker is gone; otherwise a late WRITE could land in reused blocks. The NIXL
notification of layer L is delivered after layer L's data (UCX orders them on the endpoint).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kv_transfer.descriptors import RunTable, plan_runs
from kv_transfer.errors import DeadlineExceededError, TransferAbortedError, TransferError, TransportError
from kv_transfer.transceiver import TransferResult
from workers.protocol import LayerwiseTarget, PeerInfo

log = logging.getLogger(__name__)

_STALE_ARRIVALS_S = 600.0  # notifications nobody waited for are dropped after this


class LayerwiseSender:
    """Prefill side of one request. ``layer_done`` is the engine's per-layer hook."""

    def __init__(self, tx, peer: PeerInfo, target: LayerwiseTarget, src_block_ids, deadline_s: float):
        if len(src_block_ids) != len(target.block_ids):
            raise ValueError(f"{len(src_block_ids)} prefill blocks but the target has {len(target.block_ids)}")
        self.request_id = target.request_id
        self.num_layers = tx.layout.num_layers
        self._tx, self._peer, self._writer = tx, peer, tx.layer_writer()
        runs = plan_runs(src_block_ids, target.block_ids, tx.layout.blocks_per_segment,
                         peer.layout.blocks_per_segment)
        # for a WRITE the local side is the source: descriptor_lists puts dst_first on the local side.
        # Built once as a RunTable, so each layer's descriptor_lists reuses its arrays.
        self._runs = RunTable(runs.dst_first, runs.src_first, runs.count, runs.dst_ids, runs.src_ids)
        self._deadline = time.monotonic() + deadline_s
        self._start = time.perf_counter()
        self._num_bytes = len(src_block_ids) * tx.layout.bytes_per_block_all_layers
        self._cond = threading.Condition()
        self._queued: set[int] = set()
        self._written: set[int] = set()
        self._in_flight = 0
        self._error: TransferError | None = None
        self._aborted = False

    def layer_done(self, layer: int, wait_written: Callable[[], None] | None = None) -> None:
        """Layer ``layer`` of every block of this request is computed: WRITE it. Non-blocking.
        ``wait_written`` (e.g. a CUDA event's synchronize) runs on the writer thread before the
        WRITE is posted: the KV write of that layer may still be queued on a device stream."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        with self._cond:
            if self._aborted or self._error is not None or layer in self._queued:
                return
            self._queued.add(layer)
            self._in_flight += 1
        self._writer.submit(self, layer, wait_written)

    def finish(self) -> TransferResult:
        """Wait until every layer is written (up to the deadline given at creation)."""
        with self._cond:
            while len(self._written) < self.num_layers and self._error is None and not self._aborted:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(self.num_layers)) - self._written)
                    self._error = DeadlineExceededError(
                        f"layer-wise send of {self.request_id}: layers {missing} not written by the deadline",
                        request_id=self.request_id, peer=self._peer.worker_id)
                    break
                self._cond.wait(min(remaining, 0.05))
            if self._error is not None:
                raise self._error
            if self._aborted:
                raise TransferAbortedError(f"layer-wise send of {self.request_id} was aborted", request_id=self.request_id)
        seconds = time.perf_counter() - self._start
        self._tx.metrics.transfer_done(self._num_bytes, seconds, "write")
        return TransferResult(self._num_bytes, seconds, len(self._runs) * 2 * self.num_layers)

    def abort(self, reason: str = "aborted") -> None:
        """Stop sending; returns once no WRITE of this request is in flight, then tells the reader.
        After this returns the decode side may free its blocks."""
        with self._cond:
            self._aborted = True
            while self._in_flight:
                self._cond.wait(0.05)
        try:
            self._tx.send_notification(self._peer, {"pdkv": 1, "rid": self.request_id, "abort": reason})
        except TransferError as e:
            log.warning("could not tell %s that %s was aborted: %s", self._peer.worker_id, self.request_id, e)

    # -- called by the writer thread -----------------------------------------------------------
    def _write_layer(self, layer: int, wait_written: Callable[[], None] | None = None) -> None:
        try:
            with self._cond:
                skip = self._aborted or self._error is not None
            if not skip:
                if wait_written is not None:
                    try:
                        wait_written()
                    except Exception as e:  # the device failed while writing the layer's KV
                        raise TransportError(f"layer {layer} of {self.request_id} was not written locally: "
                                             f"{type(e).__name__}: {e}", request_id=self.request_id) from e
                local, remote = self._tx.descriptor_lists(self._peer, self._runs, layers=[layer])
                notif = json.dumps({"pdkv": 1, "rid": self.request_id, "layer": layer}).encode()
                handle, state = self._tx.post("WRITE", self._peer, local, remote, notif)
                try:
                    self._tx.wait(handle, state, self._peer, self._deadline, f"WRITE of layer {layer} of {self.request_id}")
                finally:
                    self._tx.release(handle)
                with self._cond:
                    self._written.add(layer)
        except TransferError as e:
            with self._cond:
                self._error = self._error or e
            self._tx.metrics.transfer_failed(e.kind)
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()


class LayerWriter:
    """One thread per transceiver posting layer WRITEs in order: the engine thread never blocks
    on a copy (on CPU, UCX's CMA path copies inside the posting call)."""

    def __init__(self, name: str):
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"kv-layer-writer-{name}", daemon=True)
        self._thread.start()

    def submit(self, sender: LayerwiseSender, layer: int, wait_written: Callable[[], None] | None = None) -> None:
        self._queue.put((sender, layer, wait_written))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            sender, layer, wait_written = item
            sender._write_layer(layer, wait_written)


@dataclass
class _Arrival:
    layers: dict[int, float] = field(default_factory=dict)  # layer -> unix time it was first seen
    aborted: str | None = None
    since: float = field(default_factory=time.monotonic)


class LayerwiseReceiver:
    """Decode side: collects layer notifications per request id (a notification sink of the
    transceiver). Notifications that come before anyone waits are kept."""

    def __init__(self, tx):
        self._tx = tx
        self._lock = threading.Lock()
        self._arrivals: dict[str, _Arrival] = {}

    def __call__(self, agent_name: str, message: bytes) -> bool:
        try:
            msg = json.loads(message)
        except ValueError:
            return False
        if not isinstance(msg, dict) or msg.get("pdkv") != 1 or "rid" not in msg:
            return False
        with self._lock:
            arrival = self._arrivals.setdefault(msg["rid"], _Arrival())
            if "layer" in msg:
                arrival.layers.setdefault(int(msg["layer"]), time.time())
            if "abort" in msg:
                arrival.aborted = str(msg["abort"])
            self._prune()
        return True

    def expect(self, request_id: str) -> None:
        with self._lock:
            self._arrivals.setdefault(request_id, _Arrival())

    def cancel(self, request_id: str, reason: str) -> bool:
        """End a wait on request_id now (it raises TransferAbortedError with ``reason``): the
        caller learned by other means that the transfer failed (e.g. the sender's process died).
        False if nothing is expected or waited for under that id."""
        with self._lock:
            if request_id not in self._arrivals:
                return False
            self._arrivals[request_id].aborted = reason
            return True

    def wait(self, request_id: str, num_layers: int, deadline_s: float) -> dict[int, float]:
        """Block until layers 0..num_layers-1 of request_id have arrived; returns {layer: unix
        time it was first seen here}.
        Raises DeadlineExceededError or TransferAbortedError; the entry is dropped either way."""
        deadline = time.monotonic() + deadline_s
        polls = 0
        try:
            while True:
                self._tx.poll_notifications()
                with self._lock:
                    arrival = self._arrivals.setdefault(request_id, _Arrival())
                    if arrival.aborted is not None:
                        raise TransferAbortedError(f"sender aborted layer-wise transfer of {request_id}: "
                                                   f"{arrival.aborted}", request_id=request_id)
                    if len(arrival.layers) >= num_layers:
                        return dict(arrival.layers)
                    missing = sorted(set(range(num_layers)) - set(arrival.layers))
                if time.monotonic() >= deadline:
                    raise DeadlineExceededError(f"layer-wise transfer of {request_id}: layers {missing} did not "
                                                f"arrive within {deadline_s:.3f} s", request_id=request_id)
                time.sleep(0 if polls < 20 else 0.0005)
                polls += 1
        finally:
            with self._lock:
                self._arrivals.pop(request_id, None)

    def layers_arrived(self, request_id: str) -> set[int]:
        self._tx.poll_notifications()
        with self._lock:
            arrival = self._arrivals.get(request_id)
            return set(arrival.layers) if arrival else set()


    def _prune(self) -> None:
        now = time.monotonic()
        for rid in [r for r, a in self._arrivals.items() if now - a.since > _STALE_ARRIVALS_S]:
            del self._arrivals[rid]
