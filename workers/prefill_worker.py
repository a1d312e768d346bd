"""PrefillWorker: computes a prompt's KV, samples the first token, and holds the blocks pinned
under a lease until the decode worker that READs them releases the handle.

Block ownership: from ``prefill`` returning a KVHandle until exactly one of
    release(request_id)   the decode side is done reading -> blocks freed here
    lease expiry          nobody released in time -> blocks freed here; a later release raises
                          LeaseExpiredError so the reader discards what it read.
A release that arrives while the prefill is still running (the decode side gave up waiting and
its cancel has not landed yet) marks the request abandoned: its handle is freed the moment it is
made, never pinned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import ray

from kv_transfer.lease import LeaseTable
from workers.protocol import KVHandle, PrefillRequest, RequestFailedError, Role
from workers.worker_base import WorkerBase, WorkerSpec

log = logging.getLogger(__name__)


class PrefillWorkerImpl(WorkerBase):
    role = Role.PREFILL

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        self.leases: LeaseTable | None = None
        self.abandoned: set[str] = set()  # released while still prefilling (see the module doc)

    async def start(self):
        info = await super().start()
        self.leases = LeaseTable(on_expired=self._on_lease_expired, metrics=self.transceiver.metrics)
        self.leases.start()
        return info

    async def prefill(self, req: PrefillRequest) -> KVHandle:
        """Run the prompt's prefill; return its handle with the blocks pinned under a lease."""
        self.check_accepting()
        rid = req.request_id
        self.inflight.add(rid)
        handle_future = self.loop.expect_handle(rid)
        try:
            await self.loop.call(lambda e: e.add_request(rid, list(req.prompt_token_ids), req.sampling,
                                                         req.cache_salt, prefill_only=True))
            handle: KVHandle = await handle_future
            if rid in self.abandoned:
                raise RequestFailedError(f"{rid}: released by its reader before the prefill finished")
            expires_at = self.leases.pin(rid, handle.block_ids, req.lease_ttl_s)
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
        self.leases.release(request_id)
        await self.loop.call(lambda e: e.release_handle(request_id))

    def _on_lease_expired(self, request_id: str) -> None:
        log.warning("KV handle %s expired before release: freeing its blocks", request_id)
        self.counters["num_leases_expired"] += 1
        asyncio.run_coroutine_threadsafe(self.loop.call(lambda e: e.release_handle(request_id)), self.loop._loop)


PrefillWorker = ray.remote(PrefillWorkerImpl)
