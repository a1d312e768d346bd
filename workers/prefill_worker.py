"""PrefillWorker: computes a prompt's KV, samples the first token, and holds the blocks pinned
under a lease until the decode worker that READs them releases the handle.

Block ownership: from ``prefill`` returning a KVHandle until exactly one of
    release(request_id)   the decode side is done reading -> blocks freed here
    lease expiry          nobody released in time -> blocks freed here; a later release raises
                          LeaseExpiredError so the reader discards what it read.
A release that arrives while the prefill is still running (the decode side gave up waiting and
its cancel has not landed yet) marks the request abandoned: its handle is freed the moment it is
made, never pinned.

Layer-wise (the PrefillRequest carries a LayerwiseTarget): the decode worker reserved its blocks
first. We handshake with it if needed, and the engine calls the request's layer hook during the
step that completes the prompt: each layer is WRITten into the decode blocks as soon as it is
computed. After the last WRITE completed (sender.finish) our blocks are freed here and the handle
goes back pinning nothing. On any failure the sender is aborted (no WRITE in flight once
abort_layerwise / the failed prefill returns), and only then may the decode side free its blocks.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time

import ray

from kv_transfer.errors import LeaseExpiredError, TransferAbortedError, UnknownLeaseError
from kv_transfer.lease import LeaseTable
from workers.protocol import InvalidRequestError, KVHandle, PrefillRequest, RequestFailedError, Role
from workers.worker_base import WorkerBase, WorkerSpec

log = logging.getLogger(__name__)


class PrefillWorkerImpl(WorkerBase):
    role = Role.PREFILL

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        self.leases: LeaseTable | None = None
        self.abandoned: set[str] = set()  # released while still prefilling (see the module doc)
        self.readers: dict[str, str] = {}  # pinned request id -> the decode worker that reads it
        self.dead_readers: collections.deque[str] = collections.deque(maxlen=64)
        # layer-wise: senders by request id (made on the engine thread) and requests whose
        # transfer was aborted before their sender existed; both under _lw_lock
        self._lw_lock = threading.Lock()
        self._senders: dict = {}
        self._lw_aborted: set[str] = set()

    async def start(self):
        info = await super().start()
        self.leases = LeaseTable(on_expired=self._on_lease_expired, metrics=self.transceiver.metrics)
        self.leases.start()
        return info

    async def prefill(self, req: PrefillRequest) -> KVHandle:
        """Run the prompt's prefill; return its handle with the blocks pinned under a lease."""
        self.check_accepting()
        await self.compile_grammar(req.sampling)
        if req.layerwise is not None:
            return await self._prefill_layerwise(req)
        rid = req.request_id
        self.inflight.add(rid)
        handle_future = self.loop.expect_handle(rid)
        t0 = time.perf_counter()
        try:
            await self.loop.call(lambda e: e.add_request(rid, list(req.prompt_token_ids), req.sampling,
                                                         req.cache_salt, prefill_only=True))
            self.hops.add("add_request", time.perf_counter() - t0)
            handle: KVHandle = await handle_future
            self.hops.add("prefill", time.perf_counter() - t0)
            if rid in self.abandoned:
                raise RequestFailedError(f"{rid}: released by its reader before the prefill finished")
            if req.reader_id is not None and req.reader_id in self.dead_readers:
                raise RequestFailedError(f"{rid}: its reader {req.reader_id} died before the prefill finished")
            if handle.final:  # the first token ended the request: its blocks are already free
                return handle
            expires_at = self.leases.pin(rid, handle.block_ids, req.lease_ttl_s)
            if req.reader_id is not None:
                self.readers[rid] = req.reader_id
            return dataclasses.replace(handle, lease_ttl_s=req.lease_ttl_s, expires_at=expires_at)
        except BaseException:
            # cancelled (the decode side gave up) or failed: nothing may stay pinned
            self.loop.drop_handle(rid)
            await asyncio.shield(self.loop.call(lambda e: e.abort(rid)))
            raise
        finally:
            self.inflight.discard(rid)
            self.abandoned.discard(rid)

    async def renew(self, request_id: str) -> float:
        """Extend a handle's lease; returns the new expiry (unix time). Raises LeaseExpiredError."""
        return self.leases.renew(request_id)

    async def release(self, request_id: str) -> None:
        """The reader is done: free the pinned blocks. Raises LeaseExpiredError if the lease had
        already expired (the blocks may have been reused while being read)."""
        if request_id in self.inflight and not self.leases.is_pinned(request_id):
            self.abandoned.add(request_id)
            return
        self.readers.pop(request_id, None)
        self.leases.release(request_id)
        with self.hops.time("release_handle"):
            await self.loop.call(lambda e: e.release_handle(request_id))

    # -- layer-wise -----------------------------------------------------------------------------
    async def _prefill_layerwise(self, req: PrefillRequest) -> KVHandle:
        rid, target = req.request_id, req.layerwise
        num_blocks = -(-len(req.prompt_token_ids) // self.engine.block_size)
        if target.first_block_index < 0 or target.first_block_index + len(target.block_ids) != num_blocks:
            raise InvalidRequestError(f"{rid}: the layer-wise target has blocks [{target.first_block_index}, "
                                      f"+{len(target.block_ids)}) of a {num_blocks}-block prompt")
        self.inflight.add(rid)
        handle_future = self.loop.expect_handle(rid)
        try:
            decode = ray.get_actor(target.worker_id, namespace=f"pdserve-{self.spec.cluster_name}")
            await asyncio.wait_for(self.transceiver.ensure_peer(target.worker_id, target.kv_epoch, target.compat_hash,
                                                                lambda: decode.peer_info.remote()),
                                   self.spec.transfer.deadline_s)
            factory = self._sender_factory(req)
            await self.loop.call(lambda e: e.add_request(rid, list(req.prompt_token_ids), req.sampling,
                                                         req.cache_salt, prefill_only=True, on_layer_done=factory))
            handle: KVHandle = await handle_future
            with self._lw_lock:
                sender = self._senders.get(rid)
            if sender is None:
                raise TransferAbortedError(f"{rid}: layer-wise transfer aborted before it started", request_id=rid)
            await asyncio.to_thread(sender.finish)  # every layer's WRITE completed (or it raises)
            await self.loop.call(lambda e: e.release_handle(rid))
            return dataclasses.replace(handle, lease_ttl_s=0.0, expires_at=time.time())
        except BaseException:
            self.loop.drop_handle(rid)
            await asyncio.shield(self._stop_layerwise(rid, "the prefill failed"))
            raise
        finally:
            self.inflight.discard(rid)
            with self._lw_lock:
                self._senders.pop(rid, None)
                self._lw_aborted.discard(rid)

    def _sender_factory(self, req: PrefillRequest):
        """The engine's on_layer_done for this request (runs on the engine thread)."""
        rid, target, deadline_s = req.request_id, req.layerwise, self.spec.transfer.deadline_s

        def factory(block_ids: tuple[int, ...]):
            with self._lw_lock:
                if rid in self._lw_aborted:
                    return None
                sender = self.transceiver.layerwise_sender(target, block_ids[target.first_block_index:], deadline_s)
                self._senders[rid] = sender
            return sender.layer_done

        return factory

    async def abort_layerwise(self, request_id: str, reason: str = "aborted by the decode worker") -> None:
        """The decode side gives up on a layer-wise transfer. Returns once no WRITE of it can land
        in the decode worker's blocks any more (it may free them then)."""
        with self._lw_lock:
            if request_id in self.inflight:
                self._lw_aborted.add(request_id)
        # the pending prefill() (if it still waits for its handle) fails and cleans up too
        self.loop.fail_handle(request_id, TransferAbortedError(f"{request_id}: {reason}", request_id=request_id))
        await self._stop_layerwise(request_id, reason)

    async def _stop_layerwise(self, request_id: str, reason: str) -> None:
        """Idempotent: no new sender (flag), no WRITE in flight (the sender aborted, which also
        tells the decode side), then our blocks are freed."""
        with self._lw_lock:
            if request_id in self.inflight:
                self._lw_aborted.add(request_id)

        def sender_of(engine):  # between steps: a step that makes the sender has finished
            with self._lw_lock:
                return self._senders.get(request_id)

        sender = await self.loop.call(sender_of)
        if sender is not None:
            await asyncio.to_thread(sender.abort, reason)
        await self.loop.call(lambda e: e.abort(request_id))

    async def release_reader(self, reader_id: str) -> int:
        """``reader_id`` (a decode worker) died: free every handle pinned for it now, not when its
        lease expires, and refuse to pin for it later. Returns how many handles were freed."""
        self.dead_readers.append(reader_id)
        freed = 0
        for rid in [rid for rid, reader in list(self.readers.items()) if reader == reader_id]:
            try:
                await self.release(rid)
                freed += 1
            except (LeaseExpiredError, UnknownLeaseError):  # expired meanwhile: already freed
                self.readers.pop(rid, None)
        if freed:
            log.warning("freed %d KV handle(s) pinned for %s, which died", freed, reader_id)
        return freed

    def _on_lease_expired(self, request_id: str) -> None:
        self.readers.pop(request_id, None)
        log.warning("KV handle %s expired before release: freeing its blocks", request_id)
        self.counters["num_leases_expired"] += 1
        asyncio.run_coroutine_threadsafe(self.loop.call(lambda e: e.release_handle(request_id)), self.loop._loop)


PrefillWorker = ray.remote(PrefillWorkerImpl)
